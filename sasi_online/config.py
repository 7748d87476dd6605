"""One typed config tree for every entry point.

YAML files in `configs/` fill it; `section.key=value` overrides on the command line
patch it. Unknown keys and ill-typed values are refused with a message naming the key
and the closest valid one. Values are parsed with `yaml.safe_load`: nothing from a
config is ever evaluated.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used as written."""


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    # fashion_mnist (embedded, no download), cifar10, cifar100, stl10, imagefolder
    name: str = "fashion_mnist"
    root: Optional[str] = None  # dataset folder; unused for the embedded set
    split: str = "train"
    image_size: int = 32  # side the SSL pipeline works at
    limit: Optional[int] = None  # use only the first N images (index order)
    strict: bool = False  # fail on a corrupt image instead of skipping it


@dataclass
class ModelsConfig:
    # Folder holding the model set in Hugging Face layout (`sasi zoo build DIR` writes a tiny one).
    root: str = "tiny-zoo"
    captioner: str = "blip2"
    rewriter: str = "llama"
    segmenter: str = "upernet"
    clip: str = "clip"
    sd15: str = "sd15"  # SD-1.5-style pipeline (epsilon prediction)
    sd21: str = "sd21"  # SD-2.1-style pipeline (v prediction)
    controlnet_sd15: str = "controlnet-sd15-seg"
    controlnet_sd21: str = "controlnet-sd21-seg"

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)


@dataclass
class SemanticsConfig:
    sep: str = "Please describe the picture in detail."
    rewrite_mode: str = "rewrite"  # rewrite | expansion | none  (paper, Appendix B)
    num_examples: int = 5  # few-shot pairs drawn from the pool of 100
    load_in_8bit: bool = False  # bitsandbytes 8-bit rewriter
    max_new_tokens_caption: int = 30
    max_new_tokens_rewrite: int = 40
    batch_size: int = 16
    variants: int = 1  # semantic augmentation: rewrites per image
    seed: int = 0
    do_sample: bool = False  # rewriter: sample (temperature, top_p) instead of greedy
    temperature: float = 0.7
    top_p: float = 0.9
    caption_cache: Optional[str] = None  # JSONL file: each (image, SEP, model) captioned once


@dataclass
class VisualConfig:
    kind: str = "image"  # image | mask | mix | noise
    mix_alpha: float = 0.5
    augment: str = "none"  # none | noise | crop  (VP augmentation)
    noise_std: float = 0.1
    crop_scale: float = 0.7  # crop side as a fraction of the image side
    variants: int = 1  # VP augmentation: visual prompts per image
    segment_size: int = 64  # resolution the segmenter sees


@dataclass
class GenerationConfig:
    family: str = "auto"  # auto (paper profile: sd21 for image/noise, sd15+seg for mask/mix) | sd15 | sd21
    scheduler: str = "dpmsolver++"  # ddpm | ddim | dpmsolver++ | unipc
    steps: int = 25
    guidance: float = 7.5
    strength: float = 0.8
    controlnet_scale: float = 1.0
    resolution: int = 64
    batch_size: int = 8
    max_retries: int = 3  # regenerate a non-finite image with a new seed at most this often
    backend: str = "eager"  # eager | compile | onnxruntime | tensorrt | torch_tensorrt
    attention: str = "auto"  # auto | sdpa | xformers
    deep_cache_interval: int = 1  # >1: reuse deep UNet features for this many steps
    fused_step: bool = True  # DDPM/DDIM: CFG combine + scheduler step as one kernel (Triton on CUDA)
    negative_prompt: str = ""
    seed: int = 0
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on cuda, float32 on cpu) | float32 | float16 | bfloat16
    engine_dir: Optional[str] = None  # where onnxruntime / TensorRT backends cache their graphs
    text: str = "model"  # model (BLIP-2 caption + LLM rewrite, the paper) | class_name ("a photo of a <class>")


@dataclass
class StoreConfig:
    path: Optional[str] = None  # SASI store folder
    image_format: str = "png"
    write_online: bool = False  # online producers also write each SASI here


@dataclass
class FilterConfig:
    threshold: float = 0.6  # CLIP cosine below this flags a SASI as fishy (Appendix A)


