"""Folders laid out like the real hub snapshots users have (file lists and config files of
tests/fixtures/real_checkpoints/, tiny weights, placeholders for files never opened) load
and run through the project's loaders: one generation / caption / rewrite / segmentation /
CLIP step each. Plus the model identity (what is loaded, cached, old identities accepted)."""
import json
import os
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image

import _real_layouts as R
from sasi_online.config import Config, _fill, parse_overrides
from sasi_online.errors import ModelFolderError, UserInputError

if not (R.FIXTURES / "sd15" / "FILES.txt").is_file():  # pragma: no cover - a broken checkout
    pytest.skip(f"real-checkpoint fixtures missing at {R.FIXTURES}", allow_module_level=True)


def _cfg(root, *overrides) -> Config:
    cfg = Config()  # no YAML: the typed defaults plus the overrides
    _fill(cfg, parse_overrides([f"models.root={root}", *overrides]), "")
    return cfg


def _image(seed: int, side: int = 40) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """Every layout built once: {name: (folder, state dicts written)}."""
    root = tmp_path_factory.mktemp("real-layouts")
    built = {}
    for name in R.SD_LAYOUTS:
        built[name] = R.build_sd(name, root / name)
    for name in R.CONTROLNET_LAYOUTS:
        built[name] = R.build_controlnet(name, root / name)
    for name in R.CAPTIONER_LAYOUTS:
        built[name] = R.build_blip2(name, root / name)
    for name in R.REWRITER_LAYOUTS:
        built[name] = R.build_llama(name, root / name)
    built["upernet"] = R.build_upernet(root / "upernet")
    built["clip"] = R.build_clip(root / "clip")
    return types.SimpleNamespace(root=root, state=built)


