"""ONNX export of the diffusion models, one graph per folder, as NVIDIA's TensorRT
diffusion demo splits them: the UNet with the ControlNet traced inside it, the UNet
alone (optionally taking ControlNet residuals as inputs), the VAE decoder and the CLIP
text encoder. Batch and spatial axes are dynamic.

The legacy TorchScript exporter (`dynamo=False` with `dynamic_axes`) is used: it
exports diffusers' UNet and ControlNet as they are, and onnxruntime matched torch
within a few 1e-6 on the tiny models.

Layout written by `export_graph` (one folder per graph, so large models' external
weight files stay beside their graph):

    OUT/<name>/model.onnx   (+ external data for models over 2 GB)
    OUT/<name>/spec.json    GraphSpec: input/output names, dtypes, shape rules
    OUT/<name>/export.json  export shape, torch version, sha256 of the graph files

The folder is written under a temporary name and renamed when complete, so a killed
export never leaves a half graph that a later run would trust.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from sasi_online.engines.graphs import (
    GraphSpec,
    text_encoder_spec,
    unet_controlnet_spec,
    unet_spec,
    vae_decoder_spec,
    vae_scale_factor,
)
from sasi_online.errors import UserInputError
from sasi_online.utils import atomic_write_json, file_sha256

DEFAULT_OPSET = 17


# ----------------------------------------------------------------------------- traced modules
class UNetGraph(nn.Module):
    """The UNet with ControlNet residuals as plain inputs (when the spec says so)."""

    def __init__(self, unet: nn.Module, with_residuals: bool):
        super().__init__()
        self.unet = unet
        self.with_residuals = with_residuals

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        down = mid = None
        if self.with_residuals:
            down, mid = list(residuals[:-1]), residuals[-1]
        return self.unet(sample, timestep, encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]


class UNetControlNetGraph(nn.Module):
    """ControlNet and UNet in one graph, as the TensorRT demo traces them: one engine call
    per step instead of two, and no residual tensors crossing the engine boundary."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, control_image, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=control_image,
                                    conditioning_scale=conditioning_scale, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


class VaeDecoderGraph(nn.Module):
    """Raw VAE decode: the caller divides latents by `scaling_factor` first, as diffusers does."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class TextEncoderGraph(nn.Module):
    """CLIP text encoder → last hidden state (what SD-1.5 and SD-2.1 condition on)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


# ----------------------------------------------------------------------------- graph builders
def unet_graph(unet: nn.Module, *, with_residuals: bool, text_len: int = 77,
               vae_factor: int = 8) -> tuple[nn.Module, GraphSpec]:
    spec = unet_spec(unet.config, with_residuals=with_residuals, text_len=text_len, vae_factor=vae_factor)
    return UNetGraph(unet, with_residuals), spec


def unet_controlnet_graph(unet: nn.Module, controlnet: nn.Module, *,
                          text_len: int = 77) -> tuple[nn.Module, GraphSpec]:
    spec = unet_controlnet_spec(unet.config, controlnet.config, text_len=text_len)
    return UNetControlNetGraph(unet, controlnet), spec


def vae_decoder_graph(vae: nn.Module) -> tuple[nn.Module, GraphSpec]:
    return VaeDecoderGraph(vae), vae_decoder_spec(vae.config)


def text_encoder_graph(text_encoder: nn.Module, text_len: int) -> tuple[nn.Module, GraphSpec]:
    return TextEncoderGraph(text_encoder), text_encoder_spec(text_encoder.config, text_len)


