"""LCM in the generator's own loop: the LoRA fused at start-up, guidance <= 1 without the
unconditional half, parity with diffusers' LCMScheduler + load_lora_weights per VP kind, the
family check, identities, and the fused weights through the compiled and TensorRT paths."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_speed_knobs import DeviceTrap, _trap  # noqa: E402

from sasi_online.config import Config  # noqa: E402
from sasi_online.errors import ModelFolderError, UserInputError  # noqa: E402
from sasi_online.generation import SASIGenerator, loop  # noqa: E402
from sasi_online.generation.schedulers import make_scheduler  # noqa: E402
from sasi_online.visual.prompts import VisualPrompt  # noqa: E402
from sasi_online.zoo.build import LORA_FILE, LORA_FOLDER  # noqa: E402

RES, STEPS, STRENGTH = 64, 4, 0.5
PARITY = 1e-4  # final latents, ours vs diffusers' pipeline (float32 on a CPU)
PROMPTS, SEEDS = ["a grey shirt", "a dark bag"], [3, 11]


def _cfg(zoo, **gen):
    cfg = Config()
    cfg.models.root = str(zoo)
    cfg.models.lora = LORA_FOLDER
    g = cfg.generation
    g.family, g.scheduler, g.steps, g.guidance, g.strength, g.resolution, g.batch_size = \
        "sd15", "lcm", STEPS, 1.0, STRENGTH, RES, 2
    for k, v in gen.items():
        setattr(g, k, v)
    return cfg


def _inputs():
    rng = np.random.default_rng(5)
    real = [Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)) for _ in PROMPTS]
    masks = [Image.fromarray((rng.integers(0, 4, (8, 8, 1)) * 60).repeat(8, 0).repeat(8, 1).repeat(3, 2)
                             .astype(np.uint8)) for _ in PROMPTS]
    return real, masks


def _vps(kind, real, masks):
    if kind == "noise":
        return [VisualPrompt(kind="noise", init_image=None, control_image=None, seed=0)] * len(real)
    return [VisualPrompt(kind=kind, init_image=real[i] if kind in ("image", "mix") else None,
                         control_image=masks[i] if kind in ("mask", "mix") else None, seed=0)
            for i in range(len(real))]


def _our_latents(gen, kind, real, masks):
    """The final latents of our loop (captured at the decoder), and its images."""
    seen = []
    decoder = gen._decoders.get("sd15")
    if decoder is None:
        gen.family("sd15")
        decoder = gen._decoders["sd15"]
    gen._decoders["sd15"] = lambda z: seen.append(z.clone()) or decoder(z)
    try:
        out = gen.generate(PROMPTS, _vps(kind, real, masks), SEEDS)
    finally:
        gen._decoders["sd15"] = decoder
    return torch.cat(seen), out


def _reference(zoo, kind, real, masks, guidance):
    """diffusers' own pipeline, from the folders, with LCMScheduler and load_lora_weights."""
    from diffusers import (ControlNetModel, LCMScheduler, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionPipeline)

    cls = {"noise": StableDiffusionPipeline, "image": StableDiffusionImg2ImgPipeline,
           "mask": StableDiffusionControlNetPipeline, "mix": StableDiffusionControlNetImg2ImgPipeline}[kind]
    extra = {}
    if kind in ("mask", "mix"):
        extra["controlnet"] = ControlNetModel.from_pretrained(str(zoo / "controlnet-sd15-seg"))
    pipe = cls.from_pretrained(str(zoo / "sd15"), safety_checker=None, requires_safety_checker=False, **extra)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(zoo / LORA_FOLDER), weight_name=LORA_FILE)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent",
              generator=[torch.Generator().manual_seed(s) for s in SEEDS])
    if kind in ("image", "mix"):
        kw.update(image=real, strength=STRENGTH)
    if kind == "mask":
        kw.update(image=masks, height=RES, width=RES, controlnet_conditioning_scale=1.0)
    if kind == "mix":  # this pipeline's own default scale is 0.8: say 1.0, as the generator runs
        kw.update(control_image=masks, height=RES, width=RES, controlnet_conditioning_scale=1.0)
    if kind == "noise":
        kw.update(height=RES, width=RES)
    return pipe(**kw).images


@pytest.fixture(scope="module")
def lcm_gen(tiny_zoo):
    cfg = _cfg(tiny_zoo)
    return SASIGenerator.from_config(cfg.models, cfg.generation)