def _same(module, state, dtype=torch.float32, keys=4):
    """The module holds the weights written (after the snapshot's dtype round trip)."""
    have = module.state_dict()
    for k in list(state)[:keys] + list(state)[-keys:]:
        want = state[k].to(dtype).float() if state[k].is_floating_point() else state[k]
        assert torch.equal(have[k].float(), want.float()), k


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("layout", R.SD_LAYOUTS)
def test_sd_layout_generates(layouts, layout):
    from sasi_online.generation.generator import SASIGenerator

    family = "sd21" if layout.startswith("sd21") else "sd15"
    cfg = _cfg(layouts.root, f"models.{family}={layout}", f"generation.family={family}", "generation.steps=1",
               "generation.resolution=64", "generation.scheduler=ddim", "generation.device=cpu")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    out = gen.generate(["a grey coat"], [None], [0])
    assert out.images.shape == (1, 64, 64, 3) and out.finite.all()
    fam = gen.family(family)
    stored = torch.float16 if "fp16" in layout else torch.float32
    for sub in ("unet", "vae", "text_encoder"):
        module = getattr(fam, sub)
        assert next(module.parameters()).dtype == torch.float32  # generation.dtype (auto on a CPU)
        _same(module, layouts.state[layout][sub], stored)
    if layout.startswith("sd21") and layout != "sd21-base":
        assert fam.scheduler_config["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("layout", R.CONTROLNET_LAYOUTS)
def test_controlnet_layout_generates(layouts, layout):
    from sasi_online.generation.generator import SASIGenerator

    cfg = _cfg(layouts.root, "models.sd15=sd15", f"models.controlnet_sd15={layout}", "generation.family=sd15",
               "generation.steps=1", "generation.resolution=64", "generation.scheduler=ddim",
               "generation.device=cpu")
    gen = SASIGenerator.from_config(cfg.models, cfg.generation)
    vp = types.SimpleNamespace(kind="mask", init_image=None, control_image=_image(1, 64))
    out = gen.generate(["a grey coat"], [vp], [0])
    assert out.finite.all()
    _same(gen.family("sd15").controlnet, layouts.state[layout])


def test_hub_cache_layout_generates_and_is_named_by_its_blobs(layouts, tmp_path):
    from sasi_online.generation.generator import SASIGenerator
    from sasi_online.zoo import model_hash
    from sasi_online.zoo.identity import file_digest

    snap = R.to_hub_cache(layouts.root / "sd15", tmp_path / "hub", "runwayml/stable-diffusion-v1-5")
    cfg = _cfg(snap.parent, f"models.sd15={snap.name}", "generation.family=sd15", "generation.steps=1",
               "generation.resolution=64", "generation.scheduler=ddim", "generation.device=cpu")
    out = SASIGenerator.from_config(cfg.models, cfg.generation).generate(["a coat"], [None], [0])
    assert out.finite.all()
    assert model_hash(snap) == model_hash(layouts.root / "sd15")  # blob names are content hashes
    weights = snap / "unet" / "diffusion_pytorch_model.safetensors"
    assert file_digest(weights) == os.path.basename(os.readlink(weights))
    # a blob is taken by its name, never read: a link to a blob named otherwise proves it
    fake = "f" * 64
    shutil.copy(weights.resolve(), weights.resolve().parent / fake)
    weights.unlink()
    os.symlink(os.path.join("..", "..", "..", "blobs", fake), weights)
    assert file_digest(weights) == fake


# ----------------------------------------------------------------------------- language models
@pytest.mark.parametrize("layout", R.CAPTIONER_LAYOUTS)
def test_captioner_layout_captions_from_the_image(layouts, layout):
    from sasi_online.semantics.captioner import Captioner

    cap = Captioner(layouts.root / layout, max_new_tokens=3)
    assert cap.model.config.image_token_index == R.OPT_VOCAB == \
        cap.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert cap.processor.num_query_tokens == 32
    assert cap.model.get_input_embeddings().num_embeddings == cap.model.config.text_config.vocab_size
    _same(cap.model, layouts.state[layout])
    logits = cap.next_token_logits([_image(0), _image(1)])
    assert not torch.allclose(logits[0], logits[1])  # the image reaches the text model
    assert len(cap.caption([_image(0)])) == 1


def test_old_blip2_whose_image_id_does_not_fit_grows_its_embeddings(tmp_path):
    from sasi_online.zoo import load_captioner

    vocab = json.loads((R.FIXTURES / "blip2-2023" / "config.json").read_text())["text_config"]["vocab_size"]
    R.build_blip2("blip2-2023", tmp_path / "blip2", vocab=vocab)  # tokenizer as large as the model
    processor, model = load_captioner(tmp_path / "blip2")
    assert model.config.image_token_index == vocab
    assert model.get_input_embeddings().num_embeddings == vocab + 1
    enc = processor(images=[_image(0)], text=["a photo"], return_tensors="pt")
    with torch.no_grad():
        assert model.generate(**enc, max_new_tokens=2).shape[0] == 1


@pytest.mark.parametrize("layout", R.REWRITER_LAYOUTS)
def test_rewriter_layout_rewrites_in_the_dtype_asked_for(layouts, layout):
    from sasi_online.semantics.rewriter import Rewriter

    folder = layouts.root / layout
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float16"
    rw = Rewriter.from_config(_cfg(layouts.root, f"models.rewriter={layout}", "semantics.max_new_tokens_rewrite=3",
                                   "semantics.device=cpu"))
    assert rw.model.dtype == torch.float32  # semantics.dtype auto on a CPU, not the checkpoint's fp16
    _same(rw.model, layouts.state[layout], torch.float16)
    assert len(rw.rewrite(["a grey coat"], [0])) == 1
    bf16 = Rewriter.from_config(_cfg(layouts.root, f"models.rewriter={layout}", "semantics.dtype=bfloat16"))
    assert bf16.model.dtype == torch.bfloat16


def test_sentencepiece_only_llama_tokenizes_as_its_tokenizer_json(layouts):
    from transformers import AutoTokenizer

    text = "A grey coat lies on a dark floor."
    spm = AutoTokenizer.from_pretrained(str(layouts.root / "llama-spm"))
    fast = AutoTokenizer.from_pretrained(str(layouts.root / "llama"))
    assert spm(text)["input_ids"] == fast(text)["input_ids"]


def test_semantics_device_and_dtype_are_checked(layouts):
    from sasi_online.semantics.captioner import Captioner

    cap = Captioner.from_config(_cfg(layouts.root, "models.captioner=blip2", "semantics.dtype=bfloat16"),
                                device="cpu")
    assert next(cap.model.parameters()).dtype == torch.bfloat16 and cap.device == torch.device("cpu")
    assert len(cap.caption([_image(2)])) == 1
    with pytest.raises(UserInputError, match="semantics.dtype='half'"):
        Captioner.from_config(_cfg(layouts.root, "models.captioner=blip2", "semantics.dtype=half"))
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="semantics.device='cuda'"):
            Captioner.from_config(_cfg(layouts.root, "models.captioner=blip2", "semantics.device=cuda"))


