"""Kernels beside their torch references: parity of values and gradients, the torch
references against diffusers/torchvision/plain formulas, and the dispatcher's choices.

Triton runs here through its CPU interpreter, so shapes are tiny. Triton fixes that mode
when it is first imported, so this module sets TRITON_INTERPRET=1 before importing the
kernels (no other part of the project uses Triton; torch.compile on the CPU does not).
If triton was already imported in compiled mode when this module is collected, the
Triton tests run once more in one subprocess with the variable set, and each test
checks its own outcome there.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # stays set: triton re-reads it lazily

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sasi_online.errors import UserInputError  # noqa: E402
from sasi_online.kernels import (AugParams, AugRecipe, augment_views,  # noqa: E402
                                 choose_backend, guided_scheduler_step, guided_step_fused,
                                 guided_step_torch, guided_step_triton, infonce_loss,
                                 infonce_held_bytes, infonce_saved_bytes, infonce_torch, infonce_triton,
                                 last_choice, ring_augment_torch, ring_augment_triton,
                                 sample_aug_params, step_scalars)
from sasi_online.kernels._triton import interpret_mode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run(args, env_updates, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in env_updates}
    env.update({k: v for k, v in env_updates.items() if v is not None})
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def _interpreter_run():
    """Outcome lines of one subprocess running this module's Triton tests under the
    interpreter; used only when triton was imported in compiled mode before us."""
    r = _run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
              str(Path(__file__).relative_to(REPO)), "-k", "triton"],  # every test taking triton_here has "triton" in its name
             {"TRITON_INTERPRET": "1", "SASI_KERNEL_BACKEND": None}, timeout=600)
    return r.stdout + r.stderr


@pytest.fixture
def triton_here(request, monkeypatch):
    """True: run the Triton body in this process. False: this test already ran and
    passed in the interpreter subprocess; the caller returns."""
    monkeypatch.delenv("SASI_KERNEL_BACKEND", raising=False)
    if interpret_mode():
        return True
    out = request.getfixturevalue("_interpreter_run")
    assert f"PASSED {request.node.nodeid}" in out, out[-4000:]
    return False


SHAPE = (2, 4, 8, 8)


def _scheduler(kind, prediction_type, clip=False, steps=10, **extra):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    s = cls(num_train_timesteps=1000, beta_schedule="scaled_linear",
            prediction_type=prediction_type, clip_sample=clip, **extra)
    s.set_timesteps(steps)
    return s


def _model_outputs(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(3)]  # uncond, text, latents


# --------------------------------------------------------------------- guided step


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type,clip", [("epsilon", False), ("v_prediction", False),
                                                  ("epsilon", True), ("sample", False)])
def test_guided_step_torch_matches_diffusers_step(kind, prediction_type, clip):
    sched = _scheduler(kind, prediction_type, clip)
    guidance = 7.5
    for i, t in enumerate(sched.timesteps[[0, 4, -1]]):
        u, c, x = _model_outputs(i)
        guided = u + guidance * (c - u)
        want = sched.step(guided, t, x, generator=torch.Generator().manual_seed(9)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
        got = guided_step_torch(noise_pred_uncond=u, noise_pred_text=c, latents=x,
                                guidance=guidance, noise=noise,
                                **step_scalars(sched, t).as_kwargs())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_guided_step_torch_matches_ddim_with_eta_and_ddpm_fixed_large():
    sched = _scheduler("ddim", "v_prediction")
    t = sched.timesteps[3]
    u, c, x = _model_outputs(3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    want = sched.step(u + 3.0 * (c - u), t, x, eta=0.6, variance_noise=noise).prev_sample
    sc = step_scalars(sched, t, eta=0.6)
    assert sc.sigma_t > 0
    got = guided_step_torch(noise_pred_uncond=u, noise_pred_text=c, latents=x, guidance=3.0,
                            noise=noise, **sc.as_kwargs())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)

    sched = _scheduler("ddpm", "epsilon", variance_type="fixed_large")
    t = sched.timesteps[2]
    want = sched.step(u + 3.0 * (c - u), t, x, generator=torch.Generator().manual_seed(4))
    got = guided_step_torch(noise_pred_uncond=u, noise_pred_text=c, latents=x, guidance=3.0,
                            noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)),
                            **step_scalars(sched, t).as_kwargs())
    torch.testing.assert_close(got, want.prev_sample, rtol=1e-5, atol=2e-5)


def test_ddpm_step_is_the_papers_equation_2():
    """x_{t-1} = 1/sqrt(a_t) (x_t - (1 - a_t)/sqrt(1 - abar_t) eps) + sigma_t n."""
    sched = _scheduler("ddpm", "epsilon")
    sc = step_scalars(sched, sched.timesteps[5])
    u, c, x = _model_outputs(5)
    n = torch.randn(SHAPE)
    eps = u + 2.0 * (c - u)
    eq2 = (x - (1 - sc.alpha_t) / math.sqrt(1 - sc.alpha_bar_t) * eps) / math.sqrt(sc.alpha_t) \
        + sc.sigma_t * n
    got = guided_step_torch(noise_pred_uncond=u, noise_pred_text=c, latents=x, guidance=2.0,
                            noise=n, **sc.as_kwargs())
    torch.testing.assert_close(got, eq2, rtol=1e-5, atol=2e-5)


def test_fused_loop_follows_diffusers_ddim_loop_over_all_steps():
    """Ten chained steps catch a wrong previous timestep or a stale scalar."""
    sched = _scheduler("ddim", "epsilon", steps=10)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def model(x, t):  # a fixed smooth function of (x, t) standing in for a UNet's output
        return 0.3 * x + 0.001 * float(t), 0.5 * x - 0.0005 * float(t)

    ours, theirs = x0.clone(), x0.clone()
    for t in sched.timesteps:
        u, c = model(ours, t)
        ours = guided_step_fused(noise_pred_uncond=u, noise_pred_text=c, latents=ours,
                                 guidance=5.0, **step_scalars(sched, t).as_kwargs())
        u, c = model(theirs, t)
        theirs = sched.step(u + 5.0 * (c - u), t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_scheduler_step_dropin_matches_diffusers_loop_with_per_image_generators():
    """DDPM draws noise each step from per-image generators: same images as diffusers."""
    from diffusers import EulerDiscreteScheduler

    sched = _scheduler("ddpm", "v_prediction", steps=6)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours, theirs = x0.clone(), x0.clone()
    gens_a = [torch.Generator().manual_seed(s) for s in (5, 6)]
    gens_b = [torch.Generator().manual_seed(s) for s in (5, 6)]
    for t in sched.timesteps:
        pred = torch.cat([0.2 * ours, 0.4 * ours + 0.01])  # uncond half, text half
        ours = guided_scheduler_step(sched, pred, t, ours, 4.0, generator=gens_a)
        pred = torch.cat([0.2 * theirs, 0.4 * theirs + 0.01])
        u, c = pred.chunk(2)
        theirs = sched.step(u + 4.0 * (c - u), t, theirs, generator=gens_b).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(gens_a[0].get_state(), gens_b[0].get_state())
    # A scheduler without a fused path runs its own step.
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear")
    euler.set_timesteps(4)
    t = euler.timesteps[0]
    pred = torch.cat([0.2 * x0, 0.3 * x0])
    got = guided_scheduler_step(euler, pred, t, x0, 2.0)
    euler2 = EulerDiscreteScheduler(beta_schedule="scaled_linear")
    euler2.set_timesteps(4)
    torch.testing.assert_close(got, euler2.step(0.2 * x0 + 2.0 * 0.1 * x0, t, x0).prev_sample)


@pytest.mark.parametrize("kind,prediction_type,clip", [
    ("ddpm", "epsilon", None), ("ddpm", "v_prediction", 1.0),
    ("ddim", "epsilon", None), ("ddim", "v_prediction", None), ("ddim", "sample", 1.0)])
def test_guided_step_triton_matches_torch(triton_here, kind, prediction_type, clip):
    if not triton_here:
        return
    sched = _scheduler(kind, prediction_type, clip is not None)
    sc = step_scalars(sched, sched.timesteps[2], eta=0.5)
    u, c, x = _model_outputs(11)
    noise = torch.randn(SHAPE)
    args = dict(noise_pred_uncond=u, noise_pred_text=c, latents=x, guidance=7.5, noise=noise,
                **sc.as_kwargs())
    want = guided_step_torch(**args)
    torch.testing.assert_close(guided_step_triton(**args), want, rtol=1e-5, atol=3e-5)
    inplace = x.clone()
    args["latents"] = inplace
    guided_step_triton(**args, out=inplace)
    torch.testing.assert_close(inplace, want, rtol=1e-5, atol=3e-5)


def test_guided_step_refuses_bad_input():
    u, c, x = _model_outputs(0)
    sc = step_scalars(_scheduler("ddpm", "epsilon"), 900)
    with pytest.raises(UserInputError, match="noise"):
        guided_step_torch(noise_pred_uncond=u, noise_pred_text=c, latents=x, guidance=7.5,
                          noise=None, **sc.as_kwargs())
    with pytest.raises(UserInputError, match="chunk"):
        guided_step_torch(noise_pred_uncond=u[:1], noise_pred_text=c, latents=x, guidance=7.5,
                          noise=x, **sc.as_kwargs())
    from diffusers import EulerDiscreteScheduler

    with pytest.raises(UserInputError, match="EulerDiscreteScheduler"):
        step_scalars(EulerDiscreteScheduler(), 10)
    with pytest.raises(UserInputError, match="learned"):
        step_scalars(_scheduler("ddpm", "epsilon", variance_type="learned_range"), 900)


# ----------------------------------------------------------------- ring augmentation


def _images(n=5, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


def test_sample_aug_params_follow_the_recipe():
    recipe = AugRecipe(scale=(0.3, 0.6), ratio=(0.75, 1.33), flip_p=0.5, jitter_p=0.5,
                       brightness=0.4, hue=0.1, gray_p=0.25)
    p = sample_aug_params(400, (64, 80), recipe, torch.Generator().manual_seed(1))
    top, left, ch, cw = p.crop.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (top + ch <= 64) & (left + cw <= 80)).all())
    area = (ch * cw).double() / (64 * 80)
    assert area.min() >= 0.28 and area.max() <= 0.62  # rounding of the sides
    assert 0.35 < p.flip.float().mean() < 0.65 and 0.15 < p.gray.float().mean() < 0.35
    assert p.brightness.min() >= 0.6 and p.brightness.max() <= 1.4 and p.hue.abs().max() <= 0.1
    jittered = p.hue != 0
    assert bool((p.brightness[~jittered] == 1).all()) and 0.35 < jittered.float().mean() < 0.65
    again = sample_aug_params(400, (64, 80), recipe, torch.Generator().manual_seed(1))
    assert torch.equal(again.crop, p.crop) and torch.equal(again.hue, p.hue)
    # No try can fit a 3:1 crop into a square: torchvision's centre-crop fallback.
    wide = sample_aug_params(4, (30, 30), AugRecipe(ratio=(3.0, 3.0), scale=(0.9, 1.0)))
    assert wide.crop.tolist() == [[10, 0, 10, 30]] * 4


def _identity_params(n, h, w):
    return AugParams(crop=torch.tensor([[0, 0, h, w]] * n), flip=torch.zeros(n, dtype=torch.bool),
                     brightness=torch.ones(n), contrast=torch.ones(n), saturation=torch.ones(n),
                     hue=torch.zeros(n), gray=torch.zeros(n, dtype=torch.bool))


def test_ring_augment_torch_identity_flip_and_grayscale():
    imgs = _images(n=3, h=16, w=16)
    p = _identity_params(3, 16, 16)
    out = ring_augment_torch(imgs, p, 16, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out, imgs.permute(0, 3, 1, 2).float() / 255)
    p.flip[1] = True
    p.gray[2] = True
    out2 = ring_augment_torch(imgs, p, 16, mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(out2[1], out[1].flip(-1))
    grey = (out[2] * torch.tensor([0.2989, 0.587, 0.114])[:, None, None]).sum(0)
    torch.testing.assert_close(out2[2], grey.expand(3, -1, -1))


@pytest.mark.parametrize("channels_last", [True, False])
def test_ring_augment_triton_matches_torch(triton_here, channels_last):
    if not triton_here:
        return
    imgs = _images(n=6)
    imgs[0] = 128  # a flat image: hue and saturation hit their degenerate branch
    p = sample_aug_params(6, (20, 24), AugRecipe(jitter_p=1.0, hue=0.5, gray_p=0.5,
                                                 scale=(0.05, 1.0)),
                          torch.Generator().manual_seed(3))
    assert bool(p.gray.any()) and bool(p.flip.any()) and not bool(p.flip.all())
    if not channels_last:
        imgs = imgs.permute(0, 3, 1, 2).contiguous()
    want = ring_augment_torch(imgs, p, 13)
    got = ring_augment_triton(imgs, p, 13)
    assert got.shape == (6, 3, 13, 13)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _blur_solarize_params(n=6, seed=4):
    recipe = AugRecipe(jitter_p=1.0, gray_p=0.3, blur_p=0.7, blur_sigma=(0.3, 2.0), solarize_p=0.5,
                       scale=(0.2, 1.0))
    p = sample_aug_params(n, (20, 24), recipe, torch.Generator().manual_seed(seed))
    assert bool((p.blur_sigma > 0).any()) and bool((p.blur_sigma == 0).any())
    assert bool(p.solarize.any()) and not bool(p.solarize.all())
    return p


def test_ring_augment_blur_and_solarize_batched_match_the_per_view_reference():
    from sasi_online.kernels.ring_augment import IMAGENET_MEAN, IMAGENET_STD, blur_solarize_normalize

    imgs = _images(n=6)
    p = _blur_solarize_params()
    want = ring_augment_torch(imgs, p, 13)  # torchvision's gaussian_blur / solarize, view by view
    plain = AugParams(p.crop, p.flip, p.brightness, p.contrast, p.saturation, p.hue, p.gray)
    raw = ring_augment_torch(imgs, plain, 13, mean=(0, 0, 0), std=(1, 1, 1))
    got = blur_solarize_normalize(raw, p)  # one depthwise convolution for the batch
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(raw, (want * torch.tensor(IMAGENET_STD)[:, None, None]
                                    + torch.tensor(IMAGENET_MEAN)[:, None, None]), atol=1e-3)


def test_ring_augment_triton_matches_torch_with_blur_and_solarize(triton_here):
    if not triton_here:
        return
    imgs = _images(n=6)
    p = _blur_solarize_params()
    torch.testing.assert_close(ring_augment_triton(imgs, p, 13), ring_augment_torch(imgs, p, 13),
                               rtol=1e-4, atol=1e-4)


def test_ring_augment_triton_blurs_a_32px_view_as_the_recipe_rule(triton_here):
    """The device path at 32 px with a sigma in pixels of the view: the Triton kernel (then
    its batched blur) matches the torch reference and torchvision's own gaussian_blur with
    the recipe's kernel (7 taps at sigma 1)."""
    if not triton_here:
        return
    import torchvision.transforms.v2.functional as TF

    from sasi_online.data.augment import ViewSpec

    spec = ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter_prob=0.0, grayscale=0.0,
                    blur_prob=1.0, blur_sigma=(1.0, 1.0), blur_sigma_at=None)
    r = AugRecipe.from_view_spec(spec, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), image_size=32)
    p = sample_aug_params(2, (32, 32), r, torch.Generator().manual_seed(0))
    assert p.blur_kernel == spec.blur_kernel(32) == 7
    imgs = _images(n=2, h=32, w=32)
    got = ring_augment_triton(imgs, p, 32, mean=r.mean, std=r.std)
    torch.testing.assert_close(got, ring_augment_torch(imgs, p, 32, mean=r.mean, std=r.std),
                               rtol=1e-4, atol=1e-4)
    want = TF.gaussian_blur(imgs.permute(0, 3, 1, 2).float() / 255.0, [7, 7], [1.0, 1.0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float((got - imgs.permute(0, 3, 1, 2).float() / 255.0).abs().mean()) > 0.05


@pytest.mark.parametrize("channels_last,out_size", [(True, 13), (False, 13), (True, 1), (True, 31)])
def test_ring_augment_vectorized_matches_the_per_view_loop(channels_last, out_size):
    from sasi_online.kernels import ring_augment_vectorized

    imgs = _images(n=6)
    imgs[0] = 128  # a flat image: hue and saturation hit their degenerate branch
    for p in (sample_aug_params(6, (20, 24), AugRecipe(jitter_p=1.0, hue=0.5, gray_p=0.5, scale=(0.05, 1.0)),
                                torch.Generator().manual_seed(3)), _blur_solarize_params()):
        x = imgs if channels_last else imgs.permute(0, 3, 1, 2).contiguous()
        want = ring_augment_torch(x, p, out_size)
        got = ring_augment_vectorized(x, p, out_size)
        assert got.shape == want.shape == (6, 3, out_size, out_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert ring_augment_vectorized(imgs[:0], sample_aug_params(0, (20, 24)), 8).shape == (0, 3, 8, 8)
    with pytest.raises(UserInputError, match="does not fit"):
        ring_augment_vectorized(_images(n=2, h=10, w=10), sample_aug_params(2, (20, 24)), 8)


def test_ring_augment_triton_matches_the_vectorized_path(triton_here):
    if not triton_here:
        return
    from sasi_online.kernels import ring_augment_vectorized

    imgs = _images(n=6)
    for p in (sample_aug_params(6, (20, 24), AugRecipe(jitter_p=1.0, hue=0.5, gray_p=0.5),
                                torch.Generator().manual_seed(5)), _blur_solarize_params(n=6)):
        torch.testing.assert_close(ring_augment_triton(imgs, p, 9),
                                   ring_augment_vectorized(imgs, p, 9),
                                   rtol=1e-4, atol=1e-4)


def test_normalisation_constants_and_post_params_are_built_once_per_device():
    from sasi_online.kernels.ring_augment import blur_solarize_normalize, norm_constants

    a = norm_constants((0.5, 0.4, 0.3), (0.2, 0.25, 0.5), "cpu")
    assert a is norm_constants([0.5, 0.4, 0.3], [0.2, 0.25, 0.5], torch.device("cpu"))
    assert a is not norm_constants((0.5, 0.4, 0.3), (0.2, 0.25, 0.5), "cpu", torch.float64)
    torch.testing.assert_close(a[1].flatten(), torch.tensor([5.0, 4.0, 2.0]))
    p = _blur_solarize_params()
    post = p.post_packed("cpu")
    assert post.shape == (6, 2) and torch.equal(post[:, 1] > 0.5, p.solarize)
    assert _identity_params(2, 4, 4).post_packed("cpu") is None
    x = torch.rand(6, 3, 13, 13, generator=torch.Generator().manual_seed(0))
    got = blur_solarize_normalize(x, p, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    plain = blur_solarize_normalize(x, _identity_params(6, 13, 13), (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    torch.testing.assert_close(plain, (x - a[0]) * a[1])
    assert not torch.allclose(got, plain)


def test_every_shipped_recipe_view_maps_onto_the_device_path():
    from sasi_online.data.augment import RECIPE_DIR, build_torchvision_transform, load_recipe
    from sasi_online.kernels.ring_augment import blur_kernel_size

    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        recipe = load_recipe(path.stem)
        views = recipe.global_views + ([recipe.local_view] if recipe.local_view else [])
        kinds = [f"global{i}" for i in range(len(recipe.global_views))] + ["local"] * bool(recipe.local_view)
        for kind, spec in zip(kinds, views):
            # the shipped recipes quote SimCLR/MoCo's sigma at 224 px: scaled with the view's side
            assert spec.blur_sigma_at == 224 and spec.blur_sigma == (0.1, 2.0), path.stem
            for size in (32, 224):
                r = AugRecipe.from_view_spec(spec, recipe.mean, recipe.std, image_size=size)
                assert r.blur_sigma == spec.sigma_range(size) and r.blur_kernel == spec.blur_kernel(size)
                if spec.blur_prob > 0:  # the torchvision path blurs with the same parameters
                    tv = [t for t in build_torchvision_transform(recipe, kind, size).transforms
                          if type(t).__name__ == "RandomApply"][-1].transforms[0]
                    assert tuple(tv.kernel_size) == (r.blur_kernel,) * 2 and tuple(tv.sigma) == r.blur_sigma
                    p = sample_aug_params(2, (40, 40), r, torch.Generator().manual_seed(0))
                    assert blur_kernel_size(p, spec.side(size)) == spec.blur_kernel(size), path.stem
            assert spec.blur_kernel(224) == (13 if spec.side(224) == 224 else 7)  # 96-px local crops: sigma <= 0.86
            assert spec.blur_kernel(32) == 3
            r = AugRecipe.from_view_spec(spec, recipe.mean, recipe.std, image_size=224)
            assert (r.blur_p, r.solarize_p, r.gray_p, r.flip_p) == (spec.blur_prob, spec.solarize,
                                                                    spec.grayscale, spec.flip), path.stem
            p = sample_aug_params(3, (40, 40), r, torch.Generator().manual_seed(0))
            out = ring_augment_torch(torch.zeros(3, 40, 40, 3, dtype=torch.uint8) + 77, p, spec.side(32),
                                     mean=r.mean, std=r.std)
            assert out.shape == (3, 3, spec.side(32), spec.side(32)) and torch.isfinite(out).all()


def test_ring_augment_refuses_bad_input():
    imgs = _images(n=2)
    p = sample_aug_params(2, (20, 24))
    with pytest.raises(UserInputError, match="uint8"):
        ring_augment_torch(imgs.float(), p, 8)
    with pytest.raises(UserInputError, match="sample_aug_params"):
        ring_augment_torch(imgs[:1], p, 8)
    big = sample_aug_params(2, (200, 240))
    with pytest.raises(UserInputError, match="does not fit"):
        ring_augment_torch(imgs, big, 8)
    with pytest.raises(UserInputError, match="channels_last"):
        ring_augment_torch(torch.zeros(2, 3, 5, 3, dtype=torch.uint8), _identity_params(2, 3, 5), 4)
    with pytest.raises(UserInputError, match="unknown keys"):
        AugRecipe.from_mapping({"blur": 0.5})
    with pytest.raises(UserInputError, match="probability"):
        AugRecipe(flip_p=1.5)


def test_recipe_from_the_projects_augmentation_yaml():
    from sasi_online.data.augment import load_recipe

    yaml_recipe = load_recipe("mocov2")
    spec = yaml_recipe.global_views[0]
    r = AugRecipe.from_view_spec(spec, yaml_recipe.mean, yaml_recipe.std, image_size=32)
    assert (r.scale, r.flip_p, r.jitter_p, r.hue, r.gray_p) == \
        (tuple(spec.scale), spec.flip, spec.jitter_prob, spec.hue, spec.grayscale)
    assert r.mean == tuple(yaml_recipe.mean) and r.std == tuple(yaml_recipe.std)
    # mocov2 quotes its sigma at 224 px (blur.sigma_at): its sigma needs the side
    with pytest.raises(UserInputError, match="pass image_size"):
        AugRecipe.from_view_spec(spec, yaml_recipe.mean, yaml_recipe.std)


@pytest.mark.parametrize("side", [32, 64, 224])
def test_device_blur_follows_the_recipe_rule_with_or_without_image_size(tmp_path, side):
    """A sigma in pixels of the view (no sigma_at): the same sigma and kernel whether the
    side reaches from_view_spec (image_size) or only the blur (out_size)."""
    from sasi_online.data.augment import load_recipe
    from sasi_online.kernels.ring_augment import blur_kernel_size

    path = tmp_path / "px.yaml"
    path.write_text("global:\n  - blur: {prob: 1.0, sigma: [0.1, 1.0]}\n")
    recipe = load_recipe(str(path))
    spec = recipe.global_views[0]
    sized = AugRecipe.from_view_spec(spec, recipe.mean, recipe.std, image_size=side)
    unsized = AugRecipe.from_view_spec(spec, recipe.mean, recipe.std)
    assert sized.blur_sigma == unsized.blur_sigma == (0.1, 1.0) and sized.blur_kernel == 7
    for r in (sized, unsized):
        p = sample_aug_params(4, (side, side), r, torch.Generator().manual_seed(1))
        assert blur_kernel_size(p, spec.side(side)) == spec.blur_kernel(side) == 7
        assert bool((p.blur_sigma >= 0.1).all()) and bool((p.blur_sigma <= 1.0).all())
    # hand-built parameters without a kernel: the rule on the drawn sigmas, capped at the side
    plain = AugParams(p.crop, p.flip, p.brightness, p.contrast, p.saturation, p.hue, p.gray,
                      blur_sigma=torch.tensor([0.5, 2.0, 0.0, 0.0]))
    assert blur_kernel_size(plain, side) == min(13, side - 1 + side % 2) and blur_kernel_size(plain, 9) == 9


# ------------------------------------------------------------------------- InfoNCE


def _qkq(b, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    key = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return q, key, queue


def test_infonce_torch_is_the_moco_formula():
    q, k, queue = _qkq(4, 9, 8)
    t = 0.2
    want = torch.stack([torch.logsumexp(torch.cat([(q[i] @ k[i])[None], queue @ q[i]]) / t, 0)
                        - (q[i] @ k[i]) / t for i in range(4)]).mean()
    torch.testing.assert_close(infonce_torch(q, k, queue, t), want)


@pytest.mark.parametrize("b,k,d", [(5, 37, 24), (33, 130, 128)])
def test_infonce_triton_matches_torch_values_and_gradients(triton_here, b, k, d):
    if not triton_here:
        return
    q, key, queue = _qkq(b, k, d, seed=b)
    want = infonce_torch(q, key, queue, 0.07)
    want_dq, want_dk = torch.autograd.grad(3.0 * want, [q, key])
    got = infonce_triton(q, key, queue, 0.07)
    dq, dk = torch.autograd.grad(3.0 * got, [q, key])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, want_dq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dk, want_dk, rtol=1e-4, atol=1e-6)
    # A detached key (MoCo's momentum encoder) gets no gradient, q still does; the queue
    # cut into parallel ranges (as on a GPU) merges to the same loss and gradient.
    split_loss = infonce_triton(q, key.detach(), queue, 0.07, splits=3)
    torch.testing.assert_close(split_loss, want, rtol=1e-5, atol=1e-5)
    dq_only = torch.autograd.grad(split_loss, q)[0]
    torch.testing.assert_close(dq_only, want_dq / 3.0, rtol=1e-4, atol=1e-6)


def test_infonce_triton_keeps_no_logits_for_backward(triton_here):
    if not triton_here:
        return
    b, k, d = 8, 300, 16
    q, key, queue = _qkq(b, k, d)
    ref = infonce_held_bytes(infonce_torch, q, key.detach(), queue, 0.1)
    fused = infonce_held_bytes(infonce_triton, q, key.detach(), queue, 0.1)
    assert ref >= infonce_saved_bytes(b, k, d, "torch")["held_for_backward"] == b * (1 + k) * 4
    assert fused == infonce_saved_bytes(b, k, d, "triton")["held_for_backward"] == 2 * b * 4


def test_infonce_refuses_bad_input():
    q, k, queue = _qkq(4, 9, 8)
    with pytest.raises(UserInputError, match="queue"):
        infonce_torch(q, k, queue[:, :4], 0.1)
    with pytest.raises(UserInputError, match="temperature"):
        infonce_loss(q, k, queue, 0.0)


# ---------------------------------------------------------------------- dispatcher


def test_dispatcher_picks_torch_on_cpu_and_says_why(monkeypatch):
    monkeypatch.delenv("SASI_KERNEL_BACKEND", raising=False)
    choice = choose_backend(torch.zeros(3), kernel="infonce")
    assert choice.backend == "torch"  # even with the interpreter on: auto never picks it
    assert "input is on cpu" in choice.reason and "CUDA" in choice.reason
    q, k, queue = _qkq(4, 9, 8)
    loss = infonce_loss(q, k, queue, 0.1)
    assert torch.equal(loss, infonce_torch(q, k, queue, 0.1))
    assert last_choice("infonce") == choice
    monkeypatch.setenv("SASI_KERNEL_BACKEND", "torch")
    infonce_loss(q, k, queue, 0.1)
    assert "forced" in last_choice("infonce").reason


def test_dispatcher_forcing_by_env_var(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("SASI_KERNEL_BACKEND", "torch")
    assert "forced by SASI_KERNEL_BACKEND=torch" in choose_backend(x).reason
    monkeypatch.setenv("SASI_KERNEL_BACKEND", "fastest")
    with pytest.raises(UserInputError, match="SASI_KERNEL_BACKEND"):
        choose_backend(x)


@pytest.fixture
def fresh_probe():
    from sasi_online.kernels import probe

    probe.forget()
    yield probe
    probe.forget()


def test_probe_runs_a_real_triton_kernel_once_per_process(triton_here, fresh_probe):
    if not triton_here:
        return
    assert fresh_probe.probe("cpu") is None  # compiled-free: the interpreter launches the kernel
    assert fresh_probe.probe("cpu") is None and fresh_probe.probe_runs("cpu") == 1


def test_probe_failure_disables_triton_logs_once_and_counts(fresh_probe, monkeypatch, caplog):
    """Fault injection: the probe's compile raises as it does on a box with no C compiler."""
    from sasi_online.kernels import dispatch, dispatch_counts

    def no_compiler(device_type):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(fresh_probe, "compile_and_run", no_compiler)
    with caplog.at_level("WARNING", logger="sasi_online.kernels"):
        problem = fresh_probe.probe("cuda")
        assert fresh_probe.probe("cuda") == problem and fresh_probe.probe_runs("cuda") == 1
    assert problem and "C compiler" in problem and "probe kernel failed" in problem
    assert sum("Triton disabled on cuda" in r.getMessage() for r in caplog.records) == 1
    choice = dispatch.auto_choice("ring_augment", ["cuda"], None, fresh_probe.probe)
    assert choice.backend == "torch" and "C compiler" in choice.reason
    fresh_probe.forget()
    monkeypatch.setattr(fresh_probe, "compile_and_run", lambda device_type: None)
    assert dispatch.auto_choice("ring_augment", ["cuda"], None, fresh_probe.probe).backend == "triton"
    before = dispatch_counts().get("ring_augment", {}).get("torch", 0)
    monkeypatch.delenv("SASI_KERNEL_BACKEND", raising=False)
    p = sample_aug_params(2, (20, 24))
    torch.testing.assert_close(augment_views(_images(n=2), p, 8), ring_augment_torch(_images(n=2), p, 8))
    assert dispatch_counts()["ring_augment"]["torch"] == before + 1
    assert "per-view loop" in last_choice("ring_augment").reason


def test_forced_triton_is_refused_when_the_probe_failed(triton_here, fresh_probe, monkeypatch):
    if not triton_here:
        return
    from sasi_online.kernels import TritonUnavailableError

    def no_python_h(device_type):
        raise OSError("fatal error: Python.h: No such file or directory")

    monkeypatch.setattr(fresh_probe, "compile_and_run", no_python_h)
    with pytest.raises(TritonUnavailableError, match="Python.h.*backend='torch'"):
        augment_views(_images(n=2), sample_aug_params(2, (20, 24)), 8, backend="triton")


FORCED_TRITON_ON_CPU = """
import torch
from sasi_online.kernels import TritonUnavailableError, augment_views, sample_aug_params
imgs = torch.zeros(2, 20, 24, 3, dtype=torch.uint8)
try:
    augment_views(imgs, sample_aug_params(2, (20, 24)), 8, backend="triton")
except TritonUnavailableError as exc:
    print("REFUSED:", exc)
"""


def test_forced_backend_on_cpu_without_interpreter_is_refused_with_the_fix():
    """Needs a process whose triton was imported in compiled mode."""
    r = _run([sys.executable, "-c", FORCED_TRITON_ON_CPU],
             {"TRITON_INTERPRET": None, "SASI_KERNEL_BACKEND": None}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED: ring_augment" in r.stdout
    assert "TRITON_INTERPRET=1" in r.stdout and "backend='torch'" in r.stdout


def test_every_kernel_compiles_for_the_h200_without_a_gpu(tmp_path):
    """The interpreter accepts code the compiler rejects: compile each kernel for sm_90
    (Triton's front end, LLVM and ptxas) in a process without the interpreter."""
    r = _run([sys.executable, "-m", "sasi_online.kernels.compile_check", "--arch", "90"],
             {"TRITON_INTERPRET": None, "TRITON_CACHE_DIR": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = json.loads(r.stdout)
    assert {x["kernel"] for x in records} == {"probe_kernel", "guided_step_kernel", "grey_sum_kernel",
                                             "augment_kernel", "infonce_fwd_kernel",
                                             "infonce_bwd_kernel"}
    assert all(x["ok"] for x in records)


def test_dispatcher_forced_triton_runs_in_the_interpreter(triton_here):
    if not triton_here:
        return
    imgs = _images(n=2)
    p = sample_aug_params(2, (20, 24), generator=torch.Generator().manual_seed(0))
    choice = choose_backend(imgs, backend="triton")
    assert choice.backend == "triton" and "interpreter" in choice.reason
    torch.testing.assert_close(augment_views(imgs, p, 8, backend="triton"),
                               augment_views(imgs, p, 8, backend="torch"), rtol=1e-4, atol=1e-4)


def test_infonce_triton_forced_by_env_refuses_wide_features(triton_here, monkeypatch):
    if not triton_here:
        return
    # Forcing Triton through the environment must not silently fall back to the reference.
    monkeypatch.setenv("SASI_KERNEL_BACKEND", "triton")
    from sasi_online.kernels.infonce import MAX_DIM

    q, k, queue = _qkq(2, 4, MAX_DIM + 8)
    with pytest.raises(UserInputError, match="exceeds the fused kernel"):
        infonce_loss(q, k, queue, 0.1)
