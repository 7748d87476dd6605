"""The micro model set shipped with the package: built byte-identically in seconds, and
judged by measured quality on the embedded test split (500 images from Fashion-MNIST's
official test split, which the micro set never saw). Goals from the micro-set issue."""
import json

import numpy as np
import pytest

from sasi_online.cli import main
from sasi_online.zoo import verify_zoo
from sasi_online.zoo.micro import judge as judge_mod
from sasi_online.zoo.micro import quality
from sasi_online.zoo.micro.data import FOREGROUND_THRESHOLD, embedded_split, load_split
from sasi_online.zoo.micro.ship import ASSETS, shipped_manifest

TRAINED = ("upernet", "blip2", "clip", "llama")


@pytest.fixture(scope="module")
def test_split():
    return embedded_split("test")


@pytest.fixture(scope="module")
def captions(micro_zoo, test_split):
    images, labels = test_split
    return quality.caption_scores(micro_zoo, images, labels)


def test_shipped_weights_are_small_hashed_and_trained():
    manifest = shipped_manifest()  # raises if any file differs from its sha256
    total = sum((ASSETS / rel).stat().st_size for rel in manifest["files"])
    assert total <= 10 * 2**20, total
    for name in TRAINED:
        assert name in manifest["models"], name
        assert any(rel.startswith(f"{name}/") and rel.endswith(".safetensors") for rel in manifest["files"])
    assert manifest["models"]["blip2"]["vision_steps"] > 0


def test_cli_build_micro_is_byte_identical_and_complete(micro_zoo, tmp_path):
    assert main(["zoo", "build", str(tmp_path / "again")]) == 0  # the micro set is the default
    a = json.loads((micro_zoo / "zoo.json").read_text())
    b = json.loads((tmp_path / "again" / "zoo.json").read_text())
    assert a["files"] == b["files"] and a["kind"] == "micro"
    assert verify_zoo(micro_zoo) == []
    shipped = shipped_manifest()["files"]
    copied = [rel for rel in a["files"] if rel.split("/")[0] in TRAINED]
    assert copied and all(a["files"][rel] == shipped[rel] for rel in copied)  # the shipped bytes
    diffusion = ("sd15", "sd21", "controlnet-sd15-seg", "controlnet-sd21-seg")  # shipped trained too
    assert not set(a["random"]) & set(TRAINED + diffusion)
    assert all(a["files"][f"{d}/{w}"] == shipped[f"{d}/{w}"] for d in diffusion
               for w in ("unet/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors")
               if f"{d}/{w}" in shipped)
    # a second build into the same folder is a no-op (--micro: the explicit name of the default)
    before = (tmp_path / "again" / "zoo.json").stat().st_mtime_ns
    assert main(["zoo", "build", str(tmp_path / "again"), "--micro"]) == 0
    assert (tmp_path / "again" / "zoo.json").stat().st_mtime_ns == before


def test_cli_build_random_still_writes_the_random_set(tiny_zoo, capsys):
    """`--random` is the random tiny set of `build_zoo` (here the session's, so a no-op)."""
    before = (tiny_zoo / "zoo.json").read_bytes()
    assert main(["zoo", "build", str(tiny_zoo), "--random", "--seed", "0"]) == 0
    assert "random tiny model zoo" in capsys.readouterr().out
    assert (tiny_zoo / "zoo.json").read_bytes() == before
    assert json.loads(before).get("kind") != "micro"
    with pytest.raises(SystemExit):  # one kind at a time
        main(["zoo", "build", str(tiny_zoo), "--random", "--micro"])