@pytest.mark.parametrize("kind", ["image", "mask", "mix", "noise"])
def test_lcm_with_fused_lora_matches_diffusers_per_vp_kind(tiny_zoo, lcm_gen, kind):
    real, masks = _inputs()
    ours, out = _our_latents(lcm_gen, kind, real, masks)
    want = _reference(tiny_zoo, kind, real, masks, guidance=1.0)
    assert out.finite.all() and ours.shape == want.shape
    assert (ours - want).abs().max().item() <= PARITY


def test_lcm_with_guidance_matches_diffusers_too(tiny_zoo, lcm_gen):
    real, masks = _inputs()
    gen = lcm_gen.with_settings(guidance=1.8)
    ours, _ = _our_latents(gen, "mix", real, masks)
    assert (ours - _reference(tiny_zoo, "mix", real, masks, guidance=1.8)).abs().max().item() <= PARITY


def test_guidance_at_most_one_skips_the_unconditional_half(lcm_gen):
    real, masks = _inputs()
    batches = []

    def hook(backend):
        def run(sample, *a, **k):
            batches.append(sample.shape[0])
            return backend(sample, *a, **k)
        return run

    hooked = SASIGenerator(lcm_gen.models_cfg, lcm_gen.cfg, backend_hook=hook)
    hooked._adopt("sd15", lcm_gen.family("sd15"))  # the loaded family, shared
    for guidance, want in ((1.0, 2), (0.5, 2), (1.5, 4)):
        batches.clear()
        hooked.with_settings(guidance=guidance).generate(PROMPTS, _vps("image", real, masks), SEEDS)
        assert batches == [want] * int(STEPS * STRENGTH)


def test_the_lora_is_fused_into_plain_modules(tiny_zoo, lcm_gen):
    from diffusers import UNet2DConditionModel

    fused = lcm_gen.family("sd15").unet
    base = UNet2DConditionModel.from_pretrained(str(tiny_zoo / "sd15" / "unet"))
    names = [n for n, _ in fused.named_modules()]
    assert not any("lora" in n for n in names)  # no LoRA layers left: a step costs what it did
    changed = [k for k, v in base.state_dict().items()
               if k in fused.state_dict() and not torch.equal(v, fused.state_dict()[k])]
    assert any(".attn1.to_q." in k for k in changed) and any(".conv1." in k for k in changed)
    assert lcm_gen.family("sd15").lora_file == tiny_zoo / LORA_FOLDER / LORA_FILE


def test_lcm_noise_is_drawn_ahead_and_the_loop_never_reads_the_device(lcm_gen, monkeypatch):
    import diffusers.schedulers.scheduling_lcm as lcm_module

    from sasi_online.engines.backends import EagerUNet

    fam = lcm_gen.family("sd15")
    sched = make_scheduler("lcm", fam.scheduler_config)
    sched.set_timesteps(STEPS, device="cpu")
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = loop.init_latents(sched, fam.vae, (2, 4, 8, 8), gens, torch.device("cpu"), torch.float32)
    text = loop.encode_text(fam.tokenizer, fam.text_encoder, PROMPTS, None, torch.device("cpu"))
    want_gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    [g.set_state(h.get_state()) for g, h in zip(want_gens, gens)]
    with torch.inference_mode():
        ref_sched = make_scheduler("lcm", fam.scheduler_config)
        ref_sched.set_timesteps(STEPS, device="cpu")
        want = latents.clone()
        for t in ref_sched.timesteps:  # the scheduler's own step, drawing as it goes
            want = ref_sched.step(fam.unet(want, t, text).sample, t, want, generator=want_gens,
                                  return_dict=False)[0]

        def no_draw(*a, **k):
            raise AssertionError("LCMScheduler.step drew noise inside the loop")

        monkeypatch.setattr(lcm_module, "randn_tensor", no_draw)
        out = loop.denoise(EagerUNet(fam.unet), sched, _trap(latents), sched.timesteps, _trap(text), 1.0,
                           loop.step_kwargs(sched, gens))
    assert isinstance(out, DeviceTrap)
    assert (out.as_subclass(torch.Tensor) - want).abs().max() <= 1e-5


