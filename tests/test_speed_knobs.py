"""Speed knobs: the fused CFG + step inside the generator's loop, DeepCache per batch,
shared-model settings, and the speed/drift bench (drift measure and a tiny run)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sasi_online.config import Config
from sasi_online.errors import UserInputError
from sasi_online.generation import SASIGenerator, loop
from sasi_online.generation.schedulers import make_scheduler

REPO = Path(__file__).resolve().parents[1]


def _bench():
    """bench/ is a folder of scripts, not a package: load the module from its file."""
    if "bench_speed_knobs" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_speed_knobs", REPO / "bench" / "bench_speed_knobs.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["bench_speed_knobs"]


def _cfg(root, **gen):
    cfg = Config()
    cfg.models.root = str(root)
    cfg.generation.resolution = 64
    for k, v in gen.items():
        setattr(cfg.generation, k, v)
    return cfg


def test_pixel_drift_is_zero_for_itself_and_grows_with_perturbation():
    bench = _bench()
    photos = np.stack([np.asarray(p) for p in bench.sample_photos(3, 64)])
    assert photos.shape == (3, 64, 64, 3) and photos.std() > 10  # real content, not a flat fill
    assert np.array_equal(bench.pixel_drift(photos, photos), np.zeros(3))
    rng = np.random.default_rng(0)

    def noisy(sigma):
        return np.clip(photos + rng.normal(0, sigma, photos.shape), 0, 255).astype(np.uint8)

    small, large = bench.pixel_drift(noisy(4), photos), bench.pixel_drift(noisy(30), photos)
    assert (small > 0).all() and (large > 2 * small).all()
    # a half-size image is upsampled before comparing: close to, but not, the original
    half = np.stack([np.asarray(p) for p in bench.sample_photos(3, 32)])
    up = bench.pixel_drift(half, photos)
    other = bench.pixel_drift(photos[::-1], photos)
    assert (up > 0).all() and up.mean() < other[[0, 2]].mean() / 2
    with pytest.raises(ValueError, match="equal N"):
        bench.pixel_drift(photos[:2], photos)


@pytest.mark.parametrize("scheduler,family", [("ddpm", "sd15"), ("ddim", "sd21")])
def test_fused_step_equals_unfused_on_latents(tiny_zoo, scheduler, family):
    from sasi_online.engines.backends import EagerUNet
    from sasi_online.kernels import dispatch

    cfg = _cfg(tiny_zoo, family=family)
    fam = SASIGenerator.from_config(cfg.models, cfg.generation).family(family)
    backend = EagerUNet(fam.unet)
    text = loop.encode_text(fam.tokenizer, fam.text_encoder, ["a cat", "a red shirt"], ["", ""], torch.device("cpu"))
    shape = (2, 4, 8, 8)

    def run(fused: bool, seeds=(3, 4)):
        sched = make_scheduler(scheduler, fam.scheduler_config)
        sched.set_timesteps(5)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        latents = loop.init_latents(sched, fam.vae, shape, gens, torch.device("cpu"), torch.float32)
        extra = loop.step_kwargs(sched, gens)  # DDPM draws its step noise from these
        with torch.inference_mode():
            for t in sched.timesteps:
                latents = loop.denoise_step(backend, sched, latents, t, text, 7.5, extra, fused=fused)
        return latents

    def whole_loop(fused: bool):  # loop.denoise: DDPM's step noise drawn ahead, uploaded once
        sched = make_scheduler(scheduler, fam.scheduler_config)
        sched.set_timesteps(5, device="cpu")
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        latents = loop.init_latents(sched, fam.vae, shape, gens, torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            return loop.denoise(backend, sched, latents, sched.timesteps, text, 7.5, loop.step_kwargs(sched, gens),
                                fused=fused)

    assert loop.fused_step_problem(make_scheduler(scheduler, fam.scheduler_config)) is None
    dispatch._last.pop("guided_step", None)
    unfused = run(False)
    assert dispatch.last_choice("guided_step") is None  # scheduler.step ran, not the kernel
    fused = run(True)
    assert dispatch.last_choice("guided_step").backend == "torch"  # the CPU reference of the kernel
    # float32 rounding only: 1e-5 relative (the random tiny UNet drives latents to ~10)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_loop(True), unfused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_loop(False), unfused, rtol=1e-5, atol=1e-5)
    assert (run(True, seeds=(5, 6)) - fused).abs().mean() > 0.1  # the seeds matter: not a constant
    multistep = make_scheduler("dpmsolver++", fam.scheduler_config)
    assert "not DDPM/DDIM" in loop.fused_step_problem(multistep)


def test_deep_cache_starts_every_batch_with_a_full_unet(tiny_zoo):
    # One step per batch repeats the same timestep, which DeepCache alone cannot tell
    # from the next step of the same run: the generator resets it per batch.
    cfg = _cfg(tiny_zoo, family="sd21", steps=1, deep_cache_interval=2)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    gen.generate(["a cat"], [None], [1])
    second = gen.generate(["a dog"], [None], [2]).images
    fresh = SASIGenerator.from_config(cfg.models, cfg.generation).generate(["a dog"], [None], [2]).images
    deep = gen._backends["sd21"]
    assert type(deep).__name__ == "DeepCacheUNet"  # the eager UNet really is wrapped
    assert deep.full_steps == 2 and deep.shallow_steps == 0
    assert np.array_equal(second, fresh)


def test_with_settings_shares_models_and_applies_changes(tiny_zoo):
    cfg = _cfg(tiny_zoo, family="sd15", steps=2)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    fam = gen.family("sd15")
    fast = gen.with_settings(resolution=32, deep_cache_interval=2)
    assert fast.family("sd15") is fam  # no second load
    assert fast.cfg.resolution == 32 and gen.cfg.resolution == 64  # the original is untouched
    assert type(fast._backends["sd15"]).__name__ == "DeepCacheUNet"
    assert fast.generate(["a cat"], [None], [1]).images.shape == (1, 32, 32, 3)
    with pytest.raises(UserInputError, match="resolution=40"):
        gen.with_settings(resolution=40)
    with pytest.raises(UserInputError, match="stepz"):
        gen.with_settings(stepz=3)


def test_tiny_bench_run_writes_speed_and_drift_rows(tiny_zoo, tmp_path):
    bench = _bench()
    report = bench.run_bench(tiny_zoo, tmp_path, images=2, ref_steps=4, knobs=("strength", "fused"),
                             strengths=(0.5,), fused_schedulers=("ddim",), warmup=False, progress=False)
    saved = json.loads((tmp_path / "speed_knobs.json").read_text())
    assert saved["rows"] == report["rows"]
    rows = {r["name"]: r for r in saved["rows"]}
    assert list(rows) == ["reference", "strength 0.5", "ddim 4 steps, fused step off",
                          "ddim 4 steps, fused step on"]
    for r in rows.values():
        assert r["sasi_per_s"] > 0 and r["speedup"] > 0 and r["all_finite"]
        assert 0 <= r["pixel_drift"] <= r["pixel_drift_max"] <= 1 and -1 <= r["clip_cosine"] <= 1.0001
    ref = rows["reference"]
    assert ref["pixel_drift"] == 0 and ref["speedup"] == 1.0 and ref["clip_cosine"] > 0.9999
    assert (ref["scheduler"], ref["steps"], ref["strength"], ref["batch_size"]) == ("dpmsolver++", 4, 1.0, 1)
    assert rows["strength 0.5"]["strength"] == 0.5 and rows["strength 0.5"]["pixel_drift"] > 0.005
    off, on = rows["ddim 4 steps, fused step off"], rows["ddim 4 steps, fused step on"]
    assert (off["fused_step"], on["fused_step"]) == (False, True)
    assert abs(off["pixel_drift"] - on["pixel_drift"]) < 1 / 255  # same images either way
    assert saved["reference_again_sasi_per_s"] > 0
    table = (tmp_path / "speed_knobs.md").read_text()
    assert "| ddim 4 steps, fused step on | fused |" in table and "CLIP cosine" in table
    assert (tmp_path / "speed_knobs.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserInputError, match="--knobs"):
        bench.run_bench(tiny_zoo, tmp_path, knobs=("warp",), use_clip=False, progress=False)


# ----------------------------------------------------------------------------- GPU-true loop
class DeviceTrap(torch.Tensor):
    """Stands for device memory on a CPU: reading it back to the host raises. Every tensor
    computed from a trap is a trap (torch's subclass propagation)."""

    BANNED = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy,
              torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
              torch.Tensor.nonzero, torch.Tensor.__repr__, torch.Tensor.__format__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.BANNED:
            raise AssertionError(f"host sync inside the denoising loop: Tensor.{func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def _trap(x):
    return x.as_subclass(DeviceTrap)


@pytest.mark.parametrize("scheduler,family,kind", [("dpmsolver++", "sd15", "mask"), ("ddim", "sd21", "noise"),
                                                   ("ddpm", "sd15", "noise")])
def test_denoising_loop_never_reads_the_device(tiny_zoo, scheduler, family, kind):
    from sasi_online.engines.backends import EagerUNet

    cfg = _cfg(tiny_zoo, family=family)
    fam = SASIGenerator.from_config(cfg.models, cfg.generation).family(family)
    text = loop.encode_text(fam.tokenizer, fam.text_encoder, ["a cat", "a dog"], ["", ""], torch.device("cpu"))
    sched = make_scheduler(scheduler, fam.scheduler_config)
    sched.set_timesteps(3, device="cpu")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    latents = loop.init_latents(sched, fam.vae, (2, 4, 8, 8), gens, torch.device("cpu"), torch.float32)
    controlnet = fam.controlnet if kind == "mask" else None
    control = _trap(torch.rand(4, 3, 64, 64)) if kind == "mask" else None
    with torch.inference_mode():
        out = loop.denoise(EagerUNet(fam.unet), sched, _trap(latents), sched.timesteps, _trap(text), 7.5,
                           loop.step_kwargs(sched, gens), controlnet=controlnet, control=control, fused=True)
        assert isinstance(out, DeviceTrap)  # the trap really rode through every step
        assert torch.isfinite(out.as_subclass(torch.Tensor)).all()
        # the control experiment: stepping on the device timestep (what the fused kernel's
        # t.item() used to do) is caught
        sched.set_timesteps(3, device="cpu")
        t_dev = _trap(sched.timesteps.clone())
        with pytest.raises((AssertionError, UserInputError)):
            loop.denoise_step(EagerUNet(fam.unet), sched, _trap(latents), t_dev[0], _trap(text), 7.5,
                              loop.step_kwargs(sched, gens), fused=True)


def test_padded_batches_match_unpadded_and_keep_one_shape(tiny_zoo):
    shapes = []

    def record(backend):
        def call(sample, t, states, down=None, mid=None):
            shapes.append(sample.shape[0])
            return backend(sample, t, states, down, mid)
        return call

    def run(pad):
        cfg = _cfg(tiny_zoo, family="sd15", steps=3, batch_size=3, pad_batches=pad)
        gen = SASIGenerator.from_config(cfg.models, cfg.generation, backend_hook=record)
        gen.family("sd15")
        decoded = []
        decoder = gen._decoders["sd15"]
        gen._decoders["sd15"] = lambda latents: decoded.append(decoder(latents)) or decoded[-1]
        shapes.clear()
        result = gen.generate(["a cat", "a red shirt", "a dog", "a tree"], [None] * 4, [5, 6, 7, 8])
        return result, torch.cat(decoded), list(shapes)

    plain, plain_images, plain_shapes = run("off")
    padded, padded_images, padded_shapes = run("on")
    assert plain_shapes == [6] * 3 + [2] * 3  # 3 + 1 images, CFG doubles
    assert padded_shapes == [6] * 6  # one static shape for the whole run
    assert padded.images.shape == plain.images.shape == (4, 64, 64, 3)
    real = torch.cat([padded_images[:3], padded_images[3:4]])  # the padding rows were dropped
    torch.testing.assert_close(real, plain_images, rtol=0, atol=1e-5)
    assert np.array_equal(padded.finite, plain.finite)


@pytest.mark.slow
def test_compiled_step_and_decoder_match_eager(tiny_zoo):
    """ControlNet + UNet compiled as one graph (mask prompts), channels_last, fused QKV, the
    decoder compiled (the tiny autoencoder: the same Decoder path as the VAE, a fraction of its
    inductor build on a CPU): the same images as the eager loop (inductor reorders float sums).
    ~110 s of CPU on a 2-core machine, most of it gcc building inductor's kernels."""
    from sasi_online.engines.backends import CompiledStep

    real = [np.random.default_rng(0).integers(0, 4, (8, 8, 1)).repeat(8, 0).repeat(8, 1).repeat(3, 2)
            .astype(np.uint8) * 60]
    from sasi_online.visual.prompts import VisualPrompt

    vps = [VisualPrompt(kind="mask", init_image=None, control_image=real[0], seed=0)]
    eager_cfg = _cfg(tiny_zoo, family="sd15", steps=2, batch_size=1, decoder="tiny")
    want = SASIGenerator.from_config(eager_cfg.models, eager_cfg.generation).generate(["a cat"], vps, [3])
    cfg = _cfg(tiny_zoo, family="sd15", steps=2, batch_size=1, backend="compile", channels_last="on",
               fuse_qkv=True, decoder="tiny")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    got = gen.generate(["a cat"], vps, [3])
    backend = gen._backends["sd15"]
    assert isinstance(backend, CompiledStep) and backend._fused is not None  # the fused graph ran
    assert backend.options["conv_1x1_as_mm"] and not backend.options["epilogue_fusion"]
    assert "compiled" in gen._decoders["sd15"].name
    assert gen.attention.startswith("attention: sdpa") and "QKV projections fused" in gen.attention
    assert fam_is_channels_last(gen.family("sd15").unet)
    assert got.finite.all()
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def fam_is_channels_last(module) -> bool:
    w = module.conv_in.weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_tiny_decoder_is_diffusers_autoencoder_tiny(tiny_zoo):
    from diffusers import AutoencoderTiny

    cfg = _cfg(tiny_zoo, family="sd21", steps=2, decoder="tiny")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    gen.family("sd21")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tiny = AutoencoderTiny.from_pretrained(str(tiny_zoo / "taesd"), local_files_only=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(gen._decoders["sd21"](latents), tiny.decode(latents, return_dict=False)[0])
    assert gen.generate(["a cat"], [None], [1]).images.shape == (1, 64, 64, 3)
    with pytest.raises(UserInputError, match="generation.decoder"):
        bad = _cfg(tiny_zoo, family="sd21", decoder="taesd")
        SASIGenerator.from_config(bad.models, bad.generation).family("sd21")
