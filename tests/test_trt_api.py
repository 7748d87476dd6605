"""TensorRT 10 and 11: the whole build -> cache -> run sequence of sasi_online.engines against
a fake `tensorrt` of each major, built from the committed lists of that version's documented
Python API (tests/fixtures/tensorrt_api/, sources named in each file). A name a version does
not have (BuilderFlag.FP16 on 11.x) fails here, not on a user's GPU after minutes of export."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fake_tensorrt import api_names, make_fake_tensorrt  # noqa: E402

from sasi_online.engines import availability  # noqa: E402
from sasi_online.engines.availability import BackendUnavailable  # noqa: E402
from sasi_online.errors import UserInputError  # noqa: E402

ATOL = 1e-4  # onnxruntime vs torch on the tiny models (measured ~1e-6)


@pytest.fixture(scope="module")
def models(tiny_zoo):
    from sasi_online.zoo import load_controlnet, load_sd_pipeline

    pipe = load_sd_pipeline(tiny_zoo / "sd15")
    return pipe.unet.eval(), load_controlnet(tiny_zoo / "controlnet-sd15-seg").eval()


def _install(monkeypatch, major: int):
    fake = make_fake_tensorrt(major)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    # the fake runs engines on CPU tensors; the GPU checks are the only thing stood in for
    from sasi_online.engines import trt_build

    monkeypatch.setattr(availability, "cuda_available", lambda: True)
    monkeypatch.setattr(trt_build, "gpu_name", lambda: "Fake GPU")
    return fake


def test_attribute_lists_differ_where_the_migration_guide_says():
    v10, names10 = api_names(10)
    v11, names11 = api_names(11)
    assert v10.startswith("10.") and v11.startswith("11.")
    removed = names10 - names11
    assert {"BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8"} <= removed
    assert not names11 - names10  # nothing the engines use was added in 11.x
    fake = make_fake_tensorrt(11)
    with pytest.raises(AttributeError):
        fake.BuilderFlag.FP16  # what trt_build.py used to set: the build died here on 11.x
    assert make_fake_tensorrt(10).BuilderFlag.FP16 is not None


@pytest.mark.parametrize("major", [10, 11])
def test_build_cache_run_on_each_major(models, tmp_path, monkeypatch, major):
    from sasi_online.engines.backends import BackendRequest, select_backend

    unet, controlnet = models
    fake = _install(monkeypatch, major)
    loads = []
    request = BackendRequest(engine_dir=tmp_path, batch=(4, 4, 4), height=(64, 64, 64), width=(64, 64, 64),
                             text_len=77)
    backend = select_backend("tensorrt", unet, controlnet_loader=lambda: loads.append(1) or controlnet,
                             request=request)
    assert backend.fuses_controlnet and not loads and not fake.calls  # nothing built before first use
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor(501.0)
    text = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g)
    control = torch.rand(4, 3, 64, 64, generator=g)
    with torch.no_grad():
        want_plain = unet(x, t, text, return_dict=False)[0]
        down, mid = controlnet(x, t, text, controlnet_cond=control, conditioning_scale=0.7, return_dict=False)
        want_fused = unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                          return_dict=False)[0]
        got_plain = backend(x, t, text)
        assert not loads  # image/noise prompts never load the ControlNet
        got_fused = backend.controlled(x, t, text, control, 0.7)
    assert loads == [1] and backend.built == ["unet", "unet_controlnet"]
    assert (got_plain - want_plain).abs().max() < ATOL
    assert (got_fused - want_fused).abs().max() < ATOL
    # the plain UNet graph has no residual inputs: each graph exported once, for one job
    spec = json.loads((tmp_path / "unet" / "spec.json").read_text())
    assert not spec["with_residuals"] and spec["float_dtype"] == "float32"
    networks = [c[1] for c in fake.calls if c[0] == "create_network"]
    strongly = 1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert networks == [strongly, strongly]  # strongly typed, both majors
    flags = [c[1] for c in fake.calls if c[0] == "set_flag"]
    assert flags == ["BuilderFlag.TF32"] * 2  # an fp32 graph: TF32 only, never FP16/BF16
    assert "static profile" in backend.reason and "from cache" not in backend.reason
    engines = sorted(p.name for p in (tmp_path / "tensorrt").glob("*.plan"))
    assert len(engines) == 2 and any(p.name.startswith("timing-trt") for p in (tmp_path / "tensorrt").iterdir())

    # a second run with the same weights and profile: engines come from the cache, no build
    builds = sum(c[0] == "build_serialized_network" for c in fake.calls)
    again = select_backend("tensorrt", unet, controlnet_loader=lambda: controlnet, request=request)
    with torch.no_grad():
        assert (again.controlled(x, t, text, control, 0.7) - want_fused).abs().max() < ATOL
    assert sum(c[0] == "build_serialized_network" for c in fake.calls) == builds
    assert "from cache" in again.reason
    # a batch outside the static profile is refused by the engine, not run wrongly
    with pytest.raises(RuntimeError, match="outside the profile"), torch.no_grad():
        again.controlled(x[:2], t, text[:2], control[:2], 0.7)


def test_precision_comes_from_the_graph(models, tmp_path, monkeypatch):
    from sasi_online.engines.export import export_graph, unet_graph
    from sasi_online.engines.trt_build import ShapeRange, build_engine

    _install(monkeypatch, 11)
    module, spec = unet_graph(models[0], with_residuals=False, text_len=77)
    folder = export_graph(module, spec, tmp_path, "unet", batch=2, height=64, width=64)
    with pytest.raises(UserInputError, match="exported in float32, but a fp16 engine"):
        build_engine(folder, ShapeRange.static(2, 64, 64), tmp_path / "trt", precision="fp16")
    assert not build_engine(folder, ShapeRange.static(2, 64, 64), tmp_path / "trt").cached

    # an fp16 model exports an fp16 graph, built as an fp16 engine with no precision flag at all
    import copy

    import onnx

    fake = _install(monkeypatch, 10)
    module, spec = unet_graph(copy.deepcopy(models[0]).half(), with_residuals=False, text_len=77)
    folder = export_graph(module, spec, tmp_path, "unet16", batch=2, height=64, width=64)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT16}
    built = build_engine(folder, ShapeRange.static(2, 64, 64), tmp_path / "trt")
    assert json.loads(built.path.with_suffix(".json").read_text())["precision"] == "fp16"
    assert not [c for c in fake.calls if c[0] == "set_flag"]


@pytest.mark.parametrize("version,match", [("9.3.0", "too old"), ("12.0.1", "newer than")])
def test_tensorrt_outside_10_and_11_is_refused(monkeypatch, version, match):
    fake = make_fake_tensorrt(10)
    fake.__version__ = version
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(availability, "cuda_available", lambda: True)
    with pytest.raises(BackendUnavailable, match=f"{match}.*tensorrt>=10,<12"):
        availability.require_tensorrt()


def test_gpu_extra_pins_tensorrt_10_or_11():
    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"tensorrt>=10,<12"' in text and "torch-tensorrt==" in text
    assert availability.TRT_PIN == ">=10,<12" and availability.TRT_MAJORS == (10, 11)


def test_generator_runs_tensorrt_engines_on_padded_static_batches(tiny_zoo, tmp_path, monkeypatch):
    """The product path: generation.backend=tensorrt with padded batches -> one static profile
    (so CUDA graphs would capture on a GPU), the fused engine for mask prompts, the plain one
    for noise prompts, both from one export each; images as the eager loop makes them."""
    import numpy as np

    from sasi_online.config import Config
    from sasi_online.generation import SASIGenerator
    from sasi_online.visual.prompts import VisualPrompt

    fake = _install(monkeypatch, 11)
    cfg = Config()
    cfg.models.root = str(tiny_zoo)
    g = cfg.generation
    g.family, g.steps, g.resolution, g.batch_size = "sd15", 2, 64, 2
    mask = (np.random.default_rng(0).integers(0, 4, (8, 8, 1)) * 60).repeat(8, 0).repeat(8, 1).repeat(3, 2)
    vps = [VisualPrompt(kind="mask", init_image=None, control_image=mask.astype(np.uint8), seed=0)] * 3 + [None]
    prompts, seeds = ["a cat", "a dog", "a tree", "a shirt"], [1, 2, 3, 4]
    want = SASIGenerator.from_config(cfg.models, g).generate(prompts, vps, seeds)
    g.backend, g.engine_dir = "tensorrt", str(tmp_path)
    gen = SASIGenerator.from_config(cfg.models, g)
    got = gen.generate(prompts, vps, seeds)  # 3 mask images: batches of 2 and 1 (padded to 2)
    backend = gen._backends["sd15"]
    assert backend.built == ["unet_controlnet", "unet"] and "static profile" in backend.reason
    profiles = [json.loads(p.read_text())["profile"]["sample"] for p in (tmp_path / "sd15").glob("*/tensorrt/*.json")]  # sd15/<weights identity>/tensorrt
    assert len(profiles) == 2 and all(p[0] == p[2] == [4, 4, 8, 8] for p in profiles)  # 2 images x CFG, static
    assert sum(c[0] == "build_serialized_network" for c in fake.calls) == 2
    assert got.finite.all() and np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1
