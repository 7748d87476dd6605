"""TensorRT engine runtime on torch CUDA memory, with CUDA graphs for static shapes.

Written against the documented API of TensorRT 10 and 11 (`Runtime.deserialize_cuda_engine`,
`create_execution_context`, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`); every TensorRT import is guarded. Inputs and outputs are torch
tensors: no host copies, the engine runs on torch's current stream.

CUDA graphs: with `use_cuda_graph=True` the first call at a new set of input shapes
runs once to warm up, then captures the engine launch into a `torch.cuda.CUDAGraph`
over static input/output buffers; later calls at the same shapes copy the inputs into
those buffers and replay. A new shape captures a new graph (the old one is dropped).
The generator pads every batch to one size, so a run captures one graph per engine.
Graphs need a CUDA device; elsewhere (the fake TensorRT the tests run against) the
engine launches directly on stream 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from sasi_online.engines.availability import require_tensorrt
from sasi_online.engines.feeds import controlled_feeds, unet_feeds
from sasi_online.engines.graphs import GraphSpec
from sasi_online.errors import UserInputError


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[trt_dtype]


class TrtEngine:
    """One deserialised engine and its execution context."""

    def __init__(self, engine_path: str | Path, device: str | torch.device = "cuda"):
        trt = require_tensorrt()
        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise UserInputError(f"TensorRT engine '{self.path}' not found; build it with "
                                 f"sasi_online.engines.trt_build.build_engine")
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise UserInputError(f"'{self.path}' is not a TensorRT engine for this TensorRT version/GPU; "
                                 f"delete it and build again")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._graph = None
        self._graph_key = None
        self._static_in: dict[str, torch.Tensor] = {}
        self._static_out: dict[str, torch.Tensor] = {}

    def _bind(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise UserInputError(f"engine '{self.path.name}' needs inputs {missing}")
        bound = {}
        for name in self.inputs:
            t = inputs[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            bound[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        self._keep = bound  # alive until the launch is done
        return outs

    def _launch(self, stream) -> None:
        handle = stream.cuda_stream if stream is not None else 0
        if not self.context.execute_async_v3(handle):
            raise RuntimeError(f"TensorRT execution of '{self.path.name}' failed (see the log above)")

    def infer(self, inputs: dict[str, torch.Tensor], use_cuda_graph: bool = False) -> dict[str, torch.Tensor]:
        on_cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if on_cuda else None
        if not (use_cuda_graph and on_cuda):
            outs = self._bind(inputs)
            self._launch(stream)
            return outs
        key = tuple((n, tuple(inputs[n].shape)) for n in self.inputs)
        if key != self._graph_key:
            # Static buffers bound once; warm up (TensorRT allocates lazily), then capture.
            self._static_in = {n: inputs[n].to(device=self.device, dtype=self.dtypes[n]).clone()
                               for n in self.inputs}
            self._static_out = self._bind(self._static_in)
            self._launch(stream)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            capture = torch.cuda.Stream(self.device)
            capture.wait_stream(stream)
            with torch.cuda.graph(graph, stream=capture):
                self._launch(capture)
            stream.wait_stream(capture)
            self._graph, self._graph_key = graph, key
        for n in self.inputs:
            self._static_in[n].copy_(inputs[n], non_blocking=True)
        self._graph.replay()
        # The static buffers are overwritten by the next replay: hand out copies.
        return {n: t.clone() for n, t in self._static_out.items()}


class TrtUNetBackend:
    """The generator's UNet hook on TensorRT engines (same call as the eager UNet)."""

    name = "tensorrt"

    def __init__(self, unet_engine: str | Path | None, unet_spec: GraphSpec | None = None,
                 controlled_engine: str | Path | None = None, use_cuda_graph: bool = False,
                 device: str | torch.device = "cuda"):
        if unet_engine is None and controlled_engine is None:
            raise UserInputError("TrtUNetBackend needs a 'unet' or a 'unet_controlnet' engine")
        self.unet = TrtEngine(unet_engine, device) if unet_engine else None
        self.spec = unet_spec
        self.fused = TrtEngine(controlled_engine, device) if controlled_engine else None
        self.fuses_controlnet = self.fused is not None
        self.use_cuda_graph = use_cuda_graph

    def __call__(self, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                 down_residuals: Sequence[torch.Tensor] | None = None,
                 mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.unet is None or self.spec is None:
            raise UserInputError("this backend holds only the fused engine: call .controlled(...)")
        feeds = unet_feeds(self.spec, str(self.unet.path), sample, t, encoder_hidden_states,
                           down_residuals, mid_residual)
        out = self.unet.infer(feeds, self.use_cuda_graph)["noise_pred"]
        return out.to(dtype=sample.dtype)

    def controlled(self, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
                   control_image: torch.Tensor, conditioning_scale: float) -> torch.Tensor:
        if self.fused is None:
            raise UserInputError("no fused 'unet_controlnet' engine was given to this backend")
        feeds = controlled_feeds(sample, t, encoder_hidden_states, control_image, conditioning_scale)
        return self.fused.infer(feeds, self.use_cuda_graph)["noise_pred"].to(dtype=sample.dtype)
