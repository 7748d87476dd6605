"""One typed config tree for every entry point.

YAML files fill it (a path, or a shipped name such as `imagenet100/byol` from `configs/`,
which installs as `sasi_online.configs`); a file's `include:` list names others applied
first, in order; `section.key=value` overrides on the command line patch it last. Fields
left None take the published recipe of `method.name` (`resolve_recipe`). Unknown keys
and ill-typed values are refused with a message naming the key and the closest valid one.
Values are parsed with `yaml.safe_load`: nothing from a config is ever evaluated.
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
    # dataset folder; for fashion_mnist only its split test_full (the official 10k test images,
    # `apt-get install dataset-fashion-mnist`) reads it, default /usr/share/datasets/fashion-mnist
    root: Optional[str] = None
    split: str = "train"
    image_size: int = 32  # side the SSL pipeline works at
    limit: Optional[int] = None  # use only the first N images (index order)
    strict: bool = False  # fail on a corrupt image instead of skipping it


@dataclass
class ModelsConfig:
    # Folder holding the model set in Hugging Face layout (`sasi zoo build DIR` writes the micro
    # set, `--random` a random tiny one).
    root: str = "tiny-zoo"
    captioner: str = "blip2"
    rewriter: str = "llama"
    segmenter: str = "upernet"
    clip: str = "clip"
    sd15: str = "sd15"  # SD-1.5-style pipeline (epsilon prediction)
    sd21: str = "sd21"  # SD-2.1-style pipeline (v prediction)
    controlnet_sd15: str = "controlnet-sd15-seg"
    controlnet_sd21: str = "controlnet-sd21-seg"
    taesd: str = "taesd"  # AutoencoderTiny (TAESD) decoder, used with generation.decoder=tiny
    # Weight variant to load where a folder has it (e.g. fp16: `*.fp16.safetensors`); None: the
    # plain weights, or the only variant a folder holds (an fp16-only download works as it is).
    variant: Optional[str] = None
    # A LoRA folder in diffusers' layout (pytorch_lora_weights.safetensors, as the
    # latent-consistency/lcm-lora-sdv1-5 snapshot ships it), fused into every loaded family's
    # UNet at start-up (absolute, or relative to root). None: no LoRA.
    lora: Optional[str] = None

    def path(self, name: str) -> Path:
        return Path(self.root) / getattr(self, name)

    def lora_path(self) -> Optional[Path]:
        return None if not self.lora else Path(self.root) / self.lora


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
    device: str = "auto"  # captioner + rewriter: auto (the generator's device, else cuda if present) | cpu | cuda:N
    dtype: str = "auto"  # captioner + rewriter: auto (float16 on cuda, float32 on cpu) | float32 | float16 | bfloat16


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
    scheduler: str = "dpmsolver++"  # ddpm | ddim | dpmsolver++ | unipc | lcm (2-8 steps, with an LCM-LoRA: models.lora)
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
    # torch.compile mode for backend=compile, with diffusers' inductor settings: auto
    # (reduce-overhead = CUDA graphs on a GPU, default on a CPU) | default | reduce-overhead | max-autotune
    compile_mode: str = "auto"
    pad_batches: str = "auto"  # pad the last partial batch to batch_size (static shapes): auto (compile/tensorrt) | on | off
    channels_last: str = "auto"  # UNet, ControlNet, VAE in channels_last: auto (on CUDA) | on | off
    fuse_qkv: bool = True  # fused QKV projections with SDPA attention (not with an explicit xformers request)
    decoder: str = "vae"  # vae (the family's AutoencoderKL) | tiny (AutoencoderTiny from models.taesd)
    text: str = "model"  # model (BLIP-2 caption + LLM rewrite, the paper) | class_name ("a photo of a <class>")


@dataclass
class StoreConfig:
    path: Optional[str] = None  # SASI store folder
    image_format: str = "png"
    write_online: bool = False  # online producers also write each SASI here


@dataclass
class FilterConfig:
    threshold: float = 0.6  # CLIP cosine below this flags a SASI as fishy (Appendix A)
    device: str = "auto"  # CLIP: auto (cuda if present) | cpu | cuda | cuda:N
    dtype: str = "auto"  # CLIP: auto (float16 on cuda, float32 on cpu) | float32 | float16 | bfloat16


@dataclass
class AugmentConfig:
    # None = the method's own (see README "Self-supervised methods"): mocov2 | simclr | byol |
    # mocov3 | swav | dino | vicreg (data/recipes/), or a path to a recipe YAML
    recipe: Optional[str] = None
    backend: str = "torchvision"  # torchvision | dali


@dataclass
class OptimConfig:
    # Every None below = the method's published recipe (sasi_online/ssl/recipes.py; the
    # README's table lists them with their sources).
    name: Optional[str] = None  # sgd | lars | adamw
    lr: Optional[float] = None  # per 256 images; scaled by global batch / 256
    weight_decay: Optional[float] = None
    momentum: float = 0.9  # SGD / LARS momentum (AdamW: beta1 stays 0.9)
    warmup_steps: Optional[int] = None  # set: overrides warmup_epochs
    warmup_epochs: Optional[float] = None  # linear warm-up, in epochs of the training set
    min_lr: Optional[float] = None  # end of the cosine, per 256 images like lr
    weight_decay_end: Optional[float] = None  # cosine weight-decay schedule to this (DINO); None: constant
    exclude_bias_norm: Optional[bool] = None  # no decay (and no LARS adaptation) on biases and norms
    lars_eta: Optional[float] = None  # LARS trust coefficient
    lars_clip: Optional[bool] = None  # LARC clipping: the layer's rate never exceeds the global one
    # LARS trust ratio: "sum" eta*|w|/(|g| + wd*|w|) (LARC, SwAV, solo-learn) | "update"
    # eta*|w|/|g + wd*w| (SimCLR, BYOL, MoCo-v3, Barlow Twins, VICReg)
    lars_trust: Optional[str] = None
    clip_grad: Optional[float] = None  # per-layer gradient-norm clip (DINO's); 0 = off


@dataclass
class MethodConfig:
    name: str = "mocov2"
    backbone: str = "resnet18"  # resnet18 | resnet50 | resnet101 | vit_small
    small_stem: bool = True  # 3x3 stem without max-pool for small images
    # None here = the method's published recipe (sasi_online/ssl/recipes.py).
    proj_dim: Optional[int] = None
    proj_hidden: Optional[int] = None
    pred_hidden: Optional[int] = None
    queue_size: Optional[int] = None  # MoCo-v2 negatives, AdCo bank; a multiple of the global batch
    # None = the method's published value (MoCo-v2 0.2, MoCo-v3 0.2, SimCLR 0.5, SwAV 0.1,
    # DINO student 0.1, AdCo 0.12; ignored by the others).
    temperature: Optional[float] = None
    # Base EMA momentum of target networks; None = the method's own (MoCo-v2 0.999,
    # MoCo-v3 0.99, BYOL/DINO 0.996, AdCo 0.99). Rises to momentum_final along a cosine;
    # momentum_final None = the method's own (1.0 for BYOL/DINO/MoCo-v3, constant for MoCo-v2/AdCo).
    momentum: Optional[float] = None
    momentum_final: Optional[float] = None
    shuffle_bn: Optional[bool] = None  # MoCo-v2, AdCo: shuffle the key batch across trainers (split batches in one process)
    num_prototypes: Optional[int] = None  # SwAV / DINO output size
    local_crops: Optional[int] = None  # multi-crop (DINO, SwAV): local views after the global ones
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
    # Timeout of the job's process groups (seconds). No wait of ours is a blocking call that
    # this can cut short (a slow producer is polled, never waited on in a collective).
    dist_timeout_s: int = 1800
    # DeepSpeed config entries merged over the generated one (`--deepspeed_config FILE` fills
    # this from a JSON file). Keys the project owns are refused with the key to use instead
    # (batch sizes, precision, optimizer, scheduler, ZeRO stage, timers, tag validation).
    deepspeed: dict = field(default_factory=dict)


@dataclass
class OnlineConfig:
    # launched: the last `producers` ranks generate and send SASI to the trainers;
    # colocated: each trainer generates on its own device between steps (one GPU is enough)
    mode: str = "launched"
    producers: int = 0  # ranks that generate (launched mode); 0 = offline training
    # Where the producers sit. 0: the last `producers` ranks of the job (on one node, or on the
    # last node(s)). P > 0: the last P local ranks of every node (e.g. 2 of 8 GPUs per node),
    # so each node's producers feed the trainers of the job from beside them; `producers`
    # must then be P x nodes. Read from the launcher's LOCAL_SIZE (deepspeed) or
    # LOCAL_WORLD_SIZE (torchrun).
    producers_per_node: int = 0
    colocated_every: int = 1  # colocated: one producer batch every K micro-steps
    ring_slots: int = 256
    # Side of a ring slot (a SASI and its real image, resized once by the producer); 0: the
    # augment recipe's largest view at data.image_size x 8/7 (256 px for 224 px crops)
    slot_side: int = 0
    max_reuse: int = 8
    max_age: int = 2000  # trainer steps
    lookahead: int = 64  # trainer steps the producers generate ahead (0: random images, no look-ahead)
    send_batch: int = 4  # SASI per producer -> trainer message
    credits: int = 4  # messages in flight per (producer, trainer) pair; receive buffers posted
    plots: bool = True  # ring fill / hit rate / throughput PNGs in train.out at the end
    # Before its first step each trainer waits until its ring holds this many SASI (or every
    # producer has stopped): producers load models meanwhile. 0 = start at once.
    start_sasi: int = 0
    # A run that asked for SASI and gets none stops (checkpoint written, every rank exits
    # non-zero, the producers' errors in the message): when every producer has stopped with
    # an error, or when no SASI reached any trainer this long after the producers reported
    # their models loaded (a slow compile or engine build counts as loading, not as failing).
    first_sasi_timeout_s: float = 900.0
    allow_fallback_only: bool = False  # drills: go on with pool draws and classic second views instead
    # Fault-injection hooks for tests and drills (-1 = off): producer batch N raises inside
    # generation (caught, skipped); the producer loop itself raises after N batches.
    fault_batch: int = -1
    fault_loop_after: int = -1
    fault_producer: int = -1  # the two hooks above act on this producer id only (-1: every producer)
    fault_delay_s: float = 0.0  # producer `fault_delay_producer` sleeps this long before its first batch
    fault_delay_producer: int = -1  # (-1: every producer)
    fault_load: bool = False  # producer `fault_producer` raises while loading its models


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_t: float = 0.07
    knn_center: bool = False  # subtract the bank's mean feature before the cosine (small benches)
    # Linear probe: full-batch L-BFGS on standardised features; the L2 strength is chosen
    # from this list on a seeded class-balanced hold-out of the train split.
    linear_weight_decays: list = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    linear_max_iter: int = 200
    # Linear protocol: lbfgs (the fast probe above, on cached features) | sgd (MoCo's and
    # solo-learn's: a linear layer trained by SGD, momentum 0.9, on the frozen backbone,
    # random-resized-crop + flip, cosine schedule). The three below are for sgd only.
    linear: str = "lbfgs"
    linear_epochs: int = 100
    linear_lr: float = 30.0  # MoCo-v2's lincls value at batch 256 (not scaled by batch)
    linear_batch_size: int = 256
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
        if isinstance(coerced, dict) and isinstance(current, dict):
            coerced = {**current, **coerced}  # e.g. method.extra: an include's keys, then the file's
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


def shipped_config_dir() -> Path:
    """The folder of the configs that ship with the package (`configs/` at the repository
    top installs as `sasi_online.configs`, as kernels/ and engines/ do)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("sasi_online.configs")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"  # a source checkout


