"""Choose how the generator's UNet runs: eager, torch.compile, onnxruntime, TensorRT or
torch-tensorrt. Every backend is called like the eager UNet hook,

    backend(sample, t, encoder_hidden_states, down_residuals=None, mid_residual=None) -> noise_pred

and has a `name` and a `reason` (what was chosen and why, for the log). Engine backends
(onnxruntime, tensorrt) may also hold the fused UNet+ControlNet graph: then
`backend.fuses_controlnet` is True and `backend.controlled(sample, t, encoder_hidden_states,
control_image, conditioning_scale)` replaces the ControlNet call and the UNet call.

A backend that cannot run here raises BackendUnavailable with the reason and the fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from sasi_online.engines.availability import (
    Availability,
    BackendUnavailable,
    onnxruntime_status,
    require_tensorrt,
    require_torch_tensorrt,
)
from sasi_online.errors import UserInputError

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt", "torch_tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")  # engine precisions (TensorRT and torch-tensorrt)


class EagerUNet:
    """The diffusers UNet itself behind the hook signature."""

    name = "eager"
    fuses_controlnet = False

    def __init__(self, unet: nn.Module, reason: str = "plain PyTorch modules"):
        self.unet = unet
        self.reason = reason

    def __call__(self, sample, t, encoder_hidden_states, down_residuals=None, mid_residual=None):
        return self.unet(sample, t, encoder_hidden_states,
                         down_block_additional_residuals=down_residuals,
                         mid_block_additional_residual=mid_residual, return_dict=False)[0]


class CompiledUNet(EagerUNet):
    """torch.compile of the UNet. `reduce-overhead` on a GPU captures CUDA graphs;
    compilation happens at the first call (and again for each new shape)."""

    name = "compile"

    def __init__(self, unet: nn.Module, mode: str, reason: str, dynamic: bool | None = False):
        super().__init__(torch.compile(unet, mode=mode, dynamic=dynamic), reason)
        self.mode = mode


@dataclass(frozen=True)
class BackendRequest:
    """What the engine backends need beyond the UNet: where to cache graphs/engines and
    which shapes to support (pixels; batch as the UNet sees it)."""

    engine_dir: str | Path | None = None
    batch: tuple[int, int, int] = (1, 2, 16)  # min, opt, max as the UNet sees it (2x images with CFG)
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    text_len: int = 77
    vae_factor: int = 8
    precision: str = "fp16"
    use_cuda_graph: bool = True
    # The plain UNet graph takes ControlNet residuals as inputs (zeros when a call has
    # none). None: only when a ControlNet is given to select_backend.
    unet_with_residuals: bool | None = None


def compile_mode_for(device_type: str, requested: str | None = None) -> tuple[str, str]:
    """torch.compile mode and why: CUDA graphs (reduce-overhead) only on a GPU."""
    if requested:
        return requested, f"mode '{requested}' requested"
    if device_type == "cuda":
        return "reduce-overhead", "on a CUDA device: 'reduce-overhead' captures CUDA graphs for static shapes"
    return "default", (f"on '{device_type}': CUDA graphs need a GPU, so mode 'default' "
                       f"(inductor kernels, no graph capture)")


def backend_availability(device_type: str | None = None) -> list[Availability]:
    """Which backends can run here, each with its reason (for `--help`-style listings)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    out = [Availability("eager", True, "always available"),
           Availability("compile", True, compile_mode_for(device_type)[1])]
    ort = onnxruntime_status()
    out.append(Availability("onnxruntime", ort.available, ort.reason))
    for name, req in (("tensorrt", require_tensorrt), ("torch_tensorrt", require_torch_tensorrt)):
        try:
            req()
            out.append(Availability(name, True, "installed, CUDA GPU visible"))
        except BackendUnavailable as exc:
            out.append(Availability(name, False, str(exc)))
    return out


