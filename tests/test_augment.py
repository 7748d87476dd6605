"""Both backends of every shipped recipe: shapes, value ranges, fresh draws, bad recipes;
the blur rule every backend (torchvision, DALI, device views) shares."""
import numpy as np
import pytest
import torch

from sasi_online.data.augment import (PLAIN, TorchvisionAugmenter, blur_kernel_for, blur_neighbour_weight,
                                      build_torchvision_transform, load_recipe)
from sasi_online.errors import UserInputError

IMAGES = [np.random.default_rng(i).integers(0, 256, (28 + 4 * i, 28, 3), dtype=np.uint8) for i in range(6)]


def _backends(recipe, side=32, max_batch=4):
    yield TorchvisionAugmenter(recipe, side)
    from sasi_online.data.dali_pipeline import DaliAugmenter, dali_available

    if dali_available():
        yield DaliAugmenter(recipe, side, seed=0, max_batch=max_batch)  # 6 images, 4: two runs, one partial


def _bounds(recipe):
    mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
    return ((0 - mean) / std).min().item(), ((1 - mean) / std).max().item()


@pytest.mark.parametrize("name", ["mocov2", "simclr", "dino"])
def test_recipe_shapes_ranges_and_fresh_draws(name):
    recipe = load_recipe(name)
    lo, hi = _bounds(recipe)
    kinds = recipe.view_kinds(2, 2 if recipe.local_view else 0)
    for aug in _backends(recipe):
        for kind in sorted(set(kinds)):
            side = recipe.spec(kind).side(32)
            a, b = aug.apply(kind, IMAGES), aug.apply(kind, IMAGES)
            assert a.shape == (6, 3, side, side) and a.dtype == torch.float32, (aug.backend, kind)
            assert a.min() >= lo - 1e-4 and a.max() <= hi + 1e-4
            assert a.std() > 0.1  # not a blank image
            assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3, (aug.backend, kind)  # every image redrawn


def test_dali_and_torchvision_agree_on_plain_resize():
    from sasi_online.data.dali_pipeline import DaliAugmenter, dali_available

    if not dali_available():
        pytest.skip("nvidia-dali not installed")
    recipe = load_recipe("mocov2")
    smooth = [np.kron(im[::4, ::4], np.ones((4, 4, 1), np.uint8)) for im in IMAGES[:2]]
    a = TorchvisionAugmenter(recipe, 32).apply(PLAIN, smooth)
    b = DaliAugmenter(recipe, 32, max_batch=2).apply(PLAIN, smooth)
    # same normalisation; resampling filters differ slightly between the libraries
    assert (a - b).abs().mean() < 0.1


def _blur_recipe(tmp_path, sigma, sigma_at=None, fixed=False):
    """A one-view recipe from YAML; `fixed`: the whole image at its own side, no flip or
    colour, blur always: only the blur changes the pixels."""
    at = "" if sigma_at is None else f", sigma_at: {sigma_at}"
    rest = "scale: [1.0, 1.0], ratio: [1.0, 1.0], flip: 0.0, jitter: {prob: 0.0}, grayscale: 0.0, " \
        if fixed else ""
    path = tmp_path / "blur.yaml"
    path.write_text(f"global:\n  - {{{rest}blur: {{prob: 1.0, sigma: {list(sigma)}{at}}}}}\n"
                    f"local:\n  {{size: 0.5, blur: {{prob: 1.0, sigma: {list(sigma)}{at}}}}}\n")
    return load_recipe(str(path))


# side, recipe sigma, sigma_at -> sigma range in pixels of the view, kernel (odd, +-3 sigma_max, <= side)
BLUR_RULE = [(32, (0.1, 2.0), 224, (0.1 * 32 / 224, 2.0 * 32 / 224), 3),
             (64, (0.1, 2.0), 224, (0.1 * 64 / 224, 2.0 * 64 / 224), 5),
             (224, (0.1, 2.0), 224, (0.1, 2.0), 13),
             (64, (0.1, 2.0), 32, (0.2, 4.0), 25),
             (32, (0.1, 1.0), None, (0.1, 1.0), 7),
             (64, (0.1, 1.0), None, (0.1, 1.0), 7),
             (224, (0.1, 1.0), None, (0.1, 1.0), 7),
             (224, (0.1, 2.0), None, (0.1, 2.0), 13),
             (32, (0.5, 6.0), None, (0.5, 6.0), 31)]  # +-3 sigma needs 37: the largest odd <= 32


