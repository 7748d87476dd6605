"""The generator's own loop against diffusers' pipelines, samplers, batching, NaN retries."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sasi_online.config import Config
from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.generation import SASIGenerator
from sasi_online.generation.schedulers import SCHEDULER_NAMES, make_scheduler

RES, STEPS = 64, 4
# diffusers' pipelines and our loop run the same float ops; after uint8 rounding we allow
# 2/255 for batched-vs-per-image VAE encoding and ControlNet summation order.
TOL = 2

from sasi_online.visual.prompts import VisualPrompt


def _images(seed: int, n: int = 2):
    rng = np.random.default_rng(seed)
    real = [Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)) for _ in range(n)]
    masks = [Image.fromarray((rng.integers(0, 4, (8, 8, 1)) * 60).repeat(8, 0).repeat(8, 1)
                             .repeat(3, 2).astype(np.uint8)) for _ in range(n)]
    return real, masks


def _vps(kind, real, masks):
    return [VisualPrompt(kind=kind, init_image=real[i] if kind in ("image", "mix") else None,
                         control_image=masks[i] if kind in ("mask", "mix") else None, seed=0)
            for i in range(len(real))]


def _cfg(root, **gen):
    cfg = Config()
    cfg.models.root = str(root)
    cfg.generation.steps = STEPS
    cfg.generation.resolution = RES
    for k, v in gen.items():
        setattr(cfg.generation, k, v)
    return cfg


@pytest.fixture(scope="module")
def generators(tiny_zoo):
    """One generator per forced family (sd15 = epsilon, sd21 = v-prediction)."""
    return {fam: SASIGenerator.from_config(_cfg(tiny_zoo, family=fam).models, _cfg(tiny_zoo, family=fam).generation)
            for fam in ("sd15", "sd21")}


def _reference(fam, kind, scheduler, prompts, real, masks, seeds, guidance=7.5):
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline,
                           StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

    parts = dict(vae=fam.vae, text_encoder=fam.text_encoder, tokenizer=fam.tokenizer, unet=fam.unet,
                 scheduler=make_scheduler(scheduler, fam.scheduler_config), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    kw = dict(prompt=prompts, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np",
              generator=[torch.Generator().manual_seed(s) for s in seeds])
    if kind == "noise":
        out = StableDiffusionPipeline(**parts)(height=RES, width=RES, **kw)
    elif kind == "image":
        out = StableDiffusionImg2ImgPipeline(**parts)(image=real, strength=0.8, **kw)
    elif kind == "mask":
        out = StableDiffusionControlNetPipeline(controlnet=fam.controlnet, **parts)(
            image=masks, height=RES, width=RES, controlnet_conditioning_scale=1.0, **kw)
    else:
        out = StableDiffusionControlNetImg2ImgPipeline(controlnet=fam.controlnet, **parts)(
            image=real, control_image=masks, strength=0.8, controlnet_conditioning_scale=1.0,
            height=RES, width=RES, **kw)
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
@pytest.mark.parametrize("kind", ["noise", "image", "mask", "mix"])
def test_loop_matches_diffusers_pipeline(generators, family, kind):
    gen = generators[family]
    real, masks = _images(1)
    prompts, seeds = ["a red cat", "blue dog shirt"], [11, 12]
    result = gen.generate(prompts, _vps(kind, real, masks), seeds)
    ref = _reference(gen.family(family), kind, "dpmsolver++", prompts, real, masks, seeds)
    assert result.finite.all() and (result.retries == 0).all()
    assert result.images.shape == (2, RES, RES, 3) and result.images.dtype == np.uint8
    assert np.abs(result.images.astype(int) - ref.astype(int)).max() <= TOL
    assert result.images.std() > 5  # a real picture, not a flat fill


@pytest.mark.parametrize("scheduler", [s for s in SCHEDULER_NAMES if s != "dpmsolver++"])
def test_every_scheduler_matches_diffusers(tiny_zoo, scheduler):
    cfg = _cfg(tiny_zoo, family="sd21", scheduler=scheduler)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    real, masks = _images(2)
    result = gen.generate(["a cat", "a dog"], _vps("image", real, masks), [3, 4])
    ref = _reference(gen.family("sd21"), "image", scheduler, ["a cat", "a dog"], real, masks, [3, 4])
    assert result.finite.all()
    assert np.abs(result.images.astype(int) - ref.astype(int)).max() <= TOL


def test_batching_and_seeds_decide_the_image(generators):
    gen = generators["sd15"]
    real, masks = _images(3, n=3)
    vps = _vps("mix", real, masks)
    prompts, seeds = ["a cat", "a red shirt", "a dog"], [5, 6, 7]
    batched = gen.generate(prompts, vps, seeds).images
    again = gen.generate(prompts, vps, seeds).images
    assert np.array_equal(batched, again)  # same seed -> same bytes
    alone = gen.generate(prompts[1:2], vps[1:2], seeds[1:2]).images
    assert np.abs(alone[0].astype(int) - batched[1].astype(int)).max() <= TOL
    other = gen.generate(prompts[1:2], vps[1:2], [99]).images
    assert np.abs(other[0].astype(int) - batched[1].astype(int)).mean() > 2


def test_auto_profile_splits_families_in_one_call(tiny_zoo):
    cfg = _cfg(tiny_zoo, family="auto", steps=2)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    real, masks = _images(4, n=1)
    vps = _vps("image", real, masks) + _vps("mask", real, masks) + [None]  # None: text only (direct)
    result = gen.generate(["a", "b", "c"], vps, [1, 2, 3])
    assert result.families == ["sd21", "sd15", "sd21"]
    assert result.finite.all()
    # the paper profile never gives SD-2.1 a mask/mix prompt: its ControlNet is never loaded
    assert gen.family("sd21")._controlnet is None and gen.family("sd15")._controlnet is not None
    assert set(result.seconds) == {"text", "latents", "denoise", "decode"}
    assert all(v > 0 for v in result.seconds.values())


class NaNForFirstImage:
    """Fault injection through the backend hook: the real UNet runs, then one image's
    prediction is replaced by NaN for the first `bad_calls` batches."""

    def __init__(self, backend, bad_calls):
        self.backend, self.bad_calls, self.batches_seen, self.last_t = backend, bad_calls, 0, None

    def __call__(self, sample, t, states, down=None, mid=None):
        out = self.backend(sample, t, states, down, mid)
        if self.last_t is None or t > self.last_t:  # the first step of a new batch
            self.batches_seen += 1
        self.last_t = t
        if self.batches_seen <= self.bad_calls:
            out = out.clone()
            half = out.shape[0] // 2
            out[0] = float("nan")
            out[half] = float("nan")  # the same image's unconditional row
        return out


@pytest.mark.parametrize("bad_calls,expect_finite", [(1, True), (99, False)])
def test_non_finite_image_is_retried_with_new_seed_or_failed(tiny_zoo, bad_calls, expect_finite):
    cfg = _cfg(tiny_zoo, family="sd15", steps=2, max_retries=2)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation,
                                    backend_hook=lambda b: NaNForFirstImage(b, bad_calls))
    result = gen.generate(["a cat", "a dog"], [None, None], [1, 2])
    assert bool(result.finite[0]) is expect_finite
    assert result.finite[1] and result.retries[1] == 0 and result.seeds[1] == 2
    assert result.retries[0] == (1 if expect_finite else 2)
    assert result.seeds[0] != 1
    if not expect_finite:
        assert (result.images[0] == 0).all()


def test_mismatched_controlnet_is_refused_naming_both_folders(tiny_zoo):
    cfg = _cfg(tiny_zoo, family="sd15")
    cfg.models.controlnet_sd15 = "controlnet-sd21-seg"
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    real, masks = _images(5, n=1)
    with pytest.raises(ModelFolderError, match="controlnet-sd21-seg.*sd15"):
        gen.generate(["a"], _vps("mask", real, masks), [0])


def test_bad_inputs_have_clear_errors(tiny_zoo, tmp_path):
    cfg = _cfg(tmp_path / "nowhere")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    with pytest.raises(ModelFolderError, match="zoo build"):
        gen.generate(["a"], [None], [0])
    with pytest.raises(UserInputError, match="generation.scheduler"):
        SASIGenerator.from_config(cfg.models, _cfg(tiny_zoo, scheduler="euler").generation)
    with pytest.raises(UserInputError, match="resolution=60"):
        cfg = _cfg(tiny_zoo, resolution=60)
        SASIGenerator.from_config(cfg.models, cfg.generation).generate(["a"], [None], [0])
    with pytest.raises(UserInputError, match="as many visual prompts"):
        SASIGenerator.from_config(cfg.models, cfg.generation).generate(["a", "b"], [None], [0])


def test_img2img_without_any_denoising_step_is_refused():
    from sasi_online.generation.loop import img2img_timesteps

    sched = make_scheduler("ddim", {})
    sched.set_timesteps(4)
    assert len(img2img_timesteps(sched, 4, 0.5)) == 2  # the last half of the schedule
    sched.set_timesteps(1)
    with pytest.raises(UserInputError, match="generation.steps=1 x generation.strength=0.8"):
        img2img_timesteps(sched, 1, 0.8)


def test_attention_choice_is_recorded_and_impossible_requests_refused(generators):
    gen = generators["sd15"]
    gen.family("sd15")
    assert gen.attention.startswith("attention: sdpa")  # CPU: xformers has no kernels here
    cfg = _cfg(gen.models_cfg.root, family="sd15", attention="xformers")
    with pytest.raises(UserInputError, match="xformers"):
        SASIGenerator.from_config(cfg.models, cfg.generation).family("sd15")


def test_deep_cache_backend_skips_work_and_stays_close(tiny_zoo):
    cfg = _cfg(tiny_zoo, family="sd21", steps=6, deep_cache_interval=2)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    full = SASIGenerator.from_config(cfg.models, _cfg(tiny_zoo, family="sd21", steps=6).generation)
    a = gen.generate(["a cat"], [None], [1])
    b = full.generate(["a cat"], [None], [1])
    backend = gen._backends["sd21"]
    assert backend.shallow_steps == 3 and backend.full_steps == 3
    assert a.finite.all()
    # an approximation of the full UNet: measured mean drift 0.8/255 here, vs ~45/255 between seeds
    assert np.abs(a.images.astype(int) - b.images.astype(int)).mean() < 5
    with pytest.raises(UserInputError, match="deep_cache_interval"):
        bad = _cfg(tiny_zoo, family="sd21", deep_cache_interval=2, backend="compile")
        SASIGenerator.from_config(bad.models, bad.generation).family("sd21")


def test_device_output_is_the_host_output(generators):
    """generate(on_device=True) keeps images as a uint8 tensor: the same bytes as the numpy path."""
    from sasi_online.generation import loop

    real, masks = _images(4)
    vps, prompts, seeds = _vps("mix", real, masks), ["a cat", "a red shirt"], [8, 9]
    host = generators["sd15"].generate(prompts, vps, seeds)
    dev = generators["sd15"].generate(prompts, vps, seeds, on_device=True)
    assert torch.is_tensor(dev.images) and dev.images.dtype == torch.uint8
    assert dev.images.device == torch.device(generators["sd15"].device)
    assert np.array_equal(dev.images.cpu().numpy(), host.images) and np.array_equal(dev.finite, host.finite)
    # rounding ties and the clamp ends convert the same way on both paths
    x = torch.tensor([-1.5, -1.0, 1 / 255 - 1, 3 / 255 - 1, 0.0, 1.0, 2.0]).view(1, 1, 1, -1).expand(2, 3, 1, -1)
    x = torch.cat([x, torch.rand(2, 3, 1, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1], 2)
    assert np.array_equal(loop.to_uint8(x, host=False).numpy(), loop.to_uint8(x))
