"""TensorRT engine build from an exported ONNX graph: optimisation profiles over batch
and image size, a timing cache, and an on-disk engine cache keyed by everything that
makes an engine valid (graph file hash, profile shapes, precision, TensorRT version,
GPU name) — NVIDIA's diffusion demo's export → build → cache → run split.

The profile and key computations are pure Python (tested everywhere); `build_engine`
needs TensorRT 10 or 11 and a CUDA GPU, and says so when they are missing. Networks are
strongly typed: precision comes from the exported ONNX graph (an fp16 export gives an
fp16 engine), as TensorRT 11 requires (it removed `BuilderFlag.FP16/BF16`); the only
flag set is TF32 for fp32 graphs, and only where `BuilderFlag` has it. Written against
the documented Python API of both majors: `trt.Builder`, `create_network(flags)`,
`NetworkDefinitionCreationFlag.STRONGLY_TYPED` (10.x; accepted on 11.x, where every
network is strongly typed), `OnnxParser`, `create_builder_config`,
`add_optimization_profile`, `create_timing_cache` / `set_timing_cache`,
`build_serialized_network`. tests/test_trt_api.py runs this whole file, and the runtime,
against fakes of both majors built from their documented attribute lists.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sasi_online.engines.availability import BackendUnavailable, gpu_name, require_tensorrt
from sasi_online.engines.export import graph_files_sha256, load_spec, onnx_path
from sasi_online.engines.graphs import GraphSpec
from sasi_online.errors import UserInputError
from sasi_online.utils import atomic_write_bytes, atomic_write_json

Triple = tuple[int, int, int]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

KEY_VERSION = 2  # bump when the key's meaning changes (2: strongly typed networks)


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of the batch the graph sees and of the image size in pixels.

    With classifier-free guidance a UNet sees twice the image batch: pass `cfg=True` to
    `for_images` and it doubles the batch, as the TensorRT demo does.
    """

    batch: Triple
    height: Triple
    width: Triple

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            lo, opt, hi = getattr(self, name)
            if not (1 <= lo <= opt <= hi):
                raise UserInputError(f"profile {name} must satisfy 1 <= min <= opt <= max, got {(lo, opt, hi)}")

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> "ShapeRange":
        return cls((batch,) * 3, (height,) * 3, (width,) * 3)

    @classmethod
    def for_images(cls, batch: Triple, height: Triple, width: Triple, cfg: bool = True) -> "ShapeRange":
        k = 2 if cfg else 1
        return cls(tuple(k * b for b in batch), height, width)  # type: ignore[arg-type]

    @property
    def is_static(self) -> bool:
        return all(len(set(getattr(self, n))) == 1 for n in ("batch", "height", "width"))


def compute_profile(spec: GraphSpec, shapes: ShapeRange) -> Profile:
    """{input name: (min shape, opt shape, max shape)} for one optimisation profile."""
    corners = [spec.input_shapes(shapes.batch[i], shapes.height[i], shapes.width[i]) for i in range(3)]
    return {name: (corners[0][name], corners[1][name], corners[2][name]) for name in spec.input_names}


