"""A fake `tensorrt` module for one major version, built from the committed list of that
version's documented Python API names (tests/fixtures/tensorrt_api/tensorrt-<major>.txt).

Only listed names exist: using a name a version does not document (BuilderFlag.FP16 on 11.x)
raises AttributeError, as the real module would. Behind the names:
- the builder parses the ONNX file for real (onnx), checks the optimisation profile covers
  every input and refuses precision flags on a strongly typed network (10.x refuses them;
  11.x types every network strongly), and serialises a small JSON "plan";
- the runtime deserialises that plan, and `execute_async_v3` runs the ONNX graph in
  onnxruntime on the CPU, reading inputs from and writing outputs to the raw addresses the
  caller bound with `set_tensor_address` (torch CPU tensors here), so the whole
  build -> cache -> run sequence of sasi_online.engines runs and its numbers can be checked.
Every call is recorded in `module.calls` for assertions.
"""
from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "tensorrt_api"
_ONNX_TO_NP = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 9: np.bool_, 3: np.int8, 2: np.uint8}
_ONNX_TO_DT = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 3: "int8", 2: "uint8"}


def api_names(major: int) -> tuple[str, set[str]]:
    version, names = None, set()
    for line in (FIXTURES / f"tensorrt-{major}.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("version "):
            version = line.split()[1]
        else:
            names.add(line)
    return version, names


class _Member(int):
    """An enum member: an int with its enum's and its own name (as pybind11 enums print)."""

    def __new__(cls, api: str, name: str, value: int):
        obj = int.__new__(cls, value)
        obj.api, obj.name = api, name
        return obj

    def __repr__(self):
        return f"{self.api}.{self.name}"


ENUMS = {
    "Logger": ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"],
    "NetworkDefinitionCreationFlag": ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
    "BuilderFlag": ["FP16", "BF16", "INT8", "FP8", "TF32", "OBEY_PRECISION_CONSTRAINTS",
                    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REFIT"],
    "MemoryPoolType": ["WORKSPACE"],
    "TensorIOMode": ["NONE", "INPUT", "OUTPUT"],
    "DataType": ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"],
}
DTYPE_ALIASES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int8": "INT8", "int32": "INT32",
                 "int64": "INT64", "bool": "BOOL", "uint8": "UINT8"}
WEAK_FLAGS = {"FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}


class _Ctx:
    """What every fake object of one module shares: the documented names, the enums, the call log."""

    def __init__(self, major: int):
        self.major = major
        self.version, self.names = api_names(major)
        self.calls: list = []
        self.enums = {api: types.SimpleNamespace(**{m: _Member(api, m, i) for i, m in enumerate(members)
                                                    if f"{api}.{m}" in self.names})
                      for api, members in ENUMS.items()}
        flag = getattr(self.enums["NetworkDefinitionCreationFlag"], "STRONGLY_TYPED", None)
        self.strongly_bit = 1 << int(flag) if flag is not None else None
        self.module = None  # the fake module (dtype aliases are looked up there)


class _Guarded:
    """Attribute access limited to the documented names of `_api` (private names excepted)."""

    _api = ""

    def __init__(self, ctx: _Ctx):
        self._ctx = ctx

    def __getattribute__(self, name):
        if not name.startswith("_"):
            api = object.__getattribute__(self, "_api")
            if f"{api}.{name}" not in object.__getattribute__(self, "_ctx").names:
                raise AttributeError(f"'tensorrt.{api}' object has no attribute '{name}' "
                                     f"(not in the documented API of this TensorRT version)")
        return object.__getattribute__(self, name)


class Logger(_Guarded):
    _api = "Logger"

    def __init__(self, ctx, severity=None):
        super().__init__(ctx)
        self._severity = severity


class INetworkDefinition(_Guarded):
    _api = "INetworkDefinition"

    def __init__(self, ctx, flags):
        super().__init__(ctx)
        self._flags = flags
        self._strongly_typed = ctx.major >= 11 or (ctx.strongly_bit is not None and bool(flags & ctx.strongly_bit))
        self._onnx = self._path = None

    @property
    def num_inputs(self):
        return len(self._onnx.graph.input)

    @property
    def num_outputs(self):
        return len(self._onnx.graph.output)


class OnnxParser(_Guarded):
    _api = "OnnxParser"

    def __init__(self, ctx, network, logger):
        super().__init__(ctx)
        self._network, self._errors = network, []

    def parse_from_file(self, path):
        import onnx

        self._ctx.calls.append(("parse_from_file", str(path)))
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
        self._network._onnx, self._network._path = model, str(path)
        return True

    def parse(self, data, path=None):
        raise NotImplementedError("the fake parses files only")

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]


class IOptimizationProfile(_Guarded):
    _api = "IOptimizationProfile"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self._shapes[name] = [list(lo), list(opt), list(hi)]

    def get_shape(self, name):
        return self._shapes[name]


class ITimingCache(_Guarded):
    _api = "ITimingCache"

    def __init__(self, ctx, data):
        super().__init__(ctx)
        self._data = bytes(data) or b"fake-timing-cache"

    def serialize(self):
        return self._data

    def combine(self, other, ignore_mismatch):
        return True

    def reset(self):
        return True


class IBuilderConfig(_Guarded):
    _api = "IBuilderConfig"

    def __init__(self, ctx):
        super().__init__(ctx)
        self._flags, self._profiles, self._pools, self._cache = set(), [], {}, None

    def set_flag(self, flag):
        self._ctx.calls.append(("set_flag", repr(flag)))
        self._flags.add(flag.name)

    def clear_flag(self, flag):
        self._flags.discard(flag.name)

    def get_flag(self, flag):
        return flag.name in self._flags

    def set_memory_pool_limit(self, pool, size):
        self._pools[pool.name] = size

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, data):
        return ITimingCache(self._ctx, data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache


class Builder(_Guarded):
    _api = "Builder"

    def __init__(self, ctx, logger):
        super().__init__(ctx)
        self._logger = logger

    def create_network(self, flags=0):
        self._ctx.calls.append(("create_network", int(flags)))
        return INetworkDefinition(self._ctx, flags)

    def create_builder_config(self):
        return IBuilderConfig(self._ctx)

    def create_optimization_profile(self):
        return IOptimizationProfile(self._ctx)

    def build_serialized_network(self, network, config):
        self._ctx.calls.append(("build_serialized_network", network._path))
        if network._strongly_typed and config._flags & WEAK_FLAGS:
            return None  # 10.x: precision flags are an error on a strongly typed network
        inputs = [i.name for i in network._onnx.graph.input]
        if len(config._profiles) != 1 or set(config._profiles[0]._shapes) != set(inputs):
            return None  # every dynamic input needs a profile
        return json.dumps({"onnx": network._path, "profile": config._profiles[0]._shapes,
                           "strongly_typed": network._strongly_typed, "flags": sorted(config._flags),
                           "version": self._ctx.version}).encode()


class ICudaEngine(_Guarded):
    _api = "ICudaEngine"

    def __init__(self, ctx, plan):
        import onnx
        import onnxruntime as ort

        super().__init__(ctx)
        self._plan = plan
        model = onnx.load(plan["onnx"], load_external_data=False)
        self._io = [(i.name, "INPUT", i.type.tensor_type) for i in model.graph.input] + \
                   [(o.name, "OUTPUT", o.type.tensor_type) for o in model.graph.output]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(plan["onnx"], sess_options=opts, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self):
        return len(self._io)

    def get_tensor_name(self, i):
        return self._io[i][0]

    def _entry(self, name):
        return next(e for e in self._io if e[0] == name)

    def get_tensor_mode(self, name):
        return getattr(self._ctx.enums["TensorIOMode"], self._entry(name)[1])

    def get_tensor_dtype(self, name):
        return getattr(self._ctx.module, _ONNX_TO_DT[self._entry(name)[2].elem_type])

    def get_tensor_shape(self, name):
        return tuple(d.dim_value if d.dim_value else -1 for d in self._entry(name)[2].shape.dim)

    def create_execution_context(self):
        return IExecutionContext(self._ctx, self)

    def serialize(self):
        return json.dumps(self._plan).encode()

    @property
    def num_optimization_profiles(self):
        return 1


class IExecutionContext(_Guarded):
    _api = "IExecutionContext"

    def __init__(self, ctx, engine):
        super().__init__(ctx)
        self._engine, self._shapes, self._addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self._engine._plan["profile"][name]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise RuntimeError(f"fake tensorrt: {name} shape {tuple(shape)} outside the profile {lo}..{hi}")
        self._shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self._addresses[name] = int(ptr)
        return True

    def get_tensor_address(self, name):
        return self._addresses[name]

    def get_tensor_shape(self, name):
        if name in self._shapes:
            return self._shapes[name]
        # output dims named like input dims (the exporter's dynamic axes) take their values
        sizes = {}
        for n, mode, tt in self._engine._io:
            if mode == "INPUT" and n in self._shapes:
                sizes.update({d.dim_param: v for d, v in zip(tt.shape.dim, self._shapes[n]) if d.dim_param})
        return tuple(d.dim_value or sizes[d.dim_param] for d in self._engine._entry(name)[2].shape.dim)

    def _array(self, name, shape, elem_type):
        dtype = np.dtype(_ONNX_TO_NP[elem_type])
        raw = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self._addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream_handle):
        self._ctx.calls.append(("execute_async_v3", Path(self._engine._plan["onnx"]).parent.name))
        io = self._engine._io
        feeds = {n: self._array(n, self._shapes[n], tt.elem_type).copy() for n, mode, tt in io if mode == "INPUT"}
        outs = self._engine._session.run(None, feeds)
        for (n, _, tt), value in zip([e for e in io if e[1] == "OUTPUT"], outs):
            np.copyto(self._array(n, self.get_tensor_shape(n), tt.elem_type), value)
        return True

    def set_optimization_profile_async(self, index, stream):
        return True


