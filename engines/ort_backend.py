"""onnxruntime backend: runs the exported graphs with the same call signature as the
eager UNet hook of the generator,

    backend(sample, t, encoder_hidden_states, down_residuals, mid_residual) -> noise_pred

Tensors go in and come out through onnxruntime's IO binding straight from/to torch
memory (no numpy round trip), on the CPU or, with onnxruntime-gpu, on CUDA.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from sasi_online.engines.export import load_spec, onnx_path
from sasi_online.engines.feeds import controlled_feeds, unet_feeds
from sasi_online.errors import UserInputError

_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32"}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtGraph:
    """One exported graph in an onnxruntime session."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.spec = load_spec(self.folder)
        opts = ort.SessionOptions()
        # One thread per process unless told otherwise (shared small machines, see utils.limit_threads).
        opts.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = list(providers or default_providers())
        self.session = ort.InferenceSession(str(onnx_path(self.folder)), sess_options=opts,
                                            providers=self.providers)
        self._on_cuda = "CUDAExecutionProvider" in self.session.get_providers()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.spec.input_names if n not in inputs]
        if missing:
            raise UserInputError(f"graph '{self.folder}' needs inputs {missing}; it takes "
                                 f"{self.spec.input_names}")
        first = inputs[self.spec.input_names[0]]
        device = first.device if (self._on_cuda and first.is_cuda) else torch.device("cpu")
        binding = self.session.io_binding()
        keep = []  # keep bound tensors alive until the run returns
        for name in self.spec.input_names:
            t = inputs[name].to(device).contiguous()
            if t.dtype not in _NP_DTYPES:
                raise UserInputError(f"input '{name}' has dtype {t.dtype}; use float32, float16 or int64")
            keep.append(t)
            binding.bind_input(name, device.type, device.index or 0, _np(t.dtype), tuple(t.shape), t.data_ptr())
        outs = {}
        for name, shape in self._output_shapes(inputs).items():
            # Outputs land in torch-allocated memory: no copy out of onnxruntime.
            t = torch.empty(shape, dtype=first.dtype if first.is_floating_point() else torch.float32,
                            device=device)
            outs[name] = t
            binding.bind_output(name, device.type, device.index or 0, _np(t.dtype), tuple(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
        return outs

    def _output_shapes(self, inputs: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        spec = self.spec
        if spec.kind == "text_encoder":
            b, n = inputs["input_ids"].shape
            return {"last_hidden_state": (b, n, spec.text_dim)}
        x = inputs["latent" if spec.kind == "vae_decoder" else "sample"]
        b, _, h, w = x.shape
        return spec.output_shapes(b, h * spec.vae_scale_factor, w * spec.vae_scale_factor)


class OrtUNetBackend:
    """The generator's UNet hook on onnxruntime.

    `unet_folder`: an exported `unet` graph (with or without residual inputs).
    `controlled_folder`: optionally the fused `unet_controlnet` graph, used by
    `controlled(...)`, which replaces the ControlNet call and the UNet call together.
    """

    name = "onnxruntime"

    def __init__(self, unet_folder: str | Path | None, controlled_folder: str | Path | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None):
        if unet_folder is None and controlled_folder is None:
            raise UserInputError("OrtUNetBackend needs an exported 'unet' or 'unet_controlnet' folder")
        self.unet = OrtGraph(unet_folder, providers, threads) if unet_folder else None
        self.fused = OrtGraph(controlled_folder, providers, threads) if controlled_folder else None
        self.fuses_controlnet = self.fused is not None
        first = self.unet or self.fused
        self.reason = f"onnxruntime providers {first.session.get_providers()}"

    def __call__(self, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                 down_residuals: Sequence[torch.Tensor] | None = None,
                 mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.unet is None:
            raise UserInputError("this backend holds only the fused UNet+ControlNet graph: "
                                 "call .controlled(...) or export the 'unet' graph too")
        feeds = unet_feeds(self.unet.spec, str(self.unet.folder), sample, t, encoder_hidden_states,
                           down_residuals, mid_residual)
        return self.unet.run(feeds)["noise_pred"].to(device=sample.device, dtype=sample.dtype)

    def controlled(self, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                   control_image: torch.Tensor, conditioning_scale: float) -> torch.Tensor:
        """ControlNet + UNet in one call (the fused graph)."""
        if self.fused is None:
            raise UserInputError("no fused 'unet_controlnet' graph was given to this backend")
        feeds = controlled_feeds(sample, t, encoder_hidden_states, control_image, conditioning_scale)
        return self.fused.run(feeds)["noise_pred"].to(device=sample.device, dtype=sample.dtype)


def _np(dtype: torch.dtype):
    import numpy as np

    return np.dtype(_NP_DTYPES[dtype])