@dataclass
class AugmentConfig:
    recipe: str = "mocov2"  # mocov2 | simclr | dino, or a path to a recipe YAML
    backend: str = "torchvision"  # torchvision | dali


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06  # per 256 images; scaled by global batch / 256
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class MethodConfig:
    name: str = "mocov2"
    backbone: str = "resnet18"  # resnet18 | resnet50 | resnet101 | vit_small
    small_stem: bool = True  # 3x3 stem without max-pool for small images
    proj_dim: int = 128
    proj_hidden: int = 512
    pred_hidden: int = 512
    queue_size: int = 65536  # MoCo-v2 negatives, AdCo bank; a multiple of the global batch
    # None = the method's published value (MoCo-v2 0.2, MoCo-v3 0.2, SimCLR 0.5, SwAV 0.1,
    # DINO student 0.1, AdCo 0.12; ignored by the others).
    temperature: Optional[float] = None
    # Base EMA momentum of target networks; None = the method's own (MoCo-v2 0.999,
    # MoCo-v3 0.99, BYOL/DINO 0.996, AdCo 0.99). Rises to momentum_final along a cosine;
    # momentum_final None = the method's own (1.0 for BYOL/DINO/MoCo-v3, constant for MoCo-v2/AdCo).
    momentum: Optional[float] = None
    momentum_final: Optional[float] = None
    shuffle_bn: bool = False  # MoCo-v2: shuffle the key batch across trainers (split batches in one process)
    num_prototypes: int = 300  # SwAV / DINO output size
    local_crops: int = 0  # multi-crop
    extra: dict = field(default_factory=dict)  # method-specific knobs; each method lists its own


@dataclass
class TrainConfig:
    pair_mode: str = "sasi"  # base | sasi | sasi_real_aug | sasi_no_aug | three_flow | synthetic_only | mix | direct
    batch_size: int = 64  # per trainer
    steps: int = 200
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    zero_stage: int = 0
    num_workers: int = 0
    seed: int = 0
    out: str = "runs/train"
    log_every: int = 10
    ckpt_every: int = 100
    knn_every: int = 100
    knn_bank: int = 2000  # training images (evenly spaced) the kNN monitor votes with
    knn_test: int = 500  # test images the kNN monitor classifies
    resume: bool = True


@dataclass
class OnlineConfig:
    producers: int = 0  # ranks that generate; 0 = offline training
    ring_slots: int = 256
    max_reuse: int = 8
    max_age: int = 2000  # trainer steps
    lookahead: int = 64  # trainer steps the producers generate ahead (0: random images, no look-ahead)
    send_batch: int = 4  # SASI per producer -> trainer message
    credits: int = 4  # messages in flight per (producer, trainer) pair; receive buffers posted
    plots: bool = True  # ring fill / hit rate / throughput PNGs in train.out at the end
    # Before its first step each trainer waits until its ring holds this many SASI (or every
    # producer has stopped): producers load models meanwhile. 0 = start at once.
    start_sasi: int = 0
    # Fault-injection hooks for tests and drills (-1 = off): producer batch N raises inside
    # generation (caught, skipped); the producer loop itself raises after N batches.
    fault_batch: int = -1
    fault_loop_after: int = -1


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_t: float = 0.07
    # Linear probe: full-batch L-BFGS on standardised features; the L2 strength is chosen
    # from this list on a seeded class-balanced hold-out of the train split.
    linear_weight_decays: list = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    linear_max_iter: int = 200
    semi_fractions: list = field(default_factory=lambda: [0.01, 0.1])
    semi_split_files: list = field(default_factory=list)  # SimCLR split files; replace semi_fractions
    transfer: list = field(default_factory=list)  # "dataset:ROOT" entries, e.g. "cifar10:data/cifar10"
    tsne_classes: int = 10
    tsne_per_class: int = 100
    batch_size: int = 256
    crop_ratio: float = 1.0  # 1.0: resize to data.image_size; 0.875: ImageNet's 256 -> 224 centre crop
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    num_workers: int = 0
    seed: int = 0
    train_split: str = "train"  # split the kNN bank and the probes are fitted on
    test_split: str = "auto"  # auto: "test", else "val" (ImageNet-style folders)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    semantics: SemanticsConfig = field(default_factory=SemanticsConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check `value` against annotation `tp`; return (ok, possibly-coerced value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, list), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def _fill(obj: Any, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{dotted}'.{hint} Valid keys here: {', '.join(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, dotted)
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            raise ConfigError(
                f"config key '{dotted}' must be {getattr(hints[key], '__name__', hints[key])}, "
                f"got {value!r}"
            )
        setattr(obj, key, coerced)


def parse_overrides(items: list[str] | None) -> dict:
    """['train.steps=10', 'method.name=simclr'] -> nested dict (values via yaml.safe_load)."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' not found; the shipped ones are in configs/")
        with open(p, encoding="utf-8") as fh:
            try:
                values = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
        try:
            _fill(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    _fill(cfg, parse_overrides(overrides), "")
    return cfg


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _fill(cfg, values, "")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    from sasi_online.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