class Runtime(_Guarded):
    _api = "Runtime"

    def __init__(self, ctx, logger):
        super().__init__(ctx)
        self._logger = logger

    def deserialize_cuda_engine(self, data):
        self._ctx.calls.append(("deserialize_cuda_engine", len(data)))
        return ICudaEngine(self._ctx, json.loads(bytes(data).decode()))


def _entry_point(cls, ctx):
    """The module-level class users call (trt.Builder(logger)): binds the shared context."""
    bound = type(cls._api, (cls,), {"__init__": lambda self, *a: cls.__init__(self, ctx, *a)})
    for name, member in vars(ctx.enums.get(cls._api, types.SimpleNamespace())).items():
        setattr(bound, name, member)  # Logger.WARNING and friends
    return bound


def make_fake_tensorrt(major: int) -> types.ModuleType:
    ctx = _Ctx(major)
    mod = types.ModuleType("tensorrt")
    ctx.module, mod.calls, mod.__version__ = mod, ctx.calls, ctx.version
    for cls in (Logger, Builder, OnnxParser, Runtime):
        if cls._api in ctx.names:
            setattr(mod, cls._api, _entry_point(cls, ctx))
    for api, enum in ctx.enums.items():
        if api in ctx.names and api != "Logger":
            setattr(mod, api, enum)
    for short, member in DTYPE_ALIASES.items():
        if short in ctx.names:
            setattr(mod, short, getattr(ctx.enums["DataType"], member))
    return mod