def engine_cache_key(*, onnx_sha256: str, profile: Profile, trt_version: str, gpu: str,
                     precision: str = "fp16", extra: dict[str, Any] | None = None) -> str:
    """A short stable hash of everything an engine depends on; any change → a new engine."""
    payload = {
        "key_version": KEY_VERSION,
        "onnx_sha256": onnx_sha256,
        "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())},
        "tensorrt": str(trt_version),
        "gpu": str(gpu),
        "precision": precision,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def engine_path(cache_dir: str | Path, name: str, key: str) -> Path:
    return Path(cache_dir) / f"{name}-{key}.plan"


def timing_cache_path(cache_dir: str | Path, trt_version: str, gpu: str) -> Path:
    # Timing measurements are only valid for one TensorRT version on one GPU model.
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    return Path(cache_dir) / f"timing-trt{trt_version}-{slug}.cache"


def _graph_sha256(folder: Path) -> str:
    """The graph's hash as recorded at export (folders are written whole, then renamed),
    so a multi-GB UNet is not re-hashed on every start; computed if the record is missing."""
    try:
        return json.loads((folder / "export.json").read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError):
        return graph_files_sha256(folder)


@dataclass(frozen=True)
class EngineBuild:
    path: Path
    key: str
    cached: bool
    seconds: float


PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network: STRONGLY_TYPED where the enum has it (10.x;
    11.x accepts it and types every network strongly anyway), else none."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def precision_flags(trt, precision: str) -> list:
    """Builder flags for `precision` that this TensorRT has. Strongly typed networks take
    their types from the graph, so FP16/BF16 are never set (10.x refuses them on a strongly
    typed network, 11.x removed them); TF32 (a math mode, not a type) speeds fp32 graphs."""
    flags = []
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        flags.append(trt.BuilderFlag.TF32)
    return flags


def _check_graph_precision(spec: GraphSpec, folder: Path, precision: str) -> None:
    want = PRECISION_DTYPES[precision]
    if spec.float_dtype != want:
        raise UserInputError(
            f"the graph in '{folder}' was exported in {spec.float_dtype}, but a {precision} engine was asked "
            f"for: TensorRT networks are strongly typed, so export the graph from a model in {want} "
            f"(generation.dtype) or ask for precision "
            f"'{next(k for k, v in PRECISION_DTYPES.items() if v == spec.float_dtype)}'")


def build_engine(onnx_folder: str | Path, shapes: ShapeRange, cache_dir: str | Path, *,
                 precision: str | None = None, workspace_gib: float | None = None,
                 name: str | None = None) -> EngineBuild:
    """Build (or find in the cache) the engine of an exported graph for `shapes`.

    `precision` defaults to the graph's own float type and must match it when given."""
    trt = require_tensorrt()
    folder = Path(onnx_folder)
    spec = load_spec(folder)
    if spec.float_dtype not in PRECISION_DTYPES.values():
        raise UserInputError(f"the graph in '{folder}' has float type {spec.float_dtype}; TensorRT engines "
                             f"here are fp32, fp16 or bf16")
    precision = precision or next(k for k, v in PRECISION_DTYPES.items() if v == spec.float_dtype)
    if precision not in PRECISION_DTYPES:
        raise UserInputError(f"precision '{precision}' is not one of {', '.join(PRECISION_DTYPES)}")
    _check_graph_precision(spec, folder, precision)
    name = name or folder.name
    profile = compute_profile(spec, shapes)
    gpu = gpu_name()
    key = engine_cache_key(onnx_sha256=_graph_sha256(folder), profile=profile,
                           trt_version=trt.__version__, gpu=gpu, precision=precision)
    path = engine_path(cache_dir, name, key)
    if path.is_file():
        return EngineBuild(path, key, True, 0.0)
    t0 = time.perf_counter()
    serialized, timing = _build(trt, folder, profile, precision, workspace_gib,
                                timing_cache_path(cache_dir, trt.__version__, gpu))
    atomic_write_bytes(path, serialized)
    atomic_write_bytes(timing_cache_path(cache_dir, trt.__version__, gpu), timing)
    seconds = time.perf_counter() - t0
    atomic_write_json(path.with_suffix(".json"), {
        "graph": str(folder), "name": name, "key": key, "tensorrt": trt.__version__, "gpu": gpu,
        "precision": precision, "strongly_typed": True, "seconds": round(seconds, 2),
        "profile": {k: [list(s) for s in v] for k, v in profile.items()},
    })
    return EngineBuild(path, key, False, seconds)


def _build(trt, folder: Path, profile: Profile, precision: str, workspace_gib: float | None,
           tc_path: Path) -> tuple[bytes, bytes]:
    """One strongly typed build; returns (serialized engine, serialized timing cache)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path(folder))):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserInputError(f"TensorRT could not parse '{onnx_path(folder)}': {errors}")
    config = builder.create_builder_config()
    for flag in precision_flags(trt, precision):
        config.set_flag(flag)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    for input_name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(input_name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    timing_cache = config.create_timing_cache(tc_path.read_bytes() if tc_path.is_file() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"TensorRT failed to build an engine for '{folder}' (see its log above); "
                                 f"try precision='fp32' or a narrower profile")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())