def test_lcm_step_count_is_checked(tiny_zoo):
    for steps in (1, 9, 25):
        cfg = _cfg(tiny_zoo, steps=steps)
        with pytest.raises(UserInputError, match="generation.steps from 2 to 8"):
            SASIGenerator.from_config(cfg.models, cfg.generation)


def test_a_lora_for_another_family_is_refused_naming_the_file(tiny_zoo):
    cfg = _cfg(tiny_zoo, family="sd21")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    with pytest.raises(UserInputError) as err:
        gen.family("sd21")
    msg = str(err.value)
    assert str(tiny_zoo / LORA_FOLDER / LORA_FILE) in msg and "generation.family=sd15" in msg
    assert "32 -> " in msg or "-> 32" in msg or "no such layer" in msg  # the layer and its widths


def test_a_missing_lora_file_names_the_folder(tiny_zoo, tmp_path):
    cfg = _cfg(tiny_zoo)
    cfg.models.lora = str(tmp_path)
    with pytest.raises(ModelFolderError, match=str(tmp_path)):
        SASIGenerator.from_config(cfg.models, cfg.generation).family("sd15")


def test_model_identity_includes_the_lora(tiny_zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    from sasi_online.generation.offline import model_hashes

    other = tmp_path / "other-lora"
    other.mkdir()
    tensors = load_file(str(tiny_zoo / LORA_FOLDER / LORA_FILE))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(other / LORA_FILE))
    with_lora = model_hashes(_cfg(tiny_zoo), "image", [])
    plain_cfg = _cfg(tiny_zoo)
    plain_cfg.models.lora = None
    plain = model_hashes(plain_cfg, "image", [])
    other_cfg = _cfg(tiny_zoo)
    other_cfg.models.lora = str(other)
    changed = model_hashes(other_cfg, "image", [])
    assert len({with_lora["sd15"], plain["sd15"], changed["sd15"]}) == 3
    assert with_lora["sd15"] == model_hashes(_cfg(tiny_zoo), "image", [])["sd15"]  # stable


def test_random_zoo_ships_the_lora_and_verifies(tiny_zoo):
    from sasi_online.zoo import verify_zoo

    files = json.loads((tiny_zoo / "zoo.json").read_text())["files"]
    assert f"{LORA_FOLDER}/{LORA_FILE}" in files and verify_zoo(tiny_zoo) == []


def test_fused_lora_runs_compiled_on_a_cpu(tiny_zoo, lcm_gen):
    """The fused UNet under torch.compile (inductor on the CPU): the same images as eager."""
    real, masks = _inputs()
    want = lcm_gen.generate(PROMPTS, _vps("mask", real, masks), SEEDS)
    compiled = lcm_gen.with_settings(backend="compile")
    got = compiled.generate(PROMPTS, _vps("mask", real, masks), SEEDS)
    assert "compiled" in getattr(compiled._backends["sd15"], "reason", "") + compiled._decoders["sd15"].name
    assert got.finite.all() and np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1


def test_fused_lora_goes_through_tensorrt_with_one_engine_per_weight_set(tiny_zoo, tmp_path, monkeypatch):
    from test_trt_api import _install

    fake = _install(monkeypatch, 11)
    real, masks = _inputs()
    builds = lambda: sum(c[0] == "build_serialized_network" for c in fake.calls)  # noqa: E731
    outputs = {}
    for name, lora in (("lora", LORA_FOLDER), ("plain", None), ("lora again", LORA_FOLDER)):
        cfg = _cfg(tiny_zoo, steps=2, strength=1.0)
        cfg.models.lora = lora
        want = SASIGenerator.from_config(cfg.models, cfg.generation).generate(PROMPTS, _vps("noise", real, masks), SEEDS)
        cfg.generation.backend, cfg.generation.engine_dir = "tensorrt", str(tmp_path)
        before = builds()
        gen = SASIGenerator.from_config(cfg.models, cfg.generation)
        got = gen.generate(PROMPTS, _vps("noise", real, masks), SEEDS)
        assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1
        outputs[name] = (got.images, builds() - before)
    assert outputs["lora"][1] == 1 and outputs["plain"][1] == 1  # each weight set built its engine
    assert outputs["lora again"][1] == 0  # cached by identity: the LoRA's engine was still there
    assert not np.array_equal(outputs["lora"][0], outputs["plain"][0])
    assert len([p for p in (tmp_path / "sd15").iterdir() if p.is_dir()]) == 2
