"""Engines: ONNX export parity, the onnxruntime backend in a denoising step, backend
selection messages, TensorRT cache keys and profiles, attention choice, DeepCache,
and the GPU check's CPU smoke run. All on the tiny SD-1.5 + seg ControlNet."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sasi_online.engines import export as E
from sasi_online.engines.availability import BackendUnavailable
from sasi_online.engines.graphs import GraphSpec, unet_residual_layout, unet_spec
from sasi_online.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]

# Export shape and the OTHER shape the graphs are checked at (batch, height, width in pixels).
EXPORT_SHAPE = (2, 64, 64)
CHECK_SHAPE = (3, 96, 128)
# Measured max |onnxruntime - torch| on the tiny models was ~1e-5 (VAE) and below 1e-6
# elsewhere; the bound leaves room for other CPUs' kernels.
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_zoo):
    from sasi_online.zoo import load_controlnet, load_sd_pipeline

    pipe = load_sd_pipeline(tiny_zoo / "sd15")
    controlnet = load_controlnet(tiny_zoo / "controlnet-sd15-seg")
    return {"unet": pipe.unet.eval(), "vae": pipe.vae.eval(), "text_encoder": pipe.text_encoder.eval(),
            "tokenizer": pipe.tokenizer, "scheduler": pipe.scheduler, "controlnet": controlnet}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    b, h, w = EXPORT_SHAPE
    folders = E.export_all(out, unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"],
                           controlnet=models["controlnet"], text_len=models["tokenizer"].model_max_length,
                           batch=b, height=h, width=w, unet_with_residuals=True)
    return out, folders


def _graph(name, models):
    text_len = models["tokenizer"].model_max_length
    if name == "unet":
        return E.unet_graph(models["unet"], with_residuals=True, text_len=text_len)
    if name == "unet_controlnet":
        return E.unet_controlnet_graph(models["unet"], models["controlnet"], text_len=text_len)
    if name == "vae_decoder":
        return E.vae_decoder_graph(models["vae"])
    return E.text_encoder_graph(models["text_encoder"], text_len)


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["unet", "unet_controlnet", "vae_decoder", "text_encoder"])
def test_export_matches_torch_at_other_shapes(name, models, exported):
    import onnx

    _, folders = exported
    module, spec = _graph(name, models)
    # The batch axis (and the spatial axes of image/latent tensors) are symbolic in the graph.
    graph = onnx.load(str(folders[name] / "model.onnx"), load_external_data=False).graph
    first = graph.input[0].type.tensor_type.shape.dim
    assert first[0].dim_param, f"{name}: batch axis is static"
    inputs = E.sample_inputs(spec, *CHECK_SHAPE, seed=1)
    assert tuple(inputs[spec.input_names[0]].shape)[0] != EXPORT_SHAPE[0]
    diff = E.check_parity(folders[name], module, inputs)
    assert diff < PARITY_ATOL, f"{name}: onnxruntime differs from torch by {diff}"


def test_export_is_reused_until_the_weights_change(models, tmp_path):
    module, spec = E.text_encoder_graph(models["text_encoder"], models["tokenizer"].model_max_length)
    folder = E.export_graph(module, spec, tmp_path, batch=1, height=8, width=8)
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    meta = json.loads((folder / "export.json").read_text())
    assert E.export_graph(module, spec, tmp_path, batch=1, height=8, width=8) == folder
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp  # reused, not re-exported

    changed = type(models["text_encoder"])(models["text_encoder"].config).eval()  # fresh random weights
    module2, _ = E.text_encoder_graph(changed, models["tokenizer"].model_max_length)
    E.export_graph(module2, spec, tmp_path, batch=1, height=8, width=8)
    meta2 = json.loads((folder / "export.json").read_text())
    assert meta2["source_fingerprint"] != meta["source_fingerprint"]
    assert meta2["sha256"] != meta["sha256"]


# ----------------------------------------------------------------------------- onnxruntime backend
def test_ort_backend_in_denoising_steps_equals_eager(models, exported):
    from sasi_online.engines.backends import EagerUNet
    from sasi_online.engines.ort_backend import OrtUNetBackend
    from sasi_online.generation.loop import denoise_step

    _, folders = exported
    unet, controlnet, scheduler = models["unet"], models["controlnet"], models["scheduler"]
    ort = OrtUNetBackend(folders["unet"], folders["unet_controlnet"])
    g = torch.Generator().manual_seed(3)
    batch, size = 3, 96  # neither the export batch nor the export size
    latents0 = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    text = torch.randn(2 * batch, models["tokenizer"].model_max_length, unet.config.cross_attention_dim,
                       generator=g)
    control = torch.rand(2 * batch, 3, size, size, generator=g)

    def run(backend, use_controlnet):
        scheduler.set_timesteps(3)
        lat = latents0.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                lat = denoise_step(backend, scheduler, lat, t, text, 7.5, {},
                                   controlnet=controlnet if use_controlnet else None,
                                   control=control if use_controlnet else None, control_scale=0.8)
        return lat

    for use_controlnet in (False, True):  # zero residuals, then real ControlNet residuals
        want, got = run(EagerUNet(unet), use_controlnet), run(ort, use_controlnet)
        assert (want - got).abs().max() < PARITY_ATOL
    # The ControlNet really changes the result, so the residual path is being exercised.
    assert (run(EagerUNet(unet), True) - run(EagerUNet(unet), False)).abs().max() > 1e-3

    # The fused graph equals ControlNet + UNet called separately.
    scheduler.set_timesteps(3)
    t = scheduler.timesteps[0]
    x = torch.cat([latents0] * 2)
    with torch.no_grad():
        down, mid = controlnet(x, t, text, controlnet_cond=control, conditioning_scale=0.8, return_dict=False)
        want = EagerUNet(unet)(x, t, text, down, mid)
    got = ort.controlled(x, t, text, control, 0.8)
    assert (want - got).abs().max() < PARITY_ATOL


def test_ort_backend_refuses_residuals_its_graph_cannot_take(models, tmp_path):
    from sasi_online.engines.ort_backend import OrtUNetBackend

    module, spec = E.unet_graph(models["unet"], with_residuals=False, text_len=8)
    backend = OrtUNetBackend(E.export_graph(module, spec, tmp_path, batch=1, height=64, width=64))
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 8, models["unet"].config.cross_attention_dim)
    residuals, mid = unet_residual_layout(models["unet"].config)
    down = [torch.zeros(1, r.channels, 8 // r.factor, 8 // r.factor) for r in residuals]
    with pytest.raises(UserInputError, match="without ControlNet residual"):
        backend(x, 10, text, down, torch.zeros(1, mid.channels, 4, 4))
    with torch.no_grad():
        want = models["unet"](x, 10, text, return_dict=False)[0]
    assert (backend(x, 10, text) - want).abs().max() < PARITY_ATOL


# ----------------------------------------------------------------------------- backend selection
def test_backend_selection_says_why(models, tmp_path):
    from sasi_online.engines.backends import backend_availability, compile_mode_for, select_backend

    unet = models["unet"]
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="tensorrt .*pip install sasi_online\\[gpu\\] on a machine "
                                                     "with an NVIDIA GPU|no CUDA GPU"):
            select_backend("tensorrt", unet)
        with pytest.raises(BackendUnavailable, match="torch_tensorrt"):
            select_backend("torch_tensorrt", unet)
        mode, reason = compile_mode_for("cpu")
        assert mode == "default" and "CUDA graphs need a GPU" in reason
        listing = {a.name: a for a in backend_availability()}
        assert listing["eager"].available and listing["onnxruntime"].available
        assert not listing["tensorrt"].available and "tensorrt" in listing["tensorrt"].reason
    assert compile_mode_for("cuda")[0] == "reduce-overhead"
    with pytest.raises(UserInputError, match="backend 'tensort' is unknown; choose one of eager, compile"):
        select_backend("tensort", unet)
    with pytest.raises(UserInputError, match="needs an engine folder"):
        select_backend("onnxruntime", unet)
    from sasi_online.engines.backends import BackendRequest
    # A bad engine precision is refused before any export or TensorRT check.
    with pytest.raises(UserInputError, match="precision 'fp8' is not one of fp32, fp16, bf16"):
        select_backend("tensorrt", unet, request=BackendRequest(precision="fp8"))
    compiled = select_backend("compile", unet)
    assert compiled.name == "compile" and compiled.mode == compile_mode_for(compiled_device(unet))[0]


def compiled_device(module) -> str:
    return next(module.parameters()).device.type


def test_select_onnxruntime_runs_the_fused_graph_in_the_generator_loop(models, tmp_path):
    """The path the generator takes: select_backend with a ControlNet loader, then the loop
    hands the ControlNet call to the backend because it fuses it. Each graph is exported once,
    at its first use: the fused one for mask/mix, the plain UNet (no residual inputs) for image/noise."""
    from sasi_online.engines.backends import BackendRequest, EagerUNet, select_backend
    from sasi_online.generation.loop import denoise_step

    unet, controlnet, scheduler = models["unet"], models["controlnet"], models["scheduler"]
    request = BackendRequest(engine_dir=tmp_path, batch=(1, 4, 4), height=(64, 64, 64), width=(64, 64, 64),
                             text_len=models["tokenizer"].model_max_length)
    loads = []
    backend = select_backend("onnxruntime", unet, controlnet_loader=lambda: loads.append(1) or controlnet,
                             request=request)
    assert backend.name == "onnxruntime" and backend.fuses_controlnet and backend.built == []
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(4, request.text_len, unet.config.cross_attention_dim, generator=g)
    control = torch.rand(4, 3, 64, 64, generator=g)
    scheduler.set_timesteps(2)
    t = scheduler.timesteps[0]
    with torch.no_grad():
        want = denoise_step(EagerUNet(unet), scheduler, latents, t, text, 7.5, {}, controlnet=controlnet,
                            control=control, control_scale=1.0)
        got = denoise_step(backend, scheduler, latents, t, text, 7.5, {}, controlnet=backend,
                           control=control, control_scale=1.0)
        assert backend.built == ["unet_controlnet"] and loads == [1]  # mask/mix: the fused graph only
        assert "CPUExecutionProvider" in backend.reason
        plain_want = denoise_step(EagerUNet(unet), scheduler, latents, t, text, 7.5, {})
        plain_got = denoise_step(backend, scheduler, latents, t, text, 7.5, {})
    assert (want - got).abs().max() < PARITY_ATOL and (plain_want - plain_got).abs().max() < PARITY_ATOL
    assert backend.built == ["unet_controlnet", "unet"] and not backend.unet_graph.unet.spec.with_residuals
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet", "unet_controlnet"]  # no residual-input UNet
    # A second selection reuses the exported graphs (same weights): no re-export.
    stamp = (tmp_path / "unet_controlnet" / "model.onnx").stat().st_mtime_ns
    again = select_backend("onnxruntime", unet, controlnet=controlnet, request=request)
    with torch.no_grad():
        again.controlled(torch.cat([latents] * 2), t, text, control, 1.0)
    assert (tmp_path / "unet_controlnet" / "model.onnx").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------- TensorRT (pure parts)
def _key(**changes):
    from sasi_online.engines.trt_build import engine_cache_key

    base = dict(onnx_sha256="a" * 64, profile={"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 16, 16))},
                trt_version="10.9.0", gpu="NVIDIA H200", precision="fp16")
    base.update(changes)
    return engine_cache_key(**base)


def test_trt_cache_key_changes_with_each_component_and_is_stable_otherwise():
    key = _key()
    assert key == _key()  # stable
    two = {"sample": ((1, 4, 8, 8),) * 3, "timestep": ((1,),) * 3}
    assert _key(profile=two) == _key(profile=dict(reversed(list(two.items()))))  # order-free
    variants = [
        _key(onnx_sha256="b" * 64),
        _key(profile={"sample": ((1, 4, 8, 8), (2, 4, 8, 8), (8, 4, 16, 16))}),
        _key(trt_version="10.10.0"),
        _key(gpu="NVIDIA H100 80GB HBM3"),
        _key(precision="bf16"),
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_trt_profile_covers_batch_and_size(models):
    from sasi_online.engines.graphs import unet_controlnet_spec
    from sasi_online.engines.trt_build import ShapeRange, compute_profile

    unet = models["unet"]
    spec = unet_spec(unet.config, with_residuals=True, text_len=77)
    shapes = ShapeRange.for_images(batch=(1, 4, 8), height=(64, 128, 256), width=(64, 64, 128), cfg=True)
    assert shapes.batch == (2, 8, 16) and not shapes.is_static
    profile = compute_profile(spec, shapes)
    assert list(profile) == spec.input_names
    assert profile["sample"] == ((2, 4, 8, 8), (8, 4, 16, 8), (16, 4, 32, 16))
    assert profile["timestep"] == ((2,), (8,), (16,))
    dim = unet.config.cross_attention_dim
    assert profile["encoder_hidden_states"] == ((2, 77, dim), (8, 77, dim), (16, 77, dim))
    # Residual shapes follow the UNet's down path: the real ControlNet produces exactly these.
    x = torch.randn(8, 4, 16, 8)
    with torch.no_grad():
        down, mid = models["controlnet"](x, 10, torch.randn(8, 77, dim), controlnet_cond=torch.rand(8, 3, 128, 64),
                                         return_dict=False)
    assert [profile[f"down_residual_{i}"][1] for i in range(len(down))] == [tuple(d.shape) for d in down]
    assert profile["mid_residual"][1] == tuple(mid.shape)

    fused = compute_profile(unet_controlnet_spec(unet.config, models["controlnet"].config),
                            ShapeRange.static(2, 64, 96))
    assert fused["control_image"] == ((2, 3, 64, 96),) * 3 and fused["conditioning_scale"] == ((1,),) * 3
    with pytest.raises(UserInputError, match="min <= opt <= max"):
        ShapeRange((4, 2, 8), (64, 64, 64), (64, 64, 64))
    with pytest.raises(UserInputError, match="multiples of 2"):
        spec.input_shapes(1, 72, 64)  # a 9x8 latent cannot pass this UNet's downsampler
    assert GraphSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


def test_trt_build_says_why_it_cannot_run(exported, tmp_path):
    from sasi_online.engines.trt_build import ShapeRange, build_engine

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the unavailable message is for CPU-only machines")
    _, folders = exported
    with pytest.raises(BackendUnavailable, match="pip install sasi_online\\[gpu\\]|no CUDA GPU"):
        build_engine(folders["unet"], ShapeRange.static(2, 64, 64), tmp_path)


# ----------------------------------------------------------------------------- attention
def test_attention_on_cpu_chooses_sdpa_and_says_why(models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from sasi_online.engines.attention import configure_attention

    unet, controlnet = models["unet"], models["controlnet"]
    choice = configure_attention(unet, controlnet, "auto")
    assert choice.name == "sdpa"
    assert "xformers" in choice.reason and ("not installed" in choice.reason or "CPU" in choice.reason)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in controlnet.attn_processors.values())
    with pytest.raises(BackendUnavailable, match="attention 'xformers' was requested but xformers"):
        configure_attention(unet, controlnet, "xformers")
    with pytest.raises(UserInputError, match="unknown"):
        configure_attention(unet, controlnet, "flash")


# ----------------------------------------------------------------------------- DeepCache
def test_deepcache_shallow_step_is_exact_on_its_own_cache(models):
    from sasi_online.engines.deepcache import DeepCacheUNet

    unet, controlnet = models["unet"], models["controlnet"]
    dc = DeepCacheUNet(unet, interval=2)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        down, mid = controlnet(x, 300, text, controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
        full = dc(x, 300, text, down, mid)
        shallow = dc(x, 300, text, down, mid)  # same inputs: the cached deep feature is exact
        want = unet(x, 300, text, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0]
    assert (dc.full_steps, dc.shallow_steps) == (1, 1)
    assert torch.equal(full, want)
    assert (shallow - want).abs().max() < 1e-5
    dc.remove()
    with pytest.raises(UserInputError, match="depth must be between 1 and 1"):
        DeepCacheUNet(unet, interval=2, depth=2)  # the tiny UNet has two levels
    with pytest.raises(UserInputError, match="interval must be >= 1"):
        DeepCacheUNet(unet, interval=0)


def test_deepcache_skips_deep_blocks_with_bounded_drift(models):
    from sasi_online.engines.backends import EagerUNet
    from sasi_online.engines.deepcache import DeepCacheUNet
    from sasi_online.generation.loop import denoise_step

    unet, scheduler = models["unet"], models["scheduler"]
    deep_calls = []
    hook = unet.mid_block.register_forward_hook(lambda *a: deep_calls.append(1))
    g = torch.Generator().manual_seed(5)
    latents0 = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(4, 77, unet.config.cross_attention_dim, generator=g)
    steps = 12

    def run(backend):
        deep_calls.clear()
        scheduler.set_timesteps(steps)
        lat = latents0.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                lat = denoise_step(backend, scheduler, lat, t, text, 7.5, {})
        return lat, len(deep_calls)

    dc = DeepCacheUNet(unet, interval=3)
    try:
        full, full_calls = run(EagerUNet(unet))
        cached, cached_calls = run(dc)
        again, _ = run(dc)  # a second run resets itself (timesteps go up again)
    finally:
        hook.remove()
        dc.remove()
    assert full_calls == steps
    assert cached_calls == 4  # steps 0, 3, 6, 9 run the deep blocks
    assert (dc.full_steps, dc.shallow_steps) == (8, 16)
    assert torch.equal(cached, again)
    drift = float((cached - full).norm() / full.norm())
    # Stated bound: final latents within 10% (relative L2) of the full UNet's after 12
    # DDIM steps with interval 3 on the tiny random model (measured 0.025); and not zero,
    # or no work was skipped.
    assert 0 < drift < 0.10, drift


# ----------------------------------------------------------------------------- GPU check: generate phase
def test_generate_phase_times_the_generators_own_loop_on_cpu(tmp_path):
    """bench/gpu_phases/generate.py with --tiny: the same code as on the GPU (SASIGenerator with
    text encoder, scheduler, ControlNet and VAE, models built in memory), tiny models, a CPU."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check
    from gpu_phases import generate

    # the arguments gpu_check's own parser gives the phase (compile off: its rows are tested
    # in tests/test_gpu_check.py)
    args = gpu_check.parse_args(["--tiny", "--out", str(tmp_path), "--no-compile", "--section-seconds", "0.2",
                                 "--generate-seconds", "120"])
    rows = generate.run(args, tmp_path / "generate")
    matmul, timed = rows[0], [r for r in rows if "sasi_per_s" in r]
    assert matmul["tflops"] > 0 and "MFU denominator" in matmul["what"]
    assert [r["batch"] for r in timed] == [2, 1, 4] and {r["backend"] for r in timed} == {"eager"}
    for r in timed:
        assert r["sasi_per_s"] > 0 and r["all_finite"] and r["resolution"] == 64
        assert r["mfu"] is None and 0 < r["mfu_vs_measured_matmul"]  # a CPU has no spec peak
        assert r["tflop_per_sasi"] > 0 and r["steps"] == 2 and r["dtype"] == "float32"
    notes = {r["what"]: r.get("note", "") for r in rows if "note" in r}
    assert notes["tensorrt"].startswith("not tried") and "compile off" in notes["compile batch 2"]
    assert not any("error" in r for r in rows)