# ----------------------------------------------------------------------------- inputs
def sample_inputs(spec: GraphSpec, batch: int, height: int, width: int, *, seed: int = 0,
                  device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random inputs of the spec's shapes (seeded): for export tracing and parity checks."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in spec.input_shapes(batch, height, width).items():
        if name == "input_ids":
            t = torch.randint(0, spec.vocab_size, shape, generator=g)
        elif name == "timestep":
            t = torch.randint(0, 1000, shape, generator=g).float()
        elif name == "conditioning_scale":
            t = torch.full(shape, 0.5 + torch.rand((), generator=g).item())
        elif name == "control_image":
            t = torch.rand(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g)
        out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return out


# ----------------------------------------------------------------------------- export
def graph_files_sha256(folder: str | Path) -> str:
    """One hash over every file of an exported graph (model.onnx and external data)."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in ("spec.json", "export.json"):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def module_fingerprint(module: nn.Module, spec: GraphSpec | None = None) -> str:
    """sha256 over the module's class, weights (names, dtypes, shapes, bytes) and the graph spec.

    An existing export is reused only when this matches, so changed weights or a changed
    interface never run through a stale graph.
    """
    import hashlib
    import json

    h = hashlib.sha256(type(module).__name__.encode())
    if spec is not None:
        h.update(json.dumps(spec.to_json(), sort_keys=True).encode())
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_graph(module: nn.Module, spec: GraphSpec, out_dir: str | Path, name: str | None = None, *,
                 batch: int = 2, height: int, width: int, opset: int = DEFAULT_OPSET,
                 overwrite: bool = False) -> Path:
    """Trace `module` at one shape and write `out_dir/<name>/` (see the module docstring).

    Returns the folder. A complete export of the same weights and interface is reused
    unless `overwrite`; a different one is replaced.
    """
    import json

    name = name or spec.kind
    out_dir = Path(out_dir)
    final = out_dir / name
    # The graph's float type is the module's: a TensorRT network built from it is strongly
    # typed, so an fp16 engine comes from an fp16 export (TensorRT 11 has no FP16 flag).
    spec.float_dtype = str(_module_dtype(module)).replace("torch.", "")
    fingerprint = module_fingerprint(module, spec)
    meta = final / "export.json"
    if meta.is_file() and not overwrite:
        try:
            if json.loads(meta.read_text(encoding="utf-8")).get("source_fingerprint") == fingerprint:
                return final
        except ValueError:
            pass  # unreadable metadata: export again
    tmp = out_dir / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs = sample_inputs(spec, batch, height, width, device=_module_device(module),
                           dtype=_module_dtype(module))
    module = module.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # diffusers/transformers shape checks become trace constants; the graphs are checked
        # against torch at other shapes instead (tests), so the tracer's warnings are noise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, tuple(inputs[n] for n in spec.input_names), str(tmp / "model.onnx"),
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False,
            do_constant_folding=True,
        )
    seconds = time.perf_counter() - t0
    atomic_write_json(tmp / "spec.json", spec.to_json())
    atomic_write_json(tmp / "export.json", {
        "name": name, "kind": spec.kind, "opset": opset, "export_shape": [batch, height, width],
        "torch": torch.__version__, "seconds": round(seconds, 3), "sha256": graph_files_sha256(tmp),
        "source_fingerprint": fingerprint,
    })
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def export_all(out_dir: str | Path, *, unet: nn.Module, vae: nn.Module | None = None,
               text_encoder: nn.Module | None = None, controlnet: nn.Module | None = None,
               text_len: int = 77, batch: int = 2, height: int | None = None, width: int | None = None,
               unet_with_residuals: bool = False, opset: int = DEFAULT_OPSET,
               overwrite: bool = False) -> dict[str, Path]:
    """Export every graph a generator family needs; returns {name: folder}.

    `height`/`width` (pixels) default to the UNet's native sample size.
    """
    factor = vae_scale_factor(vae.config) if vae is not None else 8
    height = height or unet.config.sample_size * factor
    width = width or height
    graphs: dict[str, tuple[nn.Module, GraphSpec]] = {
        "unet": unet_graph(unet, with_residuals=unet_with_residuals, text_len=text_len, vae_factor=factor),
    }
    if controlnet is not None:
        graphs["unet_controlnet"] = unet_controlnet_graph(unet, controlnet, text_len=text_len)
    if vae is not None:
        graphs["vae_decoder"] = vae_decoder_graph(vae)
    if text_encoder is not None:
        graphs["text_encoder"] = text_encoder_graph(text_encoder, text_len)
    from tqdm import tqdm

    out = {}
    # A full-size UNet takes a minute or more to trace and write: show progress per graph.
    for name, (module, spec) in tqdm(graphs.items(), desc="ONNX export", unit="graph", leave=False):
        out[name] = export_graph(module, spec, out_dir, name, batch=batch, height=height, width=width,
                                 opset=opset, overwrite=overwrite)
    return out


def load_spec(folder: str | Path) -> GraphSpec:
    return GraphSpec.load(Path(folder) / "spec.json")


def onnx_path(folder: str | Path) -> Path:
    p = Path(folder) / "model.onnx"
    if not p.is_file():
        raise UserInputError(f"'{p}' not found: export the graph first "
                             f"(sasi_online.engines.export.export_graph / export_all)")
    return p


# ----------------------------------------------------------------------------- checking
def check_parity(folder: str | Path, module: nn.Module, inputs: dict[str, torch.Tensor],
                 providers: Sequence[str] | None = None) -> float:
    """Max absolute difference between onnxruntime and PyTorch on `inputs`."""
    from sasi_online.engines.ort_backend import OrtGraph

    graph = OrtGraph(folder, providers=providers)
    got = graph.run(inputs)[graph.spec.output_names[0]]
    with torch.no_grad():
        want = module.eval()(*[inputs[n] for n in graph.spec.input_names])
    return float((got.float() - want.float().cpu()).abs().max())


def _module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _module_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


__all__: Sequence[Any] = [
    "UNetGraph", "UNetControlNetGraph", "VaeDecoderGraph", "TextEncoderGraph", "unet_graph",
    "unet_controlnet_graph", "vae_decoder_graph", "text_encoder_graph", "sample_inputs",
    "export_graph", "export_all", "module_fingerprint", "check_parity", "load_spec", "onnx_path", "graph_files_sha256",
]
