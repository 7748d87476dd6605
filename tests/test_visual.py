"""Segmenter → palette mask maps, the four VP kinds, VP augmentation, variant seeds."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from sasi_online.config import VisualConfig
from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.visual.augment import augment_visual_prompt
from sasi_online.visual.palette import ADE20K_PALETTE, NUM_CLASSES, colorize
from sasi_online.visual.prompts import (build_visual_prompts, make_visual_prompt, prepare_image,
                                        validate_visual_config)
from sasi_online.visual.segmenter import Segmenter
from sasi_online.visual.variants import plan_variant, variant_seed

RES = 32


def _tiny_upernet(folder, num_labels=NUM_CLASSES):
    """A tiny real UperNet (ConvNeXt backbone) + its image processor, saved HF-style."""
    import torch
    from transformers import (ConvNextConfig, SegformerImageProcessor, UperNetConfig,
                              UperNetForSemanticSegmentation)

    torch.manual_seed(0)
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = UperNetConfig(backbone_config=backbone, hidden_size=16, num_labels=num_labels,
                        use_auxiliary_head=False)
    model = UperNetForSemanticSegmentation(cfg)
    with torch.no_grad():  # a random head favours one class; spread the logits over many
        model.decode_head.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def upernet_dir(tmp_path_factory):
    return _tiny_upernet(tmp_path_factory.mktemp("upernet"))


def _palette_only(img) -> bool:
    arr = np.asarray(img).reshape(-1, 3)
    colours = np.unique(arr, axis=0)
    return all((ADE20K_PALETTE == c).all(axis=1).any() for c in colours)


def _photo(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_palette_and_colorize():
    assert ADE20K_PALETTE.shape == (150, 3) and ADE20K_PALETTE.dtype == np.uint8
    ids = np.array([[0, 2], [12, 149]])
    out = colorize(ids)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [120, 120, 120]  # wall
    assert out[0, 1].tolist() == [6, 230, 230]  # sky
    assert out[1, 0].tolist() == [150, 5, 61]  # person
    assert out[1, 1].tolist() == [92, 0, 255]  # flag
    for bad in (np.array([[150]]), np.array([[-1]]), np.zeros((2, 2), np.float32)):
        with pytest.raises(ValueError):
            colorize(bad)


def test_segmenter_batched_maps_use_palette_colours(upernet_dir):
    seg = Segmenter(upernet_dir, batch_size=2, size=32)
    images = [_photo(i) for i in range(3)]
    maps = seg.segment(images)
    assert [m.shape for m in maps] == [(30, 40)] * 3 and maps[0].dtype == np.uint8
    assert all(m.max() < NUM_CLASSES for m in maps)
    assert len(np.unique(np.concatenate([m.ravel() for m in maps]))) > 1
    # batching does not change a map
    one_by_one = Segmenter(upernet_dir, batch_size=1, size=32).segment(images)
    for a, b in zip(maps, one_by_one):
        assert (a == b).mean() > 0.99
    masks = seg.mask_maps(images, out_size=(RES, RES))
    assert all(m.size == (RES, RES) and m.mode == "RGB" for m in masks)
    assert all(_palette_only(m) for m in masks)


def test_segmenter_loads_the_zoo_upernet(tiny_zoo):
    # the session-wide tiny zoo (shared with the generation tests); its UperNet has 150 labels
    maps = Segmenter(tiny_zoo / "upernet", size=32).mask_maps([_photo(0), _photo(1)], out_size=(RES, RES))
    assert all(m.size == (RES, RES) and _palette_only(m) for m in maps)


def test_segmenter_refuses_bad_folders(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Segmenter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="config.json"):
        Segmenter(tmp_path / "empty")
    wide = _tiny_upernet(tmp_path / "wide", num_labels=151)
    with pytest.raises(ModelFolderError, match="150"):
        Segmenter(wide)


def test_every_vp_kind_matches_the_table():
    real = _photo(7, size=(48, 36))
    ids = np.zeros((RES, RES), np.int64)
    ids[8:20, 4:28] = 12
    mask = colorize(ids)
    prepared = np.asarray(prepare_image(real, RES)).astype(np.int32)

    vp = make_visual_prompt("image", real, None, resolution=RES, seed=5)
    assert vp.control_image is None and vp.init_image.size == (RES, RES) and vp.seed == 5
    np.testing.assert_array_equal(np.asarray(vp.init_image), prepared)

    vp = make_visual_prompt("mask", None, ids, resolution=RES, seed=5)
    assert vp.init_image is None
    np.testing.assert_array_equal(np.asarray(vp.control_image), mask)

    vp = make_visual_prompt("mix", real, Image.fromarray(mask), resolution=RES, seed=5)
    np.testing.assert_array_equal(np.asarray(vp.control_image), mask)
    expected = (prepared + mask.astype(np.int32)) / 2.0  # alpha = 0.5
    assert np.abs(np.asarray(vp.init_image).astype(np.int32) - expected).max() <= 1.0

    vp = make_visual_prompt("noise", real, mask, resolution=RES, seed=5)
    assert vp.init_image is None and vp.control_image is None and vp.kind == "noise"

    with pytest.raises(UserInputError, match="mask map"):
        make_visual_prompt("mix", real, None, resolution=RES, seed=0)
    with pytest.raises(UserInputError, match="visual.kind"):
        make_visual_prompt("depth", real, None, resolution=RES, seed=0)


def test_build_visual_prompts_with_segmenter_and_seeds(upernet_dir):
    seg = Segmenter(upernet_dir, size=32)
    cfg = VisualConfig(kind="mix")
    images = [_photo(1), _photo(2), _photo(1)]
    vps = build_visual_prompts(images, [10, 11, 10], [0, 0, 1], cfg=cfg, resolution=RES,
                               base_seed=3, segmenter=seg)
    assert [vp.seed for vp in vps] == [variant_seed(10, 0, 3), variant_seed(11, 0, 3), variant_seed(10, 1, 3)]
    for vp, img in zip(vps, images):
        assert _palette_only(vp.control_image)
        blend = (np.asarray(prepare_image(img, RES)).astype(np.int32) + np.asarray(vp.control_image)) / 2.0
        assert np.abs(np.asarray(vp.init_image) - blend).max() <= 1.0
    np.testing.assert_array_equal(np.asarray(vps[0].control_image), np.asarray(vps[2].control_image))
    with pytest.raises(UserInputError, match="segmenter"):
        build_visual_prompts(images, [0, 1, 2], [0, 0, 0], cfg=cfg, resolution=RES, base_seed=0)
    plain = build_visual_prompts(images, [0, 1, 2], [0, 0, 0], cfg=VisualConfig(kind="image"),
                                 resolution=RES, base_seed=0)  # no segmenter needed
    assert all(vp.control_image is None for vp in plain)


def test_noise_augmentation_reproducible_per_seed_and_differs_across_variants():
    grey = Image.new("RGB", (RES, RES), (128, 128, 128))
    cfg = VisualConfig(kind="image", augment="noise", noise_std=0.05, variants=3)
    run = lambda: build_visual_prompts([grey] * 3, [4, 4, 4], [0, 1, 2], cfg=cfg, resolution=RES, base_seed=0)
    a, b = run(), run()
    arrays = [np.asarray(vp.init_image).astype(np.float32) / 255 for vp in a]
    assert [vp.augment for vp in a] == ["none", "noise", "noise"]
    np.testing.assert_array_equal(arrays[0], np.asarray(grey, np.float32) / 255)  # variant 0 is plain
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x.init_image), np.asarray(y.init_image))
    assert not np.array_equal(arrays[1], arrays[2])
    assert abs(float((arrays[1] - arrays[0]).std()) - 0.05) < 0.01  # std in [0, 1] image units


def test_noise_is_one_field_for_init_and_control():
    ids = np.full((RES, RES), 1)  # control colour (180, 120, 120), mid-range so nothing clips
    vp = make_visual_prompt("mix", Image.new("RGB", (RES, RES), (100, 120, 140)), ids, resolution=RES, seed=9)
    out = augment_visual_prompt(vp, "noise", noise_std=0.03)
    d_init = np.asarray(out.init_image, np.int32) - np.asarray(vp.init_image, np.int32)
    d_ctrl = np.asarray(out.control_image, np.int32) - np.asarray(vp.control_image, np.int32)
    assert np.abs(d_init).mean() > 2 and np.abs(d_init - d_ctrl).max() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_crop_keeps_init_and_control_aligned(seed):
    ids = np.zeros((RES, RES), np.int64)
    ids[10:22, 10:22] = 12  # a central "person" square: part of it survives any 0.6 crop
    init = Image.fromarray(np.where(ids[..., None] == 12, 255, 0).astype(np.uint8).repeat(3, axis=2))
    vp = make_visual_prompt("mix", init, ids, resolution=RES, seed=seed)
    out = augment_visual_prompt(vp, "crop", crop_scale=0.6)
    assert out.augment == "crop" and out.init_image.size == out.control_image.size == (RES, RES)
    assert _palette_only(out.control_image)
    person = (np.asarray(out.control_image) == ADE20K_PALETTE[12]).all(axis=2)
    bright = np.asarray(out.init_image).mean(axis=2) > np.asarray(vp.init_image).mean() + 20
    inter, union = (person & bright).sum(), (person | bright).sum()
    assert union > 0 and inter / union > 0.8
    assert not np.array_equal(person, ids == 12)  # the crop moved or zoomed the square
    again = augment_visual_prompt(vp, "crop", crop_scale=0.6)
    np.testing.assert_array_equal(np.asarray(again.control_image), np.asarray(out.control_image))


def test_variant_plan_covers_semantic_times_vp_and_repeats_with_new_seeds():
    plans = [plan_variant(5, v, semantic_variants=2, vp_variants=3, augment="crop", base_seed=1) for v in range(7)]
    assert {(p.rewrite_index, p.vp_index) for p in plans[:6]} == {(r, k) for r in range(2) for k in range(3)}
    assert [p.augment for p in plans[:6]] == ["none", "none", "crop", "crop", "crop", "crop"]
    assert (plans[6].rewrite_index, plans[6].vp_index) == (0, 0) and plans[6].seed != plans[0].seed
    seeds = {variant_seed(i, v, 0) for i in range(100) for v in range(10)}
    assert len(seeds) == 1000 and variant_seed(3, 1, 0) == variant_seed(3, 1, 0) != variant_seed(3, 1, 1)
    with pytest.raises(UserInputError):
        plan_variant(0, -1)


@pytest.mark.parametrize("field,value", [("kind", "depth"), ("augment", "blur"), ("mix_alpha", 1.5),
                                         ("noise_std", -0.1), ("crop_scale", 0.0), ("variants", 0)])
def test_bad_visual_config_is_refused_by_name(field, value):
    with pytest.raises(UserInputError, match=f"visual.{field}"):
        validate_visual_config(dataclasses.replace(VisualConfig(), **{field: value}))
