"""Each pair mode feeds each view from the right image.

Real images are constant red, SASI constant green/blue; with colour augmentation off a
view's mean colour tells which image it came from.
"""
import numpy as np
import pytest
import torch

from sasi_online.data.augment import Recipe, TorchvisionAugmenter, ViewSpec
from sasi_online.data.pairs import PAIR_MODES, PairBuilder, check_pair_mode
from sasi_online.data.sasi_source import ArraySource
from sasi_online.errors import UserInputError

RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)


def _img(rgb, side=20):
    return np.broadcast_to(np.array(rgb, np.uint8), (side, side, 3)).copy()


def _colourless_augmenter():
    spec = ViewSpec(scale=(0.3, 1.0), flip=0.5, jitter_prob=0.0, grayscale=0.0, blur_prob=0.0)
    local = ViewSpec(size=0.5, scale=(0.1, 0.4), jitter_prob=0.0, grayscale=0.0, blur_prob=0.0)
    recipe = Recipe("test", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), [spec], local, 2)
    return TorchvisionAugmenter(recipe, 16)


def _which(view):
    """Per-sample source name from the dominant channel."""
    names = {0: "x", 1: "s", 2: "s'"}
    return [names[int(v.mean(dim=(1, 2)).argmax())] for v in view]


# image 0: two SASI (green, blue); 1: one SASI (green); 2: only a fishy SASI; 3: none
REAL = [_img(RED) for _ in range(4)]
SASI = {0: [_img(GREEN), _img(BLUE)], 1: [_img(GREEN)], 2: [_img(GREEN)]}
FISHY = {(2, 0)}


def _build(mode, num_local=0, seed=0):
    src = None if mode == "base" else ArraySource(SASI, FISHY)
    pb = PairBuilder(mode, _colourless_augmenter(), src, num_global=2, num_local=num_local)
    torch.manual_seed(seed)
    return pb.build(REAL, [0, 1, 2, 3], np.random.default_rng(seed)), src


def test_base_two_real_views():
    batch, _ = _build("base")
    assert len(batch.views) == 2
    for v, origin in zip(batch.views, batch.origins):
        assert _which(v) == ["x"] * 4 == origin


def test_sasi_pairs_real_with_synthetic_and_falls_back():
    batch, src = _build("sasi")
    assert _which(batch.views[0]) == ["x"] * 4
    second = _which(batch.views[1])
    assert second[0] in ("s", "s'")  # either SASI variant of image 0 (green or blue)
    assert second[1] == "s" and second[2:] == ["x", "x"]  # fishy and missing fall back to x
    assert src.counts == {"hit": 2, "fishy": 1, "missing": 1}
    assert batch.outcomes == src.counts


def test_sasi_draws_among_variants():
    seen = {_which(_build("sasi", seed=s)[0].views[1])[0] for s in range(12)}
    assert seen == {"s", "s'"}  # both variants of image 0 get drawn


def test_sasi_real_aug_leaves_sasi_unaugmented():
    batch, _ = _build("sasi_real_aug")
    sasi_view = batch.views[1][:2]
    # `plain` is a resize of a constant image: exactly the constant colour, no crop/flip
    assert torch.allclose(sasi_view[1], torch.tensor([0.0, 200 / 255, 0.0]).view(3, 1, 1).expand(3, 16, 16), atol=1e-6)
    assert _which(batch.views[0]) == ["x"] * 4


def test_sasi_no_aug_is_resize_only():
    real = [np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8) for i in range(2)]
    src = ArraySource({0: [real[1]], 1: [real[0]]})
    pb = PairBuilder("sasi_no_aug", _colourless_augmenter(), src)
    a = pb.build(real, [0, 1], np.random.default_rng(0))
    torch.manual_seed(123)
    b = pb.build(real, [0, 1], np.random.default_rng(1))
    assert torch.equal(a.views[0], b.views[0]) and torch.equal(a.views[1], b.views[1])
    assert torch.equal(a.views[0][1], a.views[1][0])  # SASI of image 0 is real image 1, resized alike


def test_three_flow_has_two_real_and_one_sasi_view():
    batch, _ = _build("three_flow")
    assert len(batch.views) == 3
    assert _which(batch.views[0]) == _which(batch.views[1]) == ["x"] * 4
    assert _which(batch.views[2])[1] == "s"


def test_synthetic_only_uses_two_sasi():
    seen = set()
    for seed in range(8):
        batch, _ = _build("synthetic_only", seed=seed)
        v0, v1 = _which(batch.views[0]), _which(batch.views[1])
        assert v0[1] == v1[1] == "s"  # one SASI: two draws of it
        assert v0[3] == v1[3] == "x"  # none: real views
        assert v0[0] in ("s", "s'") and v1[0] in ("s", "s'")
        seen.add((v0[0], v1[0]))
    assert any(a != b for a, b in seen)  # s and s' differ at least sometimes