@pytest.mark.parametrize("side,sigma,sigma_at,want_sigma,want_kernel", BLUR_RULE)
def test_blur_sigma_is_in_pixels_of_the_view_unless_sigma_at_says(tmp_path, side, sigma, sigma_at,
                                                                  want_sigma, want_kernel):
    recipe = _blur_recipe(tmp_path, sigma, sigma_at)
    spec = recipe.spec("global0")
    assert spec.blur_sigma_at == sigma_at
    assert spec.sigma_range(side) == pytest.approx(want_sigma, rel=1e-9)
    assert spec.blur_kernel(side) == want_kernel
    blur = [t for t in build_torchvision_transform(recipe, "global0", side).transforms
            if type(t).__name__ == "RandomApply"][-1].transforms[0]
    assert tuple(blur.kernel_size) == (want_kernel, want_kernel)
    assert tuple(blur.sigma) == pytest.approx(want_sigma, rel=1e-9)
    # the local crop (half the side) follows the same rule at its own side
    local = recipe.spec("local")
    f = 1.0 if sigma_at is None else (side // 2) / sigma_at
    assert local.sigma_range(side) == pytest.approx((sigma[0] * f, sigma[1] * f), rel=1e-9)
    assert local.blur_kernel(side) == blur_kernel_for(sigma[1] * f, side // 2)


def test_blur_kernel_rule_and_neighbour_weight():
    assert [blur_kernel_for(s, 224) for s in (0.05, 0.29, 0.34, 1.0, 1.01, 2.0)] == [3, 3, 5, 7, 9, 13]
    assert blur_kernel_for(2.0, 8) == 7 and blur_kernel_for(2.0, 13) == 13 and blur_kernel_for(2.0, 2) == 1
    assert blur_kernel_for(0.1 * 10 / 3) == 3 and blur_kernel_for(7.0) == 43  # no cap without a side
    with pytest.raises(UserInputError, match="sigma_max"):
        blur_kernel_for(0.0, 32)
    # the numbers: SimCLR's 224-px sigma at 32 px barely blurs; sigma quoted at 32 px does
    mocov2 = load_recipe("mocov2").spec("global0")
    lo, hi = mocov2.sigma_range(32)
    assert mocov2.blur_kernel(32) == 3 and hi == pytest.approx(2.0 * 32 / 224)
    assert blur_neighbour_weight(hi, 3) < 0.0025
    assert blur_neighbour_weight(1.0, blur_kernel_for(1.0, 32)) > 0.10
    assert blur_neighbour_weight(1.0, 7) == pytest.approx(0.2420, abs=1e-4)
    assert blur_neighbour_weight(0.5, 1) == 0.0
    # torchvision's own taps: blur a one-pixel vertical line, read the row
    from torchvision.transforms.v2 import functional as F

    for sigma, k in ((0.2857, 3), (1.0, 7), (2.0, 13)):
        line = torch.zeros(1, 9, 31)
        line[..., 15] = 1.0
        row = F.gaussian_blur(line, [k, k], [sigma, sigma])[0, 4]
        assert float(row[16]) == pytest.approx(blur_neighbour_weight(sigma, k), rel=1e-4)
    with pytest.raises(UserInputError, match="odd"):
        blur_neighbour_weight(1.0, 4)


@pytest.mark.parametrize("side,sigma,sigma_at", [(32, 1.0, None), (32, 2.0, 224), (224, 2.0, 224),
                                                 (224, 1.5, None)])
def test_torchvision_dali_and_device_views_blur_alike(tmp_path, side, sigma, sigma_at):
    """One sigma (a range of one value: the same draw everywhere) on the whole image at its own
    side: torchvision and DALI (uint8 blur, rounded) agree within one grey level, the device
    views' torch reference (float blur) within half of one."""
    from sasi_online.kernels import AugRecipe, ring_augment_torch, sample_aug_params

    recipe = _blur_recipe(tmp_path, (sigma, sigma), sigma_at, fixed=True)
    spec = recipe.spec("global0")
    images = [np.random.default_rng(10 + i).integers(0, 256, (side, side, 3), dtype=np.uint8) for i in range(2)]
    level = 1.0 / 255 / min(recipe.std)  # one grey level after normalisation
    plain = TorchvisionAugmenter(recipe, side).apply(PLAIN, images)
    r = AugRecipe.from_view_spec(spec, recipe.mean, recipe.std, image_size=side)
    p = sample_aug_params(2, (side, side), r, torch.Generator().manual_seed(0))
    assert r.blur_kernel == p.blur_kernel == spec.blur_kernel(side)
    assert torch.allclose(p.blur_sigma, torch.tensor(spec.sigma_range(side)[0]))
    device = ring_augment_torch(torch.from_numpy(np.stack(images)), p, side, mean=recipe.mean, std=recipe.std)
    if sigma_at is None:  # the sigma is in pixels of the view: a real blur, at any side
        assert (device - plain).abs().mean() > 0.5
    outs = {aug.backend: aug.apply("global0", images) for aug in _backends(recipe, side, max_batch=2)}
    for backend, out in outs.items():
        assert (out - device).abs().max() <= 0.5 * level + 1e-4, backend
    if "dali" in outs:
        assert (outs["dali"] - outs["torchvision"]).abs().max() <= level + 1e-4


def test_local_crops_need_a_local_section():
    with pytest.raises(UserInputError, match="local"):
        load_recipe("mocov2").spec("local")


def test_bad_recipes_are_refused(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_recipe("moco_v9")
    bad = tmp_path / "bad.yaml"
    bad.write_text("global:\n  - flip: 1.5\n")
    with pytest.raises(UserInputError, match="flip"):
        load_recipe(str(bad))
    bad.write_text("global:\n  - flop: 0.5\n")
    with pytest.raises(UserInputError, match="unknown keys"):
        load_recipe(str(bad))
    for text, match in (("- flip: 0.5\n", "non-empty 'global' list"),
                        ("global: [flip: 0.5\n", "not valid YAML"),
                        ("global:\n  - jitter: 0.4\n", "'jitter' must be a mapping"),
                        ("global:\n  - ratio: [1.5, 0.5]\n", "ratio"),
                        ("global:\n  - blur: {sigma: [2.0, 0.1]}\n", "blur.sigma"),
                        ("global:\n  - blur: {sigma: 2.0}\n", r"blur.sigma must be \[min, max\]"),
                        ("global:\n  - blur: {sigma: [0.1, 2.0], sigma_at: 0}\n", "blur.sigma_at must be"),
                        ("global:\n  - blur: {sigma: [0.1, 2.0], sigma_at: -224}\n", "blur.sigma_at must be"),
                        ("global:\n  - blur: {sigma: [0.1, 2.0], sigma_at: 224px}\n", "blur.sigma_at must be"),
                        ("global:\n  - blur: {sigma: [0.1, 2.0], sigma_At: 224}\n", "unknown blur keys")):
        bad.write_text(text)
        with pytest.raises(UserInputError, match=match):
            load_recipe(str(bad))


def test_a_recipe_without_colour_jitter_spread_runs_on_every_backend():
    """The science bench's grey recipe: saturation and hue 0 (a constant, not a random range,
    for DALI, which refuses an empty range) and a blur in pixels of the 32-px view."""
    from pathlib import Path

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "bench" / "science_aug.yaml"))
    assert recipe.global_views[0].blur_kernel(32) == 7
    for aug in _backends(recipe):
        a = aug.apply("global0", IMAGES)
        assert a.shape == (6, 3, 32, 32) and torch.isfinite(a).all() and a.std() > 0.1, aug.backend
