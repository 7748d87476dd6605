"""Guarded imports of the optional GPU stack, each with a message that says why it is
unavailable and what to do. Nothing here imports a GPU library at module import time.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from sasi_online.errors import UserInputError

GPU_EXTRA = "pip install sasi_online[gpu] on a machine with an NVIDIA GPU"
# TensorRT majors whose Python API the engines are written and tested against (setup.py pins
# the gpu extra to the same range).
TRT_MAJORS = (10, 11)
TRT_PIN = ">=10,<12"


class BackendUnavailable(UserInputError):
    """A requested backend cannot run here; the message says why and what to install."""


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_name() -> str:
    """The CUDA device's name, part of the TensorRT engine cache key."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
                                 "TensorRT engines are built for one GPU model and need one")
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken install raising OSError / RuntimeError
        return None, exc


def tensorrt_major(version: str) -> int:
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else 0


def require_tensorrt():
    """`import tensorrt` or raise BackendUnavailable saying why."""
    trt, exc = _import("tensorrt")
    if trt is None:
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"failed to import ({exc})"
        raise BackendUnavailable(f"tensorrt {why}: {GPU_EXTRA}")
    version = str(getattr(trt, "__version__", "0"))
    major = tensorrt_major(version)
    if major < TRT_MAJORS[0]:
        raise BackendUnavailable(f"tensorrt {version} is too old: this code uses the TensorRT 10/11 API "
                                 f"(named tensors, execute_async_v3, strongly typed networks); "
                                 f"pip install 'tensorrt{TRT_PIN}'")
    if major > TRT_MAJORS[-1]:
        raise BackendUnavailable(f"tensorrt {version} is newer than the TensorRT majors this code is tested "
                                 f"against ({', '.join(map(str, TRT_MAJORS))}; their documented Python APIs are "
                                 f"in tests/fixtures/tensorrt_api/); pip install 'tensorrt{TRT_PIN}'")
    if not cuda_available():
        raise BackendUnavailable("tensorrt is installed but no CUDA GPU is visible: TensorRT engines run "
                                 "only on an NVIDIA GPU; use backend 'onnxruntime' or 'eager' here")
    return trt


def require_torch_tensorrt():
    mod, exc = _import("torch_tensorrt")
    if mod is None:
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"failed to import ({exc})"
        raise BackendUnavailable(f"torch_tensorrt {why}: {GPU_EXTRA}")
    if not cuda_available():
        raise BackendUnavailable("torch_tensorrt is installed but no CUDA GPU is visible: it compiles for "
                                 "an NVIDIA GPU; use backend 'compile' or 'eager' here")
    return mod


def xformers_status(device_type: str) -> Availability:
    """xformers only where installed AND on a CUDA device: it has no CPU kernels."""
    mod, exc = _import("xformers.ops")
    if mod is None:
        why = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"failed to import ({exc})"
        return Availability("xformers", False, f"xformers {why} ({GPU_EXTRA})")
    if device_type != "cuda":
        return Availability("xformers", False,
                            f"xformers is installed but the model is on '{device_type}': xformers has no "
                            f"CPU kernels (memory_efficient_attention raises NotImplementedError there)")
    return Availability("xformers", True, "xformers is installed and the model is on a CUDA device")


def onnxruntime_status() -> Availability:
    mod, exc = _import("onnxruntime")
    if mod is None:
        return Availability("onnxruntime", False, f"onnxruntime is not importable ({exc}): pip install onnxruntime")
    return Availability("onnxruntime", True, f"onnxruntime {mod.__version__}, providers "
                                             f"{', '.join(mod.get_available_providers())}")