def select_backend(name: str, unet: nn.Module, *, controlnet: nn.Module | None = None,
                   request: BackendRequest | None = None, compile_mode: str | None = None,
                   providers: Sequence[str] | None = None):
    """Build the named backend for `unet` (and, for engines, the fused graph with `controlnet`)."""
    if name not in BACKENDS:
        raise UserInputError(f"backend '{name}' is unknown; choose one of {', '.join(BACKENDS)} "
                             f"(config key generation.backend)")
    request = request or BackendRequest()
    if name in ("tensorrt", "torch_tensorrt") and request.precision not in PRECISIONS:
        # Checked first: the tensorrt path would only notice after minutes of ONNX export.
        raise UserInputError(f"precision '{request.precision}' is not one of {', '.join(PRECISIONS)} "
                             f"(BackendRequest.precision)")
    device_type = _device_type(unet)
    if name == "eager":
        return EagerUNet(unet)
    if name == "compile":
        mode, reason = compile_mode_for(device_type, compile_mode)
        return CompiledUNet(unet, mode, reason)
    if name == "torch_tensorrt":
        return _torch_tensorrt_backend(unet, request)
    if name == "tensorrt":
        require_tensorrt()  # fail before spending minutes on an export
    else:
        ort = onnxruntime_status()
        if not ort.available:
            raise BackendUnavailable(ort.reason)
    if request.engine_dir is None:
        raise UserInputError(f"backend '{name}' needs an engine folder to export graphs into "
                             f"(BackendRequest(engine_dir=...)); it is reused across runs")
    native = (unet.config.sample_size * request.vae_factor,) * 3
    request = dataclasses.replace(request, height=request.height or native,
                                  width=request.width or request.height or native)
    folders = _export_for(unet, controlnet, request)
    if name == "onnxruntime":
        from sasi_online.engines.ort_backend import OrtUNetBackend

        return OrtUNetBackend(folders["unet"], folders.get("unet_controlnet"), providers=providers)
    return _tensorrt_backend(folders, request)


def _export_for(unet: nn.Module, controlnet: nn.Module | None, request: BackendRequest) -> dict[str, Path]:
    from sasi_online.engines.export import export_graph, unet_controlnet_graph, unet_graph

    height, width = request.height, request.width
    out = {}
    # With a ControlNet the plain UNet graph also takes residuals (fed zeros when absent),
    # so the separate-ControlNet call path keeps working beside the fused graph.
    with_residuals = request.unet_with_residuals
    if with_residuals is None:
        with_residuals = controlnet is not None
    module, spec = unet_graph(unet, with_residuals=with_residuals, text_len=request.text_len,
                              vae_factor=request.vae_factor)
    out["unet"] = export_graph(module, spec, request.engine_dir, "unet", batch=request.batch[1],
                               height=height[1], width=width[1])
    if controlnet is not None:
        module, spec = unet_controlnet_graph(unet, controlnet, text_len=request.text_len)
        out["unet_controlnet"] = export_graph(module, spec, request.engine_dir, "unet_controlnet",
                                              batch=request.batch[1], height=height[1], width=width[1])
    return out


def _tensorrt_backend(folders: dict[str, Path], request: BackendRequest):
    from sasi_online.engines.export import load_spec
    from sasi_online.engines.trt_build import ShapeRange, build_engine
    from sasi_online.engines.trt_runtime import TrtUNetBackend

    spec = load_spec(folders["unet"])
    shapes = ShapeRange(request.batch, request.height, request.width)
    cache = Path(request.engine_dir) / "tensorrt"
    unet_engine = build_engine(folders["unet"], shapes, cache, precision=request.precision)
    fused = None
    if "unet_controlnet" in folders:
        fused = build_engine(folders["unet_controlnet"], shapes, cache, precision=request.precision).path
    backend = TrtUNetBackend(unet_engine.path, spec, fused,
                             use_cuda_graph=request.use_cuda_graph and shapes.is_static)
    backend.reason = (f"TensorRT engine {unet_engine.path.name} "
                      f"({'from cache' if unet_engine.cached else f'built in {unet_engine.seconds:.0f} s'}); "
                      f"CUDA graphs {'on (static shapes)' if backend.use_cuda_graph else 'off (dynamic profile)'}")
    return backend


def _torch_tensorrt_backend(unet: nn.Module, request: BackendRequest):
    torch_trt = require_torch_tensorrt()
    precision = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[request.precision]
    # The dynamo frontend compiles lazily at the first call, per shape, as torch.compile does.
    compiled = torch.compile(unet, backend="torch_tensorrt", dynamic=False,
                             options={"enabled_precisions": {precision}})
    backend = EagerUNet(compiled, f"torch_tensorrt {torch_trt.__version__} via torch.compile "
                                  f"(backend='torch_tensorrt', {request.precision})")
    backend.name = "torch_tensorrt"
    return backend


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"