# ----------------------------------------------------------------------------- vision models
def test_segmenter_and_clip_layouts_run(layouts):
    from sasi_online.eval.similarity import ClipSimilarity
    from sasi_online.visual.segmenter import Segmenter

    cfg = _cfg(layouts.root, "visual.segment_size=64", "filter.device=cpu")
    seg = Segmenter.from_config(cfg.models, cfg.visual, dtype=torch.bfloat16)
    assert seg.dtype == torch.bfloat16
    assert seg.segment([_image(0)])[0].shape == (40, 40)
    clip = ClipSimilarity.from_config(cfg)
    _same(clip.model, layouts.state["clip"])
    sims = clip.cosine([_image(0), _image(1)], [_image(0), _image(2)])
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] < 1.0


# ----------------------------------------------------------------------------- unusable folders
def test_unusable_folders_name_the_file_and_the_fix(layouts, tmp_path):
    from sasi_online.zoo import load_rewriter, require_sd_folder

    sd = tmp_path / "sd15-fp16"
    shutil.copytree(layouts.root / "sd15-fp16", sd)
    (sd / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ModelFolderError) as info:
        require_sd_folder(sd)  # the pre-check, before anything loads
    msg = str(info.value)
    assert f"'{sd / 'vae'}'" in msg and "diffusion_pytorch_model.safetensors" in msg and "Download" in msg
    llama = tmp_path / "llama"
    shutil.copytree(layouts.root / "llama", llama)
    (llama / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model-00002-of-00002.safetensors.*missing shard"):
        load_rewriter(llama)


def test_variant_field_picks_the_fp16_weights_where_present(layouts, tmp_path):
    from sasi_online.zoo import resolve_weights
    from sasi_online.zoo.identity import identity_files

    cn = tmp_path / "cn"
    shutil.copytree(layouts.root / "controlnet-v11p-sd15-seg", cn)
    assert resolve_weights(cn, "diffusers").files[0].name == "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelFolderError, match="fp16.safetensors' is empty"):  # a placeholder here
        resolve_weights(cn, "diffusers", "fp16")
    shutil.copy(cn / "diffusion_pytorch_model.safetensors", cn / "diffusion_pytorch_model.fp16.safetensors")
    picked = resolve_weights(cn, "diffusers", "fp16")
    assert picked.files[0].name == "diffusion_pytorch_model.fp16.safetensors" and picked.variant == "fp16"
    only = resolve_weights(layouts.root / "sd21-fp16" / "text_encoder", "transformers")
    assert only.variant == "fp16" and only.use_safetensors  # nothing else there: taken as it is
    names = {p.relative_to(layouts.root / "sd15").as_posix() for p in identity_files(layouts.root / "sd15")}
    assert "unet/diffusion_pytorch_model.safetensors" in names and "tokenizer/vocab.json" in names
    never_opened = [n for n in R.files_of("sd15") if n.startswith(("safety_checker", "v1-5"))
                    or n.endswith(".bin") or ".fp16." in n or "non_ema" in n]
    assert never_opened and not names & set(never_opened)


# ----------------------------------------------------------------------------- identity
def test_file_hashes_are_cached_on_disk_by_path_size_and_mtime(layouts, tmp_path, monkeypatch):
    from sasi_online.zoo import identity

    monkeypatch.setenv(identity.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "_MEMO", {})
    folder = tmp_path / "clip"
    shutil.copytree(layouts.root / "clip", folder)
    first = identity.model_hash(folder)
    cached = (tmp_path / "cache" / "file_sha256.jsonl").read_text()
    assert str((folder / "model.safetensors").resolve()) in cached
    assert "pytorch_model.bin" not in cached  # a copy the loader does not open is not read
    # same path, size and mtime: the recorded hash is used, the file is not read again
    weights = folder / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(identity, "_MEMO", {})  # a new process
    assert identity.model_hash(folder) == first
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: hashed again
    assert identity.model_hash(folder) != first


def test_store_made_with_the_old_identity_keeps_working(layouts, tmp_path):
    from sasi_online.data.store import SasiStore
    from sasi_online.generation.offline import IDENTITY_FILE, model_hashes
    from sasi_online.zoo import legacy_model_hash, model_hash

    cfg = _cfg(layouts.root, "models.sd21=sd21", "generation.family=sd21")
    folder = layouts.root / "sd21"
    old, new = legacy_model_hash(folder), model_hash(folder)
    assert old != new
    dataset = {"name": "fashion_mnist", "split": "train", "size": 10}
    SasiStore.create(tmp_path / "store", dataset=dataset, models={"sd21": old}, settings={"k": 1}).close()
    models = model_hashes(cfg, "noise", [], tmp_path / "store")
    assert models == {"sd21": old}
    assert json.loads((tmp_path / "store" / IDENTITY_FILE).read_text()) == \
        {"sd21": {"legacy": old, "identity": new}}
    SasiStore.create(tmp_path / "store", dataset=dataset, models=models, settings={"k": 1}).close()
    assert model_hashes(cfg, "noise", []) == {"sd21": new}  # a new store: the new identity
    SasiStore.create(tmp_path / "other", dataset=dataset, models={"sd21": "0" * 16}, settings={}).close()
    assert model_hashes(cfg, "noise", [], tmp_path / "other") == {"sd21": new}  # other weights: not accepted


def test_caption_cache_made_with_the_old_identity_is_reused(layouts, tmp_path):
    from sasi_online.semantics.cache import JsonlCache
    from sasi_online.semantics.captioner import Captioner
    from sasi_online.zoo import legacy_model_hash

    folder = layouts.root / "blip2"
    path = tmp_path / "captions.jsonl"
    probe = Captioner(folder, sep="detail", max_new_tokens=3)
    old_key = probe._key(7, legacy_model_hash(folder))
    JsonlCache(path).put(old_key, "a coat made earlier")
    cap = Captioner(folder, sep="detail", max_new_tokens=3, cache_path=path)
    assert cap.caption([_image(0)], image_ids=[7]) == ["a coat made earlier"] and cap.computed == 0
    assert JsonlCache(path).get(probe._key(7)) == "a coat made earlier"  # recorded under the new key


# ----------------------------------------------------------------------------- commands
def test_sasi_semantics_runs_on_the_real_layouts_on_the_device_asked_for(layouts, tmp_path, capsys):
    from sasi_online.cli import main

    out = tmp_path / "semantics"
    args = ["semantics", "--models", str(layouts.root), "--limit", "2", "--vp-kind", "mask", "--out", str(out),
            "semantics.max_new_tokens_caption=3", "semantics.max_new_tokens_rewrite=3", "visual.segment_size=64"]
    assert main(args + ["--device", "cpu"]) == 0
    lines = (out / "semantics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["vp_kind"] == "mask" for line in lines)
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "semantics.device='cuda'" in capsys.readouterr().err


def test_generate_continues_a_store_made_with_the_old_identity(layouts, tmp_path):
    from sasi_online.data.store import settings_hash
    from sasi_online.generation.offline import IDENTITY_FILE, generate_store
    from sasi_online.zoo import legacy_model_hash

    cfg = _cfg(layouts.root, "generation.steps=1", "generation.resolution=64", "generation.scheduler=ddim",
               "generation.device=cpu", "semantics.max_new_tokens_caption=3", "semantics.max_new_tokens_rewrite=3")
    store = tmp_path / "store"
    assert generate_store(cfg, store, kind="noise", limit=1, progress=False).generated == 1
    header = json.loads((store / "store.json").read_text())
    # what the earlier version wrote: every model named by its old identity
    header["models"] = {name: legacy_model_hash(layouts.root / name) for name in header["models"]}
    header["settings_hash"] = settings_hash({"models": header["models"], "settings": header["settings"]})
    header["settings_history"] = [header["settings_hash"]]
    (store / "store.json").write_text(json.dumps(header))
    again = generate_store(cfg, store, kind="noise", limit=2, progress=False)
    assert (again.generated, again.skipped_existing) == (1, 1)
    assert set(json.loads((store / IDENTITY_FILE).read_text())) == set(header["models"])
