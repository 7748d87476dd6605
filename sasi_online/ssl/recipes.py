"""Each method's published recipe: the values a config gets for every field it leaves None.

`apply_recipe(cfg)` fills `method.*`, `optim.*` and `augment.recipe` from `RECIPES[method.name]`
(then from `GENERIC` for fields a method does not use), so `method.name=byol` alone trains
BYOL as its authors did, and a config names only what it changes (a dataset's crop size,
solo-learn's CIFAR values, ...). The values were read from each method's official repository
at the commit named in `sources`, or from its paper; `recipe_table()` renders them for the
README (`python -m sasi_online.ssl.recipes README.md` rewrites the table there, and a test
checks the README matches). Method-specific knobs (`method.extra`), temperatures and EMA
momenta are the method classes' own defaults and appear in the same table.

Epoch-valued knobs (warm-up, DINO's last-layer freeze, SwAV's queue start ...) are converted
with the run's epoch length (training images // images per optimizer step).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECIPE_FIELDS = {
    "method": ("proj_dim", "proj_hidden", "pred_hidden", "queue_size", "num_prototypes", "shuffle_bn"),
    "optim": ("name", "lr", "weight_decay", "warmup_epochs", "min_lr", "weight_decay_end",
              "exclude_bias_norm", "lars_eta", "lars_clip", "lars_trust", "clip_grad"),
    "augment": ("recipe",),
}

# For the fields a method does not use (e.g. queue_size for BYOL): any value works.
GENERIC: dict[str, Any] = {
    "method.proj_dim": 128, "method.proj_hidden": 2048, "method.pred_hidden": 512,
    "method.queue_size": 65536, "method.num_prototypes": 3000, "method.shuffle_bn": False,
    "optim.name": "sgd", "optim.lr": 0.03, "optim.weight_decay": 1e-4, "optim.warmup_epochs": 0.0,
    "optim.min_lr": 0.0, "optim.weight_decay_end": None, "optim.exclude_bias_norm": False,
    "optim.lars_eta": 0.001, "optim.lars_clip": False, "optim.lars_trust": "sum", "optim.clip_grad": 0.0,
    "augment.recipe": "mocov2",
}


@dataclass(frozen=True)
class Published:
    values: dict  # dotted config key -> value
    backbone: str  # what the source trained (the configs pick the backbone per dataset)
    batch: int  # the source's global batch (optim.lr is per 256 images, scaled linearly)
    epochs: int
    sources: tuple  # "repository@commit file Lx-Ly (what)" or a paper section


RECIPES: dict[str, Published] = {
    "mocov2": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 128, "method.queue_size": 65536,
         "method.shuffle_bn": True, "optim.name": "sgd", "optim.lr": 0.03, "optim.weight_decay": 1e-4,
         "optim.exclude_bias_norm": False, "augment.recipe": "mocov2"},
        "ResNet-50", 256, 200,
        ("facebookresearch/moco@7397dfe main_moco.py L78-L105 (lr 0.03, SGD momentum 0.9, wd 1e-4), "
         "L153-L177 (dim 128, K 65536, m 0.999), L291 (SGD over all parameters), L329-L334 (aug+); "
         "moco/builder.py L35-L40 (2048-wide MLP head), L82-L152 (shuffle-BN); README.md L51 "
         "(v2: --mlp --moco-t 0.2 --aug-plus --cos)",)),
    "simsiam": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 2048, "method.pred_hidden": 512,
         "optim.name": "sgd", "optim.lr": 0.05, "optim.weight_decay": 1e-4, "optim.exclude_bias_norm": False,
         "augment.recipe": "mocov2"},
        "ResNet-50", 512, 100,
        ("facebookresearch/simsiam@a7bc177 main_simsiam.py L51-L60 (batch 512, lr 0.05, wd 1e-4), "
         "L86-L90 (dim 2048, pred 512, fixed predictor lr), L157 (lr x batch/256), L193-L199 (SGD over "
         "all parameters), L230-L235 (MoCo-v2 aug); simsiam/builder.py L28-L42 (heads); README.md L29-L32",)),
    "swav": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 128, "method.num_prototypes": 3000,
         "optim.name": "lars", "optim.lr": 0.6, "optim.weight_decay": 1e-6,
         "optim.min_lr": 0.0006, "optim.warmup_epochs": 0.0, "optim.exclude_bias_norm": False,
         "optim.lars_eta": 0.001, "optim.lars_clip": False, "augment.recipe": "swav"},
        "ResNet-50", 256, 200,
        ("facebookresearch/swav@06b1b7c scripts/swav_200ep_bs256_pretrain.sh L28-L46 (2x224 + 6x96 crops, "
         "3000 prototypes, queue 3840 from epoch 15, lr 0.6 -> 0.0006, prototypes frozen 5005 iterations "
         "= 1 epoch, wd 1e-6); main_swav.py L171-L177 (SGD over all parameters in LARC, trust 0.001, "
         "no clip); src/multicropdataset.py L37-L92 (colour distortion s=1, blur 0.5)",)),
    "adco": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 128, "method.queue_size": 65536,
         "method.shuffle_bn": True, "optim.name": "sgd", "optim.lr": 0.03, "optim.weight_decay": 1e-4,
         "optim.exclude_bias_norm": False, "augment.recipe": "mocov2"},
        "ResNet-50", 256, 200,
        ("maple-research-lab/AdCo@fd65f12 ops/argparser.py L31-L39 (lr 0.03, wd 1e-4), L65-L69 (dim 128, "
         "m 0.999, T 0.12), L89-L100 (bank 65536, bank lr 3, bank T 0.02, bank wd 1e-4); "
         "training/main_worker.py L113-L115 (SGD over all parameters), L187 (bank filled the first epoch); "
         "training/train.py L63-L67 (bank step at a constant lr), L247-L300 (bank rows = keys); "
         "model/AdCo.py L116-L122 (shuffle-BN); README.md L75",)),
    "mocov3": Published(
        {"method.proj_hidden": 4096, "method.proj_dim": 256, "method.pred_hidden": 4096,
         "optim.name": "lars", "optim.lr": 0.6, "optim.weight_decay": 1e-6, "optim.warmup_epochs": 10.0,
         "optim.exclude_bias_norm": True, "optim.lars_eta": 0.001, "optim.lars_clip": False,
         "optim.lars_trust": "update",
         "augment.recipe": "mocov3"},
        "ResNet-50", 4096, 100,
        ("facebookresearch/moco-v3@c349e6e main_moco.py L65-L69 (lr 0.6, wd 1e-6), L95-L117 (dim 256, "
         "mlp 4096, m 0.99, T 1.0, LARS, 10 warm-up epochs), L190 (lr x batch/256), L433 (cosine momentum); "
         "moco/optimizer.py L14-L34 (trust 0.001; biases and norms neither decayed nor adapted); "
         "CONFIG.md L14-L15 (ResNet-50: --moco-m-cos --crop-min=.2)",)),
    "byol": Published(
        {"method.proj_hidden": 4096, "method.proj_dim": 256, "method.pred_hidden": 4096,
         "optim.name": "lars", "optim.lr": 0.2, "optim.weight_decay": 1.5e-6, "optim.warmup_epochs": 10.0,
         "optim.exclude_bias_norm": True, "optim.lars_eta": 0.001, "optim.lars_clip": False,
         "optim.lars_trust": "update",
         "augment.recipe": "byol"},
        "ResNet-50", 4096, 1000,
        ("google-deepmind/deepmind-research@4822a45 byol/configs/byol.py L21-L23 (1000 epochs: lr 0.2, "
         "wd 1.5e-6, EMA 0.996), L40-L42 (projector 4096 -> 256, predictor 4096), L57-L64 (LARS eta 1e-3, "
         "momentum 0.9, 10 warm-up epochs); BYOL paper (Grill et al. 2020) Sec. 3.1 eq. 2 (summed "
         "symmetric loss), App. B (augmentations T, T'), App. C (biases and BN excluded from LARS and decay)",)),
    "dino": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 256, "method.num_prototypes": 65536,
         "optim.name": "sgd", "optim.lr": 0.03, "optim.weight_decay": 1e-4,
         "optim.weight_decay_end": 1e-4, "optim.warmup_epochs": 10.0, "optim.min_lr": 1e-6,
         "optim.exclude_bias_norm": True, "optim.clip_grad": 3.0, "augment.recipe": "dino"},
        "ResNet-50", 512, 100,
        ("facebookresearch/dino@7c446df README.md L207 (ResNet-50: sgd, lr 0.03, wd 1e-4 -> 1e-4, "
         "global crops 0.14-1, local 0.05-0.14); main_dino.py L55-L76 (65536 outputs, EMA 0.996, "
         "teacher T 0.04 after warm-up from 0.04 over 0 epochs), L87-L115 (clip 3.0, batch 64 x 8, "
         "last layer frozen 1 epoch, 10 warm-up epochs, min lr 1e-6, 8 local crops), L238-L250 "
         "(lr x batch/256, wd and momentum schedules), L420-L455 (augmentations); utils.py L632-L639 "
         "(no decay on biases and norms), L132-L144 (per-parameter clipping)",)),
    "simclr": Published(
        {"method.proj_hidden": 2048, "method.proj_dim": 128, "optim.name": "lars", "optim.lr": 0.3,
         "optim.weight_decay": 1e-6, "optim.warmup_epochs": 10.0, "optim.exclude_bias_norm": True,
         "optim.lars_eta": 0.001, "optim.lars_clip": False,
         "optim.lars_trust": "update", "augment.recipe": "simclr"},
        "ResNet-50", 4096, 100,
        ("google-research/simclr@383d414 tf2/run.py L38-L64 (lr 0.3 linear in batch/256, 10 warm-up epochs, "
         "wd 1e-6), L164-L200 (LARS, momentum 0.9, T 0.1, 3-layer projector to 128), L233 (jitter strength "
         "1.0); tf2/model.py L40-L41 (no decay on BN and biases); lars_optimizer.py L26 (eta 0.001), "
         "L78-L81 (no adaptation where no decay); tf2/data_util.py L66-L69, L413 (jitter 0.8/0.2, blur 0.5)",)),
    "barlow_twins": Published(
        {"method.proj_hidden": 8192, "method.proj_dim": 8192, "optim.name": "lars", "optim.lr": 0.2,
         "optim.weight_decay": 1e-6, "optim.warmup_epochs": 10.0, "optim.min_lr": 0.0002,
         "optim.exclude_bias_norm": True, "optim.lars_eta": 0.001, "optim.lars_clip": False,
         "optim.lars_trust": "update",
         "augment.recipe": "byol"},
        "ResNet-50", 2048, 1000,
        ("facebookresearch/barlowtwins@8e8d284 main.py L29-L41 (1000 epochs, batch 2048, lr 0.2 weights / "
         "0.0048 biases, wd 1e-6, lambda 0.0051, projector 8192-8192-8192), L88-L101 (biases and norms "
         "neither decayed nor adapted, LARS), L155-L170 (10 warm-up epochs, cosine to 0.001 x lr), "
         "L224-L254 (eta 0.001), L290-L317 (BYOL's asymmetric augmentations)",)),
    "vicreg": Published(
        {"method.proj_hidden": 8192, "method.proj_dim": 8192, "optim.name": "lars", "optim.lr": 0.2,
         "optim.weight_decay": 1e-6, "optim.warmup_epochs": 10.0, "optim.min_lr": 0.0002,
         "optim.exclude_bias_norm": True, "optim.lars_eta": 0.001, "optim.lars_clip": False,
         "optim.lars_trust": "update",
         "augment.recipe": "byol"},
        "ResNet-50", 2048, 100,
        ("facebookresearch/vicreg@4e12602 main_vicreg.py L44-L62 (mlp 8192-8192-8192, batch 2048, "
         "base lr 0.2, wd 1e-6, coefficients 25/25/1), L109-L114 and L235 (LARS eta 0.001; biases and "
         "norms neither decayed nor adapted), L167-L178 (10 warm-up epochs, cosine to 0.001 x lr); "
         "augmentations.py L37-L78 (blur 1.0/0.1, solarize 0/0.2)",)),
}


def published_values(name: str) -> dict:
    """Every recipe field for method `name`: its published values over `GENERIC`."""
    own = RECIPES[name].values if name in RECIPES else {}
    return {**GENERIC, **own}


def apply_recipe(cfg):
    """Fill the None recipe fields of `cfg` (a Config) for `cfg.method.name`; returns `cfg`."""
    values = published_values(cfg.method.name)
    for section, names in RECIPE_FIELDS.items():
        obj = getattr(cfg, section)
        for name in names:
            if getattr(obj, name) is None:
                setattr(obj, name, values[f"{section}.{name}"])
    if cfg.method.local_crops is None:  # the augmentation recipe's `local.count`
        cfg.method.local_crops = local_count(cfg.augment.recipe)
    return cfg


def local_count(recipe: str) -> int:
    from sasi_online.data.augment import load_recipe

    return load_recipe(recipe).local_count


def _method_fill(mcfg) -> dict:
    values = published_values(mcfg.name)
    fill = {n: values[f"method.{n}"] for n in RECIPE_FIELDS["method"] if getattr(mcfg, n) is None}
    if mcfg.local_crops is None:
        fill["local_crops"] = 0  # no augmentation recipe here: views come from the caller
    return fill


def resolved_method_config(mcfg):
    """A copy of a MethodConfig with its None recipe fields filled (for `build_method`
    called on a bare MethodConfig)."""
    fill = _method_fill(mcfg)
    return dataclasses.replace(mcfg, **fill) if fill else mcfg


def fill_method_config(mcfg):
    """Fill the None recipe fields of a MethodConfig in place (a method built directly)."""
    for name, value in _method_fill(mcfg).items():
        setattr(mcfg, name, value)
    return mcfg


# ----------------------------------------------------------------------------- README table
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _row(name: str) -> list[str]:
    from sasi_online.ssl.methods import METHODS

    cls = METHODS[name]
    v = published_values(name)
    p = RECIPES[name]
    heads = f"{v['method.proj_hidden']}→{v['method.proj_dim']}"
    if name in ("byol", "simsiam", "mocov3"):
        heads += f", pred {v['method.pred_hidden']}"
    if name in ("swav", "dino"):
        heads += f", {v['method.num_prototypes']} out"
    if name in ("mocov2", "adco"):
        heads += f", {'bank' if name == 'adco' else 'queue'} {v['method.queue_size']}"
    opt = f"{v['optim.name'].upper()} {_fmt(v['optim.lr'])}, wd {_fmt(v['optim.weight_decay'])}"
    if v["optim.weight_decay_end"] is not None and v["optim.weight_decay_end"] != v["optim.weight_decay"]:
        opt += f"→{_fmt(v['optim.weight_decay_end'])}"
    if v["optim.name"] == "lars":
        opt += f", η {_fmt(v['optim.lars_eta'])}{', clip' if v['optim.lars_clip'] else ''}"
        opt += ", trust η‖w‖/‖g+wd·w‖" if v["optim.lars_trust"] == "update" else ", trust η‖w‖/(‖g‖+wd‖w‖)"
    if v["optim.clip_grad"]:
        opt += f", grad clip {_fmt(v['optim.clip_grad'])}"
    sched = f"warm-up {_fmt(v['optim.warmup_epochs'])} ep"
    if v["optim.min_lr"]:
        sched += f", cosine to {_fmt(v['optim.min_lr'])}"
    final = cls.default_momentum_final
    ema = "—" if not cls.uses_momentum else (
        f"{_fmt(cls.default_momentum)}" + (f"→{_fmt(final)}" if final is not None else ""))
    temp = "—" if cls.default_temperature is None or not cls.uses_temperature else _fmt(cls.default_temperature)
    temp = getattr(cls, "temperature_doc", None) or temp
    n_local = local_count(v["augment.recipe"])
    crops = f"2 + {n_local} local" if n_local else "2"
    extra = ", ".join(f"{k} {_fmt(x)}" for k, x in cls.extra_defaults.items()) or "—"
    return [f"`{name}`", p.backbone, str(p.batch), str(p.epochs), heads, opt, sched,
            "no" if v["optim.exclude_bias_norm"] else "yes", ema, temp,
            f"{v['augment.recipe']}, {crops}", "yes" if v["method.shuffle_bn"] else "no", extra,
            "; ".join(p.sources)]


TABLE_BEGIN = "<!-- recipe-table:begin (generated by `python -m sasi_online.ssl.recipes README.md`) -->"
TABLE_END = "<!-- recipe-table:end -->"


def recipe_table() -> str:
    """The README's table of every method's defaults, rendered from the code."""
    head = ["method", "source backbone", "batch", "epochs", "heads", "optimiser (lr per 256)", "schedule",
            "decay on biases/norms", "EMA", "T", "views", "shuffle-BN", "method.extra", "source"]
    from sasi_online.ssl.methods import METHODS

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_row(n)) + " |" for n in METHODS]
    return "\n".join([TABLE_BEGIN, *lines, TABLE_END])


def write_readme(path: str | Path) -> bool:
    """Replace the table between the markers in `path`; True when the file changed."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{p}: no recipe-table markers; add the two marker lines where the table goes")
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    new = text[:start] + recipe_table() + text[end:]
    if new != text:
        p.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    changed = write_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print("README table updated" if changed else "README table already current")
