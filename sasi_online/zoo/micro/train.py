"""`train_micro`: train the micro set from Fashion-MNIST's training files, one model after
the other, resuming after the last finished model; writes train.json (steps, losses,
seconds per model), train.log and zoo.json (sha256 of every file) next to the models."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

from sasi_online.errors import UserInputError
from sasi_online.utils import atomic_write_json

from functools import partial

from . import autoencoders, captioner, clip, controlnet, diffusion, rewriter, segmenter
from .common import log
from .data import load_split

# cheapest and most useful first; the diffusion models learn in the trained vae's latent
# space and each ControlNet starts from its family's trained UNet, so they come after those
TRAINERS = {"upernet": segmenter.train, "blip2": captioner.train, "clip": clip.train,
            "llama": rewriter.train, "vae": autoencoders.train,  # vae: vae/ and taesd/
            "sd15": partial(diffusion.train, family="sd15", steps=diffusion.STEPS_SD15),
            "controlnet-sd15-seg": partial(controlnet.train, family="sd15"),
            "sd21": partial(diffusion.train, family="sd21"),
            "controlnet-sd21-seg": partial(controlnet.train, family="sd21")}
MICRO_FORMAT = 1


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_manifest(out: Path, report: dict, seed: int) -> None:
    from ..build import _file_hashes, _library_versions

    atomic_write_json(out / "zoo.json", {
        "format": MICRO_FORMAT, "kind": "micro", "seed": seed, "versions": _library_versions(),
        "data": "Fashion-MNIST train split (60,000 images)", "models": report,
        "files": {k: v for k, v in _file_hashes(out).items() 
                  if k not in ("train.log", "train.json") and not k.startswith(f"{diffusion.LATENT_CACHE}/")},
    })


def train_micro(data: str | Path, out: str | Path, seed: int = 0, only: Optional[Iterable[str]] = None,
                force: bool = False) -> Path:
    """Train the models named in `only` (default: all) into `out`; a model already trained
    there with this seed is kept unless `force`. Returns `out`."""
    names = list(only) if only else list(TRAINERS)
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        raise UserInputError(f"unknown micro model(s) {', '.join(unknown)}: choose from {', '.join(TRAINERS)}")
    images, labels = load_split(data, "train")  # refused before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    for name in ("sasi_online.zoo.micro", "sasi_online.zoo.tiny_lm"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        log.info("Fashion-MNIST train split: %d images from %s, seed %d", len(images), data, seed)
        report = _read(out / "train.json")
        if report.get("seed", seed) != seed:
            report = {}
        report["seed"] = seed
        for name in names:
            done = report.get(name)
            if done and (out / name).is_dir() and not force:
                log.info("%s already trained (%.0f s): kept", name, done.get("seconds", 0))
                continue
            t0 = time.perf_counter()
            info = TRAINERS[name](images, labels, out, seed)
            info["seconds"] = round(time.perf_counter() - t0, 1)
            report[name] = info
            atomic_write_json(out / "train.json", report)
            log.info("%s trained in %.0f s", name, info["seconds"])
        write_manifest(out, {k: v for k, v in report.items() if k != "seed"}, seed)
    finally:
        for name in ("sasi_online.zoo.micro", "sasi_online.zoo.tiny_lm"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    return out
