"""Both backends of every shipped recipe: shapes, value ranges, fresh draws, bad recipes."""
import numpy as np
import pytest
import torch

from sasi_online.data.augment import PLAIN, TorchvisionAugmenter, load_recipe
from sasi_online.errors import UserInputError

IMAGES = [np.random.default_rng(i).integers(0, 256, (28 + 4 * i, 28, 3), dtype=np.uint8) for i in range(6)]


def _backends(recipe):
    yield TorchvisionAugmenter(recipe, 32)
    from sasi_online.data.dali_pipeline import DaliAugmenter, dali_available

    if dali_available():
        yield DaliAugmenter(recipe, 32, seed=0, max_batch=4)  # 6 images: two runs, one partial


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
                        ("global:\n  - blur: {sigma: [2.0, 0.1]}\n", "blur.sigma")):
        bad.write_text(text)
        with pytest.raises(UserInputError, match=match):
            load_recipe(str(bad))
