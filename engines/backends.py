"""Choose how the generator's models run: eager, torch.compile, onnxruntime, TensorRT or
torch-tensorrt. Every backend is called like the eager UNet hook,

    backend(sample, t, encoder_hidden_states, down_residuals=None, mid_residual=None) -> noise_pred

and has a `name` and a `reason` (what was chosen and why, for the log). Given a ControlNet
(a module, or a loader called at the first mask/mix batch), the compile and engine backends
run ControlNet + UNet as ONE graph: `backend.fuses_controlnet` is True and
`backend.controlled(sample, t, encoder_hidden_states, control_image, conditioning_scale)`
replaces the ControlNet call and the UNet call. Image and noise prompts run the plain UNet
graph (no residual inputs). Each graph is compiled / exported / built once, at its first use.

- compile: `CompiledStep`, torch.compile with the mode's options plus diffusers' inductor
  settings (`DIFFUSERS_INDUCTOR`); reduce-overhead (CUDA graphs) on a GPU by default.
- onnxruntime / tensorrt: `EngineStep`; TensorRT engines are strongly typed (precision
  from the exported graph) and capture CUDA graphs when the profile is static, which the
  generator's padded batches make it.

A backend that cannot run here raises BackendUnavailable with the reason and the fix.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


# diffusers' recommended inductor settings for its UNets (its "torch2.0" speed-up guide):
# 1x1 convolutions as matmuls, coordinate-descent tuning of the generated kernels, and no
# epilogue fusion (it fights the matmul templates). Merged into every compile mode's options.
DIFFUSERS_INDUCTOR = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                      "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# SASI_INDUCTOR_TUNING=default drops DIFFUSERS_INDUCTOR: inductor's own settings, no
# coordinate-descent tuning, a compile minutes shorter on a cold cache (the GPU check uses it).
TUNING_ENV = "SASI_INDUCTOR_TUNING"
TUNINGS = ("diffusers", "default")


def inductor_options(mode: str) -> dict:
    """torch.compile options for `mode` plus DIFFUSERS_INDUCTOR (unless SASI_INDUCTOR_TUNING=default).
    torch.compile takes `mode` or `options`, not both: the mode's own options (CUDA graphs for
    reduce-overhead) are spelt out."""
    from torch._inductor import list_mode_options

    if mode not in COMPILE_MODES[1:]:
        raise UserInputError(f"compile mode '{mode}' is unknown; choose one of {', '.join(COMPILE_MODES)} "
                             f"(config key generation.compile_mode)")
    tuning = os.environ.get(TUNING_ENV, "diffusers").strip().lower() or "diffusers"
    if tuning not in TUNINGS:
        raise UserInputError(f"{TUNING_ENV}={tuning}: expected one of {', '.join(TUNINGS)}")
    return {**list_mode_options(mode), **(DIFFUSERS_INDUCTOR if tuning == "diffusers" else {})}


class CompiledStep:
    """torch.compile of one whole model call per step: the UNet alone (image and noise prompts)
    or ControlNet + UNet as one graph (`controlled`, mask and mix prompts; compiled at its
    first use, so a family whose prompts never use the ControlNet never loads it). With CUDA
    graphs (reduce-overhead on a GPU) and the generator's padded batches, each graph is
    captured once per (batch, resolution) and replayed every step."""

    name = "compile"

    def __init__(self, unet: nn.Module, mode: str, reason: str, controlnet_loader=None,
                 dynamic: bool | None = False):
        from sasi_online.engines.export import UNetGraph

        self.unet = unet
        self.mode = mode
        self.options = inductor_options(mode)
        self.cuda_graphs = bool(self.options.get("triton.cudagraphs")) and _device_type(unet) == "cuda"
        self.dynamic = dynamic
        self.reason = reason
        self.controlnet_loader = controlnet_loader
        self.fuses_controlnet = controlnet_loader is not None
        self.plain = self._compile(UNetGraph(unet, with_residuals=False))
        self._fused = None
        self.eager = EagerUNet(unet)

    def _compile(self, module: nn.Module):
        return torch.compile(module.eval(), dynamic=self.dynamic, options=self.options)

    def _run(self, fn, *args):
        if self.cuda_graphs:
            # Each step is a new iteration for cudagraph trees; the output buffer is reused by the
            # next replay, and a multistep sampler may keep it: hand out a copy (one latent).
            torch.compiler.cudagraph_mark_step_begin()
            return fn(*args).clone()
        return fn(*args)

    def __call__(self, sample, t, encoder_hidden_states, down_residuals=None, mid_residual=None):
        if down_residuals is not None or mid_residual is not None:
            # A ControlNet run outside the graph (a wrapped backend): the eager UNet takes its residuals.
            return self.eager(sample, t, encoder_hidden_states, down_residuals, mid_residual)
        return self._run(self.plain, sample, t, encoder_hidden_states)

    def controlled(self, sample, t, encoder_hidden_states, control_image, conditioning_scale):
        if self._fused is None:
            if self.controlnet_loader is None:
                raise UserInputError("this compiled backend has no ControlNet (none was given to select_backend)")
            from sasi_online.engines.export import UNetControlNetGraph

            self._fused = self._compile(UNetControlNetGraph(self.unet, self.controlnet_loader()))
        return self._run(self._fused, sample, t, encoder_hidden_states, control_image, float(conditioning_scale))


# Kept for callers of the old name: the UNet-only compiled backend is CompiledStep without a ControlNet.
CompiledUNet = CompiledStep


@dataclass(frozen=True)
class BackendRequest:
    """What the engine backends need beyond the UNet: where to cache graphs/engines and
    which shapes to support (pixels; batch as the UNet sees it). A static request (min = opt
    = max) is what the generator sends with padded batches: TensorRT then captures CUDA graphs."""

    engine_dir: str | Path | None = None
    batch: tuple[int, int, int] = (1, 2, 16)  # min, opt, max as the UNet sees it (2x images with CFG)
    height: tuple[int, int, int] | None = None
    width: tuple[int, int, int] | None = None
    text_len: int = 77
    vae_factor: int = 8
    precision: str | None = None  # engines: None = the models' dtype (strongly typed networks)
    use_cuda_graph: bool = True
    # The plain UNet graph takes ControlNet residuals as inputs (only when asked for: the
    # generator runs mask/mix prompts through the fused graph, so it exports each graph once).
    unet_with_residuals: bool = False


def compile_mode_for(device_type: str, requested: str | None = None) -> tuple[str, str]:
    """torch.compile mode and why: CUDA graphs (reduce-overhead) only on a GPU."""
    if requested and requested != "auto":
        return requested, f"mode '{requested}' requested, with diffusers' inductor settings"
    if device_type == "cuda":
        return "reduce-overhead", ("on a CUDA device: 'reduce-overhead' captures CUDA graphs for the static "
                                   "padded batches; diffusers' inductor settings")
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
                   controlnet_loader: Callable[[], nn.Module] | None = None,
                   request: BackendRequest | None = None, compile_mode: str | None = None,
                   providers: Sequence[str] | None = None):
    """Build the named backend for `unet`. With a ControlNet (a module, or a loader called at
    the first mask/mix batch) the compile and engine backends also run ControlNet + UNet as one
    graph (`backend.controlled(...)`)."""
    if name not in BACKENDS:
        raise UserInputError(f"backend '{name}' is unknown; choose one of {', '.join(BACKENDS)} "
                             f"(config key generation.backend)")
    request = request or BackendRequest()
    if name in ("tensorrt", "torch_tensorrt") and request.precision not in (None, *PRECISIONS):
        # Checked first: the tensorrt path would only notice after minutes of ONNX export.
        raise UserInputError(f"precision '{request.precision}' is not one of {', '.join(PRECISIONS)} "
                             f"(BackendRequest.precision)")
    if controlnet is not None and controlnet_loader is None:
        controlnet_loader = lambda: controlnet  # noqa: E731
    device_type = _device_type(unet)
    if name == "eager":
        return EagerUNet(unet)
    if name == "compile":
        mode, reason = compile_mode_for(device_type, compile_mode)
        return CompiledStep(unet, mode, reason, controlnet_loader)
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
    make = _ort_runner(providers) if name == "onnxruntime" else _trt_runner(request, unet)
    return EngineStep(name, unet, controlnet_loader, request, make)


class EngineStep:
    """An engine backend (onnxruntime, TensorRT) that exports and builds each graph once, at
    its first use: the plain UNet (no residual inputs) for image and noise prompts, the fused
    ControlNet + UNet graph for mask and mix prompts. A family whose prompts never use the
    ControlNet never loads, exports or builds it."""

    def __init__(self, name: str, unet: nn.Module, controlnet_loader, request: BackendRequest, make):
        self.name, self.unet, self.request, self._make = name, unet, request, make
        self.controlnet_loader = controlnet_loader
        self.fuses_controlnet = controlnet_loader is not None
        self._plain = self._fused = None
        self.built: list[str] = []  # graphs exported/built so far, in order (for logs and tests)
        self.reason = f"{name}: graphs are exported and built at their first use"

    def _runner(self, kind: str):
        from sasi_online.engines.export import export_graph, unet_controlnet_graph, unet_graph

        r = self.request
        if kind == "unet":
            module, spec = unet_graph(self.unet, with_residuals=r.unet_with_residuals, text_len=r.text_len,
                                      vae_factor=r.vae_factor)
        else:
            if self.controlnet_loader is None:
                raise UserInputError(f"backend '{self.name}' was built without a ControlNet: pass one to "
                                     f"select_backend to run mask/mix prompts")
            module, spec = unet_controlnet_graph(self.unet, self.controlnet_loader(), text_len=r.text_len)
        folder = export_graph(module, spec, r.engine_dir, kind, batch=r.batch[1], height=r.height[1],
                              width=r.width[1])
        runner, self.reason = self._make(kind, folder)
        self.built.append(kind)
        return runner

    def __call__(self, sample, t, encoder_hidden_states, down_residuals=None, mid_residual=None):
        if self._plain is None:
            self._plain = self._runner("unet")
        return self._plain(sample, t, encoder_hidden_states, down_residuals, mid_residual)

    def controlled(self, sample, t, encoder_hidden_states, control_image, conditioning_scale):
        if self._fused is None:
            self._fused = self._runner("unet_controlnet")
        return self._fused.controlled(sample, t, encoder_hidden_states, control_image, conditioning_scale)

    @property
    def unet_graph(self):
        """The plain UNet runner once built (None before the first image/noise batch)."""
        return self._plain


def _ort_runner(providers):
    def make(kind: str, folder: Path):
        from sasi_online.engines.ort_backend import OrtUNetBackend

        runner = OrtUNetBackend(folder if kind == "unet" else None, folder if kind != "unet" else None,
                                providers=providers)
        return runner, runner.reason

    return make


def _trt_runner(request: BackendRequest, unet: nn.Module):
    def make(kind: str, folder: Path):
        from sasi_online.engines.export import load_spec
        from sasi_online.engines.trt_build import ShapeRange, build_engine
        from sasi_online.engines.trt_runtime import TrtUNetBackend

        shapes = ShapeRange(request.batch, request.height, request.width)
        device = next(unet.parameters()).device
        built = build_engine(folder, shapes, Path(request.engine_dir) / "tensorrt", precision=request.precision)
        graphs = request.use_cuda_graph and shapes.is_static and device.type == "cuda"
        if kind == "unet":
            runner = TrtUNetBackend(built.path, load_spec(folder), use_cuda_graph=graphs, device=device)
        else:
            runner = TrtUNetBackend(None, None, built.path, use_cuda_graph=graphs, device=device)
        if not shapes.is_static:
            why = "off (dynamic profile: pad the batches, generation.pad_batches)"
        else:
            why = "on (static profile: padded batches)" if graphs else "off (static profile, but no CUDA device)"
        reason = (f"TensorRT engine {built.path.name} "
                  f"({'from cache' if built.cached else f'built in {built.seconds:.0f} s'}, strongly typed "
                  f"{load_spec(folder).float_dtype}); CUDA graphs {why}")
        return runner, reason

    return make


def _torch_tensorrt_backend(unet: nn.Module, request: BackendRequest):
    torch_trt = require_torch_tensorrt()
    precision = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        request.precision, next(unet.parameters()).dtype)
    # The dynamo frontend compiles lazily at the first call, per shape, as torch.compile does.
    compiled = torch.compile(unet, backend="torch_tensorrt", dynamic=False,
                             options={"enabled_precisions": {precision}})
    backend = EagerUNet(compiled, f"torch_tensorrt {torch_trt.__version__} via torch.compile "
                                  f"(backend='torch_tensorrt', {precision})")
    backend.name = "torch_tensorrt"
    return backend


def _device_type(module: nn.Module) -> str:
    p = next(module.parameters(), None)
    return p.device.type if p is not None else "cpu"
