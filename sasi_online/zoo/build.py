"""Build the tiny model set (one builder per model), write zoo.json, and verify it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.utils import atomic_write_json, file_sha256

from .seeding import _deterministic
from .tiny_lm import _build_blip2, _build_llama
from .tokenizers import _clip_tokenizer

log = logging.getLogger(__name__)

ZOO_FORMAT = 1
TINY_RESOLUTION = 64  # pixel side the tiny diffusion models are built for
SD15_CONTEXT = 32  # text context width of the tiny SD-1.5 stand-in (real: 768)
SD21_CONTEXT = 48  # ... of the tiny SD-2.1 stand-in (real: 1024)
FOLDERS = ("sd15", "sd21", "controlnet-sd15-seg", "controlnet-sd21-seg", "taesd", "blip2", "llama",
           "upernet", "clip")
# the random set only: an LCM-LoRA stand-in for sd15, in the layout of the real
# latent-consistency/lcm-lora-sdv1-5 snapshot (one pytorch_lora_weights.safetensors)
LORA_FOLDER = "lcm-lora-sd15"
LORA_FILE = "pytorch_lora_weights.safetensors"
# the modules the real LCM-LoRA adapts (attention, feed-forward, projections, resnet convs)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj")


def _text_encoder(tokenizer, width: int, seed: int, name: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    with _deterministic(seed, name):
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=2, num_attention_heads=2, projection_dim=width,
                             max_position_embeddings=tokenizer.model_max_length,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        return CLIPTextModel(cfg).eval()


def _build_sd(out: Path, family: str, seed: int) -> Any:
    """A StableDiffusionPipeline folder; returns its UNet (the ControlNet is made from it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    v_pred = family == "sd21"
    width = SD21_CONTEXT if v_pred else SD15_CONTEXT
    tokenizer = _clip_tokenizer()
    text_encoder = _text_encoder(tokenizer, width, seed, f"{family}/text_encoder")
    with _deterministic(seed, f"{family}/unet"):
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=(2, 4) if v_pred else 4, norm_num_groups=16,
            use_linear_projection=v_pred,  # as in SD-2.x
        ).eval()
    with _deterministic(seed, f"{family}/vae"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=TINY_RESOLUTION,
        ).eval()
    # DDIM's config as SD-2.1 ships it (a DDPM-trained schedule; samplers are built from it with
    # from_config), with steps_offset=1 that img2img expects.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v_pred else "epsilon", steps_offset=1,
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / family, safe_serialization=True)
    return unet


def _build_controlnet(out: Path, name: str, unet: Any, seed: int) -> None:
    """ControlNet copied from `unet`, with its zero convolutions set to small seeded values:
    a fresh ControlNet outputs exactly zero and would have no effect at all."""
    import torch
    from diffusers import ControlNetModel

    with _deterministic(seed, name) as gen:
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
        zero_convs = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
        with torch.no_grad():
            for pname, p in cn.named_parameters():
                if pname.startswith(zero_convs):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cn.eval().save_pretrained(out / name, safe_serialization=True)


def _build_lora(out: Path, unet: Any, seed: int, rank: int = 4) -> None:
    """A seeded LoRA for the sd15 UNet, saved as diffusers' `save_lora_weights` writes it (peft
    keys under `unet.`). peft starts lora_B at zero (no effect); here both halves are drawn, so
    the fused UNet differs from the base. `unet` is changed in place: pass one not saved after."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with _deterministic(seed, LORA_FOLDER) as gen:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=list(LORA_TARGETS)))
        with torch.no_grad():
            for pname, p in unet.named_parameters():
                if ".lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.3 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.05))
    layers = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(out / LORA_FOLDER, unet_lora_layers=layers, weight_name=LORA_FILE,
                                              safe_serialization=True)


def _build_sd15_set(out: Path, seed: int) -> None:
    """sd15, its seg ControlNet (made from its UNet) and its LoRA (which then changes that UNet)."""
    unet = _build_sd(out, "sd15", seed)
    _build_controlnet(out, "controlnet-sd15-seg", unet, seed)
    _build_lora(out, unet, seed)


def _build_taesd(out: Path, seed: int) -> None:
    """A tiny AutoencoderTiny (TAESD layout: 4 latent channels, 8x upsampling) that decodes
    both families' latents, as the real TAESD decodes SD-1.x and SD-2.x; its scaling factor
    is 1.0 (TAESD decodes the UNet's latents as they are)."""
    from diffusers import AutoencoderTiny

    with _deterministic(seed, "taesd"):
        tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                               num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                               latent_channels=4).eval()
    tiny.save_pretrained(out / "taesd", safe_serialization=True)