def test_reading_the_data_names_the_fix(tmp_path):
    from sasi_online.errors import UserInputError

    with pytest.raises(UserInputError, match="dataset-fashion-mnist"):
        load_split(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x01" + b"\0" * 12)
    with pytest.raises(UserInputError, match="magic"):
        load_split(tmp_path)


def test_captions_name_the_garment_and_its_shade(captions):
    print(f"captions: garment {captions['garment']:.3f}, shade {captions['shade']:.3f}")
    assert captions["garment"] >= 0.80
    assert captions["shade"] >= 0.70


def test_rewrites_keep_the_garment_and_differ(micro_zoo, captions):
    scores = quality.rewrite_scores(micro_zoo, captions["captions"][::4])  # 125 rewrites
    print(f"rewrites: keep {scores['keep']:.3f}, differ {scores['differ']:.3f}, "
          f"fallbacks {scores['fallback_rate']:.3f}")
    assert scores["keep"] >= 0.90
    assert scores["differ"] >= 0.50


def test_mask_maps_outline_the_garment(micro_zoo, test_split):
    images, labels = test_split
    threshold = 45
    assert threshold != FOREGROUND_THRESHOLD  # ground truth drawn at another threshold
    scores = quality.mask_iou(micro_zoo, images, threshold)
    print(f"mask maps: garment IoU {scores['iou']:.3f}")
    assert scores["iou"] >= 0.6
    # the garment is labelled as one ADE20K thing, bags as bags
    from sasi_online.visual.palette import ADE20K_CLASSES

    bag = ADE20K_CLASSES.index("bag")
    bag_share = np.mean([(m == bag).sum() > (m == ADE20K_CLASSES.index("apparel")).sum()
                         for m, y in zip(scores["maps"], labels) if y == 8])
    assert bag_share >= 0.8


# ---------------------------------------------------------------- SASI, read by the judge
# SASI of the first 200 embedded test images at 10 steps, made by `generate_store` (what
# `sasi generate` runs) with the default settings otherwise; the judge is trained here.
SASI_IMAGES, SASI_STEPS = 200, 10


@pytest.fixture(scope="module")
def judge():
    return judge_mod.train_judge(*embedded_split("train"))


@pytest.fixture(scope="module")
def image_sasi(micro_zoo, judge):
    return judge_mod.sasi_accuracy(judge, micro_zoo, "image", SASI_IMAGES, steps=SASI_STEPS, strength=0.5)


def test_judge_reads_real_garments_at_sasi_size(judge, test_split):
    """The judge knows the classes of unseen real images, also as a 64 px RGB SASI comes."""
    from PIL import Image

    images, labels = test_split
    real = judge.accuracy(images, labels)
    big = [Image.fromarray(im).resize((64, 64), Image.Resampling.BICUBIC).convert("RGB") for im in images]
    print(f"judge on the real test images: {real:.3f} (at 64 px RGB {judge.accuracy(big, labels):.3f})")
    assert real >= 0.75 and judge.accuracy(big, labels) >= real - 0.05
    assert judge.accuracy(np.zeros((20, 64, 64, 3), np.uint8), np.arange(20) % 10) <= 0.2  # no class for free


def test_image_vp_sasi_keep_the_garment(image_sasi, judge, tiny_zoo):
    rnd = judge_mod.sasi_accuracy(judge, tiny_zoo, "image", SASI_IMAGES, steps=SASI_STEPS, strength=0.5)
    micro = image_sasi["accuracy"]
    print(f"image VP (strength 0.5): judge reads the real class in {micro:.3f} of micro SASI, "
          f"{rnd['accuracy']:.3f} of random-set SASI")
    assert len(image_sasi["images"]) == SASI_IMAGES and image_sasi["images"][0].shape == (64, 64, 3)
    assert micro >= 0.70
    assert micro >= rnd["accuracy"] + 0.20


def test_mix_vp_sasi_keep_the_garment(micro_zoo, judge):
    mix = judge_mod.sasi_accuracy(judge, micro_zoo, "mix", SASI_IMAGES, steps=SASI_STEPS, strength=0.5)
    print(f"mix VP (strength 0.5): judge reads the real class in {mix['accuracy']:.3f} of micro SASI")
    assert mix["accuracy"] >= 0.60


def test_text_to_image_draws_the_named_garment(micro_zoo, judge):
    t2i = judge_mod.sasi_accuracy(judge, micro_zoo, "noise", SASI_IMAGES, steps=SASI_STEPS, text="class_name")
    assert t2i["prompts"][0].startswith("a photo of a ")
    print(f"text-to-image from class names: judge reads the named class in {t2i['accuracy']:.3f}")
    assert t2i["accuracy"] >= 0.60


def test_clip_finds_an_image_in_its_sasi(micro_zoo, image_sasi, test_split):
    """CLIP image-image cosine: each real image against its own SASI (image VP) versus the
    SASI of every other image."""
    images, _ = test_split
    score = quality.clip_auroc(micro_zoo, images[image_sasi["indices"]], image_sasi["images"])
    print(f"CLIP own-SASI vs other-SASI AUROC {score:.3f}")
    assert score >= 0.8


def test_auroc_counts_ties_half_and_matches_all_pairs():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 60).round(1), rng.normal(0, 1, 80).round(1)  # rounded: ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert quality.auroc(pos, neg) == pytest.approx(pairs)
    assert quality.auroc([1.0, 2.0], [0.0]) == 1.0 and quality.auroc([0.0], [0.0]) == 0.5


