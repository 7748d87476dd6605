"""`build_micro`: a complete model zoo from the micro models shipped with the package
(sasi_online/assets/micro_zoo/, each file's sha256 in its zoo.json), plus random tiny
models (the zoo's own builders, `seed`) for every folder the micro set does not ship; a shipped
`vae/` goes into both diffusion families (a shipped `sd15/` or `sd21/` holds no VAE of its own).
Copying and the random builders are deterministic: the same seed gives the same bytes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from sasi_online.errors import ModelFolderError, UserInputError
from sasi_online.utils import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "micro_zoo"


def shipped_manifest(root: Path = ASSETS) -> dict:
    """The shipped zoo.json, after checking every file it lists against its sha256."""
    path = root / "zoo.json"
    if not path.is_file():
        raise ModelFolderError(f"the micro model set is not installed ('{path}' is missing): reinstall "
                               f"sasi_online, or train it with `sasi zoo train-micro --out DIR`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    bad = [rel for rel, digest in manifest["files"].items()
           if not (root / rel).is_file() or file_sha256(root / rel) != digest]
    if bad:
        raise ModelFolderError(f"the shipped micro models are damaged ({', '.join(bad[:5])} differ from "
                               f"{path}): reinstall sasi_online")
    return manifest


def _random_builders(tmp: Path, seed: int) -> dict:
    """Folder -> builder of the random tiny set, for folders the micro set does not ship."""
    from .. import build as b
    from ..tiny_lm import _build_blip2, _build_llama

    def sd(family):  # a random pipeline and its random ControlNet
        return lambda: b._build_controlnet(tmp, f"controlnet-{family}-seg", b._build_sd(tmp, family, seed), seed)

    def controlnet(family):  # a random ControlNet for a shipped (already copied) UNet
        def build():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(str(tmp / family / "unet"))
            b._build_controlnet(tmp, f"controlnet-{family}-seg", unet, seed)
        return build

    return {"sd15": sd("sd15"), "sd21": sd("sd21"), "controlnet-sd15-seg": controlnet("sd15"),
            "controlnet-sd21-seg": controlnet("sd21"), "taesd": lambda: b._build_taesd(tmp, seed),
            "upernet": lambda: b._build_upernet(tmp, seed), "clip": lambda: b._build_clip(tmp, seed),
            "blip2": lambda: _build_blip2(tmp, seed, 150), "llama": lambda: _build_llama(tmp, seed, 200)}


def _family(controlnet_folder: str) -> str:
    return controlnet_folder.split("-")[1]  # controlnet-sd15-seg -> sd15


def _trained_folders(folders, shipped_dirs: set) -> list:
    """Shipped folders, in zoo order; a shipped ControlNet counts only beside its shipped
    family (it was trained from that UNet and fits no random one)."""
    return [f for f in folders if f in shipped_dirs
            and (not f.startswith("controlnet-") or _family(f) in shipped_dirs)]


def _identity(manifest: dict, seed: int) -> str:
    from ..build import _source_hash

    h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    h.update(f"{seed}|{_source_hash()}".encode())
    h.update(Path(__file__).read_bytes())  # this builder too
    return h.hexdigest()[:16]


def _already(out: Path, identity: str, force: bool) -> bool:
    manifest = out / "zoo.json"
    if not out.exists():
        return False
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        return old.get("micro_identity") == identity and not force
    if any(out.iterdir()) and not force:
        raise UserInputError(f"'{out}' exists and is not a model zoo (no zoo.json): choose an empty or "
                             f"new folder, or pass --force to replace it")
    return False


def build_micro(out_dir: str | Path, seed: int = 0, force: bool = False, root: Path = ASSETS) -> Path:
    """Write the micro zoo under `out_dir` (built beside it, renamed into place); a folder
    that already holds this very zoo is kept as is."""
    from tqdm.auto import tqdm

    from ..build import FOLDERS, ZOO_FORMAT, _file_hashes, _library_versions

    out = Path(out_dir)
    shipped = shipped_manifest(root)
    identity = _identity(shipped, seed)
    if _already(out, identity, force):
        log.info("micro zoo at %s is already built", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    shipped_dirs = {rel.split("/", 1)[0] for rel in shipped["files"] if "/" in rel}
    trained = _trained_folders(FOLDERS, shipped_dirs)
    builders = _random_builders(tmp, seed)
    random = [f for f in builders if f not in trained]
    for name in tqdm(trained + random, desc="building micro zoo", unit="model", disable=None):
        if name in trained:
            shutil.copytree(root / name, tmp / name)
        elif not (name.startswith("controlnet-") and _family(name) in random):  # else sd() made it
            builders[name]()
    if "vae" in shipped_dirs:  # one trained VAE for both families, as SD-1.5 and SD-2.x share one
        for family in ("sd15", "sd21"):
            shutil.rmtree(tmp / family / "vae", ignore_errors=True)  # a shipped family has none
            shutil.copytree(root / "vae", tmp / family / "vae")
    atomic_write_json(tmp / "zoo.json", {
        "format": ZOO_FORMAT, "kind": "micro", "seed": seed, "versions": _library_versions(),
        "micro_identity": identity, "trained": shipped["models"],
        "random": random, "trained_vae": "vae" in shipped_dirs, "files": _file_hashes(tmp),
    })
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("micro zoo built at %s in %.1f s (trained: %s; random: %s)", out, time.perf_counter() - t0,
             ", ".join(trained), ", ".join(random) or "none")
    return out
