"""The tiny model zoo: complete, byte-reproducible, loadable through the real loaders, and
its loaders refuse missing or mismatched folders with messages that say what to do."""
import json
import shutil

import pytest
import torch

from sasi_online import zoo
from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.utils import file_sha256


def test_zoo_is_complete_and_manifest_matches(tiny_zoo):
    for name in zoo.FOLDERS:
        assert (tiny_zoo / name).is_dir(), name
    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert manifest["seed"] == 0
    assert set(manifest["versions"]) == {"torch", "diffusers", "transformers"}
    files = [p for p in tiny_zoo.rglob("*") if p.is_file() and p.name != "zoo.json"]
    assert {p.relative_to(tiny_zoo).as_posix() for p in files} == set(manifest["files"])
    assert zoo.verify_zoo(tiny_zoo) == []
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_zoo / "sd15" / sub).is_dir()
    index = json.loads((tiny_zoo / "sd15" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]


def test_two_builds_are_byte_identical(tmp_path):
    # every model, tokenizer and training loop runs; training is shortened to keep CI fast
    # (the same code path, seeded and single-threaded, at any step count)
    a = zoo.build_zoo(tmp_path / "a", seed=0, caption_steps=4, rewrite_steps=4)
    b = zoo.build_zoo(tmp_path / "b", seed=0, caption_steps=4, rewrite_steps=4)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert file_sha256(a / rel) == file_sha256(b / rel), rel
    c = zoo.build_zoo(tmp_path / "c", seed=1, caption_steps=4, rewrite_steps=4)
    assert file_sha256(c / "llama" / "model.safetensors") != file_sha256(a / "llama" / "model.safetensors")


def test_diffusion_families_mirror_sd15_and_sd21(tiny_zoo):
    pipe15 = zoo.load_sd_pipeline(tiny_zoo / "sd15")
    pipe21 = zoo.load_sd_pipeline(tiny_zoo / "sd21")
    assert pipe15.scheduler.config.prediction_type == "epsilon"
    assert pipe21.scheduler.config.prediction_type == "v_prediction"
    assert pipe15.scheduler.config.steps_offset == 1
    assert pipe15.unet.config.cross_attention_dim != pipe21.unet.config.cross_attention_dim
    assert pipe15.text_encoder.config.hidden_size == pipe15.unet.config.cross_attention_dim
    assert pipe21.text_encoder.config.hidden_size == pipe21.unet.config.cross_attention_dim
    # the tokenizer keeps real words whole and still encodes anything (byte symbols)
    tok = pipe15.tokenizer
    assert tok.tokenize("a grey pullover") == ["a</w>", "grey</w>", "pullover</w>"]
    assert tok.decode(tok("zebra, quokka")["input_ids"], skip_special_tokens=True) == "zebra , quokka"


def test_controlnet_is_perturbed_and_changes_the_unet(tiny_zoo):
    pipe = zoo.load_sd_pipeline(tiny_zoo / "sd15")
    cn = zoo.load_controlnet(tiny_zoo / "controlnet-sd15-seg")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=g)
    cond = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        down, mid = cn(latents, 10, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        assert any(d.abs().max() > 0 for d in down) and mid.abs().max() > 0
        plain = pipe.unet(latents, 10, encoder_hidden_states=context).sample
        guided = pipe.unet(latents, 10, encoder_hidden_states=context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
    assert (plain - guided).abs().max() > 1e-4


def test_controlnet_mismatch_is_refused_naming_both_folders(tiny_zoo):
    zoo.check_controlnet_matches(tiny_zoo / "sd15", tiny_zoo / "controlnet-sd15-seg")
    zoo.check_controlnet_matches(tiny_zoo / "sd21" / "unet", tiny_zoo / "controlnet-sd21-seg")
    with pytest.raises(ModelFolderError) as info:
        zoo.check_controlnet_matches(tiny_zoo / "sd21", tiny_zoo / "controlnet-sd15-seg")
    msg = str(info.value)
    assert "controlnet-sd15-seg" in msg and "sd21" in msg and "text context width" in msg


def test_segmenter_clip_captioner_rewriter_load(tiny_zoo):
    from sasi_online.visual.palette import ADE20K_CLASSES

    proc, seg = zoo.load_segmenter(tiny_zoo / "upernet")
    assert seg.config.num_labels == 150 and seg.config.id2label[0] == ADE20K_CLASSES[0]
    with torch.no_grad():
        out = seg(**proc(images=torch.rand(3, 64, 64), do_rescale=False, return_tensors="pt")).logits
    assert out.shape[1] == 150
    clip_proc, clip = zoo.load_clip(tiny_zoo / "clip")
    with torch.no_grad():
        emb = clip.get_image_features(**clip_proc(images=torch.rand(3, 32, 32), do_rescale=False,
                                                  return_tensors="pt")).pooler_output
    assert emb.shape == (1, clip.config.projection_dim)
    cap_proc, cap = zoo.load_captioner(tiny_zoo / "blip2")
    assert cap_proc.num_query_tokens == cap.config.num_query_tokens
    assert cap.config.image_token_index == cap_proc.tokenizer.convert_tokens_to_ids("<image>")
    tok, lm = zoo.load_rewriter(tiny_zoo / "llama")
    assert type(lm).__name__ == "LlamaForCausalLM" and tok.padding_side == "left"


def test_loaders_name_what_is_missing(tiny_zoo, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        zoo.load_captioner(tmp_path / "nowhere" / "blip2")
    broken = tmp_path / "zoo" / "blip2"
    shutil.copytree(tiny_zoo / "blip2", broken)
    (broken / "config.json").unlink()
    with pytest.raises(ModelFolderError) as info:
        zoo.load_captioner(broken)
    assert f"'{broken}' has no config.json" in str(info.value)
    assert f"sasi zoo build {broken.parent}" in str(info.value)
    weightless = tmp_path / "zoo" / "llama"
    shutil.copytree(tiny_zoo / "llama", weightless)
    (weightless / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        zoo.load_rewriter(weightless)
    sd = tmp_path / "zoo" / "sd15"
    shutil.copytree(tiny_zoo / "sd15", sd)
    (sd / "unet" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="unet"):
        zoo.load_sd_pipeline(sd)


def test_build_refuses_a_foreign_folder_and_skips_a_built_one(tiny_zoo, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not a model zoo"):
        zoo.build_zoo(foreign)
    stamp = (tiny_zoo / "zoo.json").stat().st_mtime_ns
    assert zoo.build_zoo(tiny_zoo, seed=0) == tiny_zoo
    assert (tiny_zoo / "zoo.json").stat().st_mtime_ns == stamp


def test_cli_verify_detects_a_changed_file(tiny_zoo, tmp_path, capsys):
    from sasi_online.cli import main

    assert main(["zoo", "verify", str(tiny_zoo)]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(tiny_zoo / "clip", copy / "clip")
    shutil.copy(tiny_zoo / "zoo.json", copy / "zoo.json")
    assert main(["zoo", "verify", str(copy)]) == 1  # the other folders are missing
    assert "differ" in capsys.readouterr().out


def test_tiny_autoencoder_decodes_both_families_and_is_verified(tiny_zoo, tmp_path):
    from diffusers import AutoencoderTiny

    tiny = AutoencoderTiny.from_pretrained(str(tiny_zoo / "taesd"), local_files_only=True).eval()
    assert tiny.config.scaling_factor == 1.0
    for family in ("sd15", "sd21"):
        vae = zoo.load_sd_pipeline(tiny_zoo / family).vae
        assert tiny.config.latent_channels == vae.config.latent_channels
    with torch.no_grad():
        image = tiny.decode(torch.randn(2, 4, 8, 8), return_dict=False)[0]
    assert image.shape == (2, 3, 64, 64)  # the VAE's 8x factor
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, copy)
    shutil.rmtree(copy / "taesd")
    assert "taesd/" in zoo.verify_zoo(copy)