def shipped_configs() -> list[str]:
    """Shipped config names, e.g. 'tiny_cpu', 'imagenet100/byol'."""
    root = shipped_config_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file by path or shipped name. Top-level names (`relative_to` None) are tried
    as a path first; included names relative to the including file's folder first. Then
    the shipped configs: 'tiny_cpu', 'imagenet100/byol', 'configs/tiny_cpu.yaml'."""
    raw = Path(name)
    tries = [relative_to / raw] if relative_to is not None else [raw]
    shipped = shipped_config_dir()
    parts = raw.parts[1:] if raw.parts[:1] == ("configs",) and len(raw.parts) > 1 else raw.parts
    if not raw.is_absolute() and parts:
        tries.append(shipped.joinpath(*parts))
    for p in list(tries):
        if p.suffix not in (".yaml", ".yml"):
            tries.append(p.with_name(p.name + ".yaml"))
    for p in tries:
        if p.is_file():
            return p
    close = difflib.get_close_matches(raw.with_suffix("").as_posix(), shipped_configs(), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = f" (included from '{relative_to}')" if relative_to is not None else ""
    raise ConfigError(f"config file '{name}' not found{where}.{hint} Give a path to a YAML file or "
                      f"a shipped name such as 'tiny_cpu' or 'imagenet100/byol' (the shipped "
                      f"ones are the YAML files under {shipped}, named without '.yaml')")


def _read_yaml(p: Path) -> dict:
    with open(p, encoding="utf-8") as fh:
        try:
            values = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(values).__name__}")
    return values


def _apply_file(cfg: Config, p: Path, chain: tuple[Path, ...]) -> None:
    """`include:` first (in order, each with its own includes), then the file's own keys."""
    here = p.resolve()
    if here in chain:
        loop = " -> ".join(str(q) for q in chain[chain.index(here):] + (here,))
        raise ConfigError(f"config include cycle: {loop}; remove one of these includes")
    values = _read_yaml(p)
    includes = values.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{p}: 'include' must be a config name or a list of them, got {includes!r}")
    for name in includes:
        _apply_file(cfg, find_config(name, relative_to=p.parent), chain + (here,))
    try:
        _fill(cfg, values, "")
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any; a path or a shipped name, its `include:` list
    applied first), then dotted overrides."""
    cfg = Config()
    if path is not None:
        _apply_file(cfg, find_config(path), ())
    _fill(cfg, parse_overrides(overrides), "")
    return resolve_recipe(cfg)


def resolve_recipe(cfg: Config) -> Config:
    """Fill every field left None with the published recipe of `method.name` (in place)."""
    from sasi_online.ssl.recipes import apply_recipe

    return apply_recipe(cfg)


def config_from_dict(values: dict) -> Config:
    cfg = Config()
    _fill(cfg, values, "")
    return resolve_recipe(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    from sasi_online.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