def _build_upernet(out: Path, seed: int) -> None:
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    from sasi_online.visual.palette import ADE20K_CLASSES

    with _deterministic(seed, "upernet"):
        backbone = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                  out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = UperNetConfig(backbone_config=backbone, hidden_size=32, auxiliary_in_channels=48,
                            auxiliary_channels=16, use_auxiliary_head=False,
                            num_labels=len(ADE20K_CLASSES),
                            id2label=dict(enumerate(ADE20K_CLASSES)),
                            label2id={n: i for i, n in enumerate(ADE20K_CLASSES)})
        model = UperNetForSemanticSegmentation(cfg).eval()
    model.save_pretrained(out / "upernet", safe_serialization=True)
    SegformerImageProcessor(size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION},
                            do_reduce_labels=False).save_pretrained(out / "upernet")


def _build_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    with _deterministic(seed, "clip"):
        text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(out / "clip", safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(out / "clip")



def _library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _source_hash() -> str:
    """Hash of the code and text the zoo is built from: a zoo built by other code is rebuilt."""
    import hashlib

    package = Path(__file__).parent  # sasi_online/zoo
    here = package.parent
    h = hashlib.sha256()
    # every module of the package, the loaders too (as when it was one file): a needless
    # rebuild is cheap, a stale zoo is not
    sources = sorted(package.glob("*.py")) + [
        here / rel for rel in ("semantics/tiny_captions.py", "semantics/srp_pool.py",
                               "semantics/prompts.py", "visual/palette.py")]
    for path in sources:
        h.update(path.relative_to(here).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "zoo.json"}


def build_zoo(out_dir: str | Path, seed: int = 0, force: bool = False,
              caption_steps: int = 150, rewrite_steps: int = 200) -> Path:
    """Write the complete tiny model set under `out_dir`; return its path.

    The set is built in a sibling temporary folder and renamed into place, so an
    interrupted build leaves nothing half-written. A folder that already holds a zoo of
    the same seed, format, library versions, builder source and training steps is kept as
    is (run again = no-op), so a cached zoo can be reused safely across test sessions.
    """
    out = Path(out_dir)
    manifest = out / "zoo.json"
    if out.exists():
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {}
            same = (old.get("seed") == seed and old.get("format") == ZOO_FORMAT
                    and old.get("versions") == _library_versions()
                    and old.get("source") == _source_hash()
                    and old.get("steps") == [caption_steps, rewrite_steps])
            if same and not force:
                log.info("zoo at %s is already built (seed %d)", out, seed)
                return out
        elif any(out.iterdir()) and not force:
            raise UserInputError(
                f"'{out}' exists and is not a model zoo (no zoo.json): choose an empty or new "
                f"folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    steps = [
        ("sd15", lambda: _build_sd15_set(tmp, seed)),
        ("sd21", lambda: _build_controlnet(tmp, "controlnet-sd21-seg", _build_sd(tmp, "sd21", seed), seed)),
        ("taesd", lambda: _build_taesd(tmp, seed)),
        ("upernet", lambda: _build_upernet(tmp, seed)),
        ("clip", lambda: _build_clip(tmp, seed)),
        ("blip2", lambda: _build_blip2(tmp, seed, caption_steps)),
        ("llama", lambda: _build_llama(tmp, seed, rewrite_steps)),
    ]
    from tqdm.auto import tqdm

    with tqdm(steps, desc="building tiny zoo", unit="model", disable=None) as bar:
        for name, build in bar:
            bar.set_postfix_str(name)
            build()
    atomic_write_json(tmp / "zoo.json", {
        "format": ZOO_FORMAT, "seed": seed, "versions": _library_versions(),
        "source": _source_hash(), "steps": [caption_steps, rewrite_steps],
        "resolution": TINY_RESOLUTION, "files": _file_hashes(tmp),
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("tiny zoo built at %s in %.1f s", out, time.perf_counter() - t0)
    return out


def verify_zoo(root: str | Path) -> list[str]:
    """Files whose sha256 differs from zoo.json, and model folders missing (empty list = intact)."""
    root = Path(root)
    manifest = root / "zoo.json"
    if not manifest.is_file():
        raise ModelFolderError(f"'{root}' has no zoo.json: run `sasi zoo build {root}`")
    want = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    have = _file_hashes(root)
    # a zoo from an older builder may lack a whole model (e.g. taesd/): name the folder
    missing = [f"{name}/" for name in FOLDERS if not (root / name).is_dir()]
    return sorted(missing + [k for k in set(want) | set(have) if want.get(k) != have.get(k)])