def test_mix_keeps_real_and_sasi_pairs_separate():
    kinds = []
    for seed in range(6):
        batch, _ = _build("mix", seed=seed)
        v0, v1 = _which(batch.views[0]), _which(batch.views[1])
        assert v0 == v1  # never a (real, SASI) pair
        assert v0[2] == v0[3] == "x"  # no usable SASI -> real pair
        kinds.append(v0[1])
    assert set(kinds) == {"x", "s"}


def test_multicrop_globals_from_x_and_s_locals_from_both():
    batch, _ = _build("sasi", num_local=2)
    assert len(batch.views) == 4
    assert batch.views[2].shape[-1] == 8  # local crops are smaller
    assert _which(batch.views[0]) == ["x"] * 4 and _which(batch.views[1])[1] == "s"
    assert _which(batch.views[2]) == ["x"] * 4 and _which(batch.views[3])[1] == "s"


@pytest.mark.parametrize("mode", sorted(set(PAIR_MODES) - {"base"}))
def test_sasi_modes_refused_without_store(mode):
    with pytest.raises(UserInputError, match="store.path"):
        check_pair_mode(mode, has_sasi=False)


def test_unknown_mode_refused():
    with pytest.raises(UserInputError, match="pair_mode"):
        check_pair_mode("sasii", has_sasi=True)


def test_store_source_reads_a_real_store(tmp_path):
    from sasi_online.data.sasi_source import StoreSource
    from sasi_online.data.store import SasiStore

    store = SasiStore.create(tmp_path / "s", dataset={"name": "t", "split": "train", "size": 3},
                             models={}, settings={})
    store.add(_img(GREEN), index=0, variant=0, relpath="train/a/0", vp_kind="image")
    store.add(_img(BLUE), index=0, variant=1, relpath="train/a/0", vp_kind="noise")
    store.add(_img(GREEN), index=1, variant=0, relpath="train/a/1", vp_kind="noise")
    store.update(1, 0, fishy=True)
    store.close()
    rng = np.random.default_rng(0)
    src = StoreSource(SasiStore.open(tmp_path / "s"))
    hits = src.get([0, 1, 2], rng)
    assert [h.outcome for h in hits] == ["hit", "fishy", "missing"]
    assert {src.get([0], rng)[0].variant for _ in range(10)} == {0, 1}
    direct = StoreSource(SasiStore.open(tmp_path / "s"), vp_kind="noise")  # caption-only SASI
    assert {direct.get([0], rng)[0].variant for _ in range(6)} == {1}
    assert tuple(direct.get([0], rng)[0].image[0, 0]) == BLUE
    # `sasi generate --vp-kind direct` writes vp_kind 'direct': also caption-only
    store = SasiStore.open(tmp_path / "s", writable=True)
    store.add(_img(BLUE), index=2, variant=0, relpath="train/a/2", vp_kind="direct")
    store.close()
    direct = StoreSource(SasiStore.open(tmp_path / "s"), vp_kind="noise")
    assert [h.outcome for h in direct.get([2], rng)] == ["hit"]
    assert [h.outcome for h in StoreSource(SasiStore.open(tmp_path / "s"), vp_kind="image").get([2], rng)] == ["missing"]


def test_mix_fetches_sasi_only_for_the_samples_that_use_them():
    """The coin is drawn first; real-pair samples are never looked up, so counts are uses."""
    src = ArraySource({i: [_img(GREEN)] for i in range(0, 40, 2)})  # even images have a SASI
    pb = PairBuilder("mix", _colourless_augmenter(), src, num_global=2)
    batch = pb.build([_img(RED)] * 40, list(range(40)), np.random.default_rng(3))
    synthetic = batch.origins[0].count("s")
    assert 0 < synthetic < 40
    assert batch.outcomes["hit"] == src.counts["hit"] == synthetic  # every SASI fetched was used
    assert 0 < src.counts["missing"] < 40 - synthetic  # only coin samples were asked for
    # a caller that resolved SASI itself passes its mask: the same rows, the same views
    rows = pb.sasi_rows(40, np.random.default_rng(3))
    again = ArraySource(src.images)
    pb2 = PairBuilder("mix", _colourless_augmenter(), again, num_global=2)
    torch.manual_seed(0)
    b2 = pb2.build([_img(RED)] * 40, list(range(40)), np.random.default_rng(9), sasi_rows=rows)
    assert sum(again.counts.values()) == int(rows.sum())
    assert [o == "s" for o in b2.origins[0]] == [bool(r) and i % 2 == 0 for i, r in enumerate(rows)]