def test_garment_and_shade_are_read_back_from_text():
    assert quality.garment_of("a grey t-shirt with short sleeves") == 0
    assert quality.garment_of("With long sleeves, a white shirt lies on a black background.") == 6
    assert quality.garment_of("a square dark handbag") == 8
    assert quality.garment_of("a shirt and a coat") is None  # two garments: not a naming
    assert quality.shade_of("a dark coat on a black background") == 0
    assert quality.shade_of("a grey coat") == 1 and quality.shade_of("a coat") is None


def _write_idx(folder, images, labels):
    import gzip

    folder.mkdir()
    n = len(images)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write((2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes())


def test_train_micro_reads_idx_files_is_seeded_and_resumes(tmp_path, monkeypatch):
    """Training itself is not in CI (the shipped result is): the same code path, shortened."""
    from functools import partial

    from sasi_online.zoo.micro import TRAINERS, segmenter, train_micro

    images, labels = embedded_split("train")
    _write_idx(tmp_path / "data", images[:64], labels[:64])
    got_images, got_labels = load_split(tmp_path / "data")
    assert (got_images == images[:64]).all() and (got_labels == labels[:64]).all()
    monkeypatch.setitem(TRAINERS, "upernet", partial(segmenter.train, steps=2))
    a = train_micro(tmp_path / "data", tmp_path / "a", only=["upernet"])
    b = train_micro(tmp_path / "data", tmp_path / "b", only=["upernet"])
    files = json.loads((a / "zoo.json").read_text())["files"]
    assert files == json.loads((b / "zoo.json").read_text())["files"]
    assert "upernet/model.safetensors" in files and (a / "train.log").stat().st_size > 0
    weights = a / "upernet" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    train_micro(tmp_path / "data", a, only=["upernet"])  # a rerun keeps what is trained
    assert weights.stat().st_mtime_ns == before


def _psnr(a, b):
    mse = float(((a - b) ** 2).mean())
    return 10 * np.log10(4.0 / max(mse, 1e-12))  # images in [-1, 1]: peak-to-peak 2


def test_autoencoders_reconstruct_the_garments(micro_zoo, test_split):
    """The shipped VAE serves both families; TAESD decodes the latents the UNet works on."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from sasi_online.zoo.micro.data import resize_grey

    files = json.loads((micro_zoo / "zoo.json").read_text())["files"]
    shipped = shipped_manifest()["files"]
    for family in ("sd15", "sd21"):
        assert files[f"{family}/vae/diffusion_pytorch_model.safetensors"] == \
            shipped["vae/diffusion_pytorch_model.safetensors"]
    vae = AutoencoderKL.from_pretrained(str(micro_zoo / "sd15" / "vae")).eval()
    tiny = AutoencoderTiny.from_pretrained(str(micro_zoo / "taesd")).eval()
    images, _ = test_split
    x = resize_grey(images[::5], 64, resample="bilinear").float().div(127.5).sub(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        vae_psnr = _psnr(vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1), x)
        tiny_psnr = _psnr(tiny.decode(latents).sample.clamp(-1, 1), x)
        latent_std = float(latents.std())
    mean_psnr = _psnr(x.mean(0, keepdim=True).expand_as(x), x)  # the mean test image for all
    print(f"VAE PSNR {vae_psnr:.1f} dB, TAESD {tiny_psnr:.1f} dB (mean image {mean_psnr:.1f} dB), "
          f"scaled latent std {latent_std:.2f}")
    assert vae_psnr >= mean_psnr + 8 and tiny_psnr >= mean_psnr + 6
    assert 0.5 <= latent_std <= 2.0  # the scaling factor fits the latents
