"""Offline generation into a SASI store: captions → rewrites → visual prompts → SASI.

Streams batch by batch (memory does not grow with the dataset) and skips every
(index, variant) already in the store, so running the same command again continues
where it stopped. Ends with a per-stage time summary (paper Table 13) saved as JSON in
the store and a grid PNG real | visual prompt | SASI.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from sasi_online.data.store import REPORTS, SasiStore, settings_hash
from sasi_online.errors import CorruptImageError, UserInputError
from sasi_online.utils import atomic_write_json, chunked, save_grid

from .families import FAMILY_FOLDERS, family_for
from .generator import SASIGenerator
from .text_stage import make_text_source, text_model_folders

log = logging.getLogger(__name__)

GEN_KINDS = ("image", "mask", "mix", "noise", "direct")  # direct: text only (paper Table 8)
# settings that change how fast, not what is generated
RUNTIME_ONLY = ("batch_size", "backend", "attention", "engine_dir", "device", "compile_mode", "pad_batches",
                "channels_last", "fuse_qkv")
GRID_ROWS = 8
TIMING_FILE, GRID_FILE, CAPTION_CACHE = "timing.json", "grid.png", "captions.jsonl"


@dataclass
class RunSummary:
    generated: int = 0
    failed: int = 0
    skipped_existing: int = 0
    skipped_corrupt: int = 0
    wall_seconds: float = 0.0
    seconds: dict = field(default_factory=dict)

    @property
    def sasi_per_second(self) -> float:
        """Throughput of the generation loop (model loading excluded)."""
        loop = self.wall_seconds - self.seconds.get("setup", 0.0)
        return self.generated / loop if loop > 0 else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sasi_per_second"] = self.sasi_per_second
        d["seconds_per_sasi"] = {k: v / max(self.generated, 1) for k, v in self.seconds.items()}
        return d


def generation_settings(cfg: Any, kind: str) -> dict:
    """Everything that decides what a SASI looks like (the store's settings hash)."""
    gen = {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k not in RUNTIME_ONLY}
    # semantics.device only moves the work; semantics.dtype at its default is left out, so stores
    # made before these keys existed keep their settings hash
    sem = {k: v for k, v in dataclasses.asdict(cfg.semantics).items()
           if k not in ("batch_size", "device") and not (k == "dtype" and v == "auto")}
    vis = dataclasses.asdict(cfg.visual)
    vis["kind"] = kind
    return {"generation": gen, "semantics": sem if cfg.generation.text == "model" else {},
            "visual": vis}


def model_hashes(cfg: Any, kind: str, text_folders: list[str], store_path: Any = None) -> dict:
    """Model identities (zoo.model_hash: configs + the weights loaded) of every model folder this
    run uses, for the store header. A store made under the identity of earlier versions keeps
    it where that is still these files (checked once; the pair is kept in STORE/models_identity.json)."""
    from sasi_online.zoo import model_hash

    fam = family_for(kind, cfg.generation.family)
    base, cn = FAMILY_FOLDERS[fam]
    names = [base] + ([cn] if kind in ("mask", "mix") else []) + list(text_folders)
    if kind in ("mask", "mix"):
        names.append("segmenter")
    variant = getattr(cfg.models, "variant", None)
    hashes = {getattr(cfg.models, n): model_hash(cfg.models.path(n), variant) for n in names}
    lora = cfg.models.lora_path() if hasattr(cfg.models, "lora_path") else None
    if lora is not None:  # the UNet runs with the LoRA fused in: that is its identity
        from sasi_online.zoo.identity import with_lora
        from sasi_online.zoo.lora import require_lora_file

        hashes[getattr(cfg.models, base)] = with_lora(hashes[getattr(cfg.models, base)], require_lora_file(lora))
    if store_path is not None:
        hashes = _keep_legacy_identities(Path(store_path), hashes, {getattr(cfg.models, n): cfg.models.path(n)
                                                                    for n in names})
    return hashes


IDENTITY_FILE = "models_identity.json"


def _keep_legacy_identities(store: Path, hashes: dict, folders: dict) -> dict:
    """Where the store header names a model by its old identity and that is still what the
    folder holds, use the old one (so the store still matches) and record the new beside it."""
    import json

    from sasi_online.zoo import legacy_model_hash

    from sasi_online.data.store import HEADER

    if not (store / HEADER).is_file():
        return hashes  # a new store
    try:
        had = json.loads((store / HEADER).read_text(encoding="utf-8")).get("models") or {}
        pairs = store / IDENTITY_FILE
        known = json.loads(pairs.read_text(encoding="utf-8")) if pairs.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return hashes  # the store's own checks report a damaged header
    out, changed = dict(hashes), False
    for name, new in hashes.items():
        old = had.get(name) if isinstance(had, dict) else None
        if old is None or old == new:
            continue
        if known.get(name, {}).get("identity") == new and known[name].get("legacy") == old:
            out[name] = old
        elif legacy_model_hash(folders[name]) == old:
            out[name], known[name], changed = old, {"legacy": old, "identity": new}, True
            log.info("store %s: model %s keeps its earlier identity %s (now %s)", store, name, old, new)
    if changed:
        atomic_write_json(store / IDENTITY_FILE, known)
    return out


def dataset_identity(ds: Any) -> dict:
    return {"name": ds.name, "split": ds.split, "size": len(ds)}


def _work(store: SasiStore, n: int, variants: int) -> Iterator[tuple[int, int]]:
    """(index, variant) pairs still missing, image by image (variants of one image adjacent)."""
    for i in range(n):
        for v in range(variants):
            if (i, v) not in store:
                yield i, v


class _Stopwatch:
    def __init__(self, seconds: dict):
        self.seconds = seconds

    def __call__(self, name: str):
        sw = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sw.seconds[name] = sw.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Span()


def generate_store(cfg: Any, store_path: str | Path, *, kind: Optional[str] = None, variants: int = 1,
                   limit: Optional[int] = None, allow_new_settings: bool = False, progress: bool = True,
                   generator: Optional[SASIGenerator] = None) -> RunSummary:
    """Fill `store_path` with `variants` SASI for each of the first `limit` dataset images."""
    from tqdm.auto import tqdm

    from sasi_online.data.datasets import build_dataset
    from sasi_online.visual.prompts import build_visual_prompts
    from sasi_online.visual.variants import plan_variant

    kind = kind or cfg.visual.kind
    if kind not in GEN_KINDS:
        raise UserInputError(f"visual prompt kind '{kind}' is not known; use one of {', '.join(GEN_KINDS)}")
    if variants < 1:
        raise UserInputError(f"--variants must be >= 1, got {variants}")
    if kind in ("image", "mix"):  # refuse before the store header records these settings
        from .loop import img2img_steps

        img2img_steps(cfg.generation.steps, cfg.generation.strength)
    # the store belongs to the whole dataset; a limit only chooses which images to do now
    ds = build_dataset(dataclasses.replace(cfg.data, limit=None))
    limit = limit if limit is not None else cfg.data.limit
    n = len(ds) if limit is None else min(int(limit), len(ds))
    res = cfg.generation.resolution
    t_start = time.perf_counter()

    gen = generator or SASIGenerator.from_config(cfg.models, cfg.generation)
    settings = generation_settings(cfg, kind)
    store = SasiStore.create(store_path, dataset=dataset_identity(ds),
                             models=model_hashes(cfg, kind, text_model_folders(cfg), store_path),
                             settings=settings,
                             image_format=cfg.store.image_format, allow_new_settings=allow_new_settings)
    try:
        # captions are cached in the store (keyed by image, SEP and model hash): reruns skip them
        text = make_text_source(cfg, ds, device=str(gen.device), cache_path=Path(store_path) / CAPTION_CACHE)
        segmenter = None
        if kind in ("mask", "mix"):
            from sasi_online.visual.segmenter import Segmenter

            segmenter = Segmenter.from_config(cfg.models, cfg.visual, device=gen.device, dtype=gen.dtype)
    except Exception:
        store.close()
        raise
    s_hash = settings_hash(settings)
    summary = RunSummary()
    seconds: dict = {"setup": time.perf_counter() - t_start}  # model loading, hashing, store open
    watch = _Stopwatch(seconds)
    grid: list[list[Any]] = []
    todo_count = n * variants - sum(1 for i in range(n) for v in range(variants) if (i, v) in store)
    summary.skipped_existing = n * variants - todo_count
    sem_variants = cfg.semantics.variants
    try:
        with tqdm(total=todo_count, desc=f"SASI ({kind})", unit="img", disable=not progress) as bar:
            for batch in chunked(_work(store, n, variants), cfg.generation.batch_size):
                with watch("load"):
                    items, samples = [], []
                    for index, variant in batch:
                        try:
                            sample = ds[index]
                        except CorruptImageError as exc:
                            if cfg.data.strict:
                                raise
                            log.warning("skipping corrupt image %d: %s", index, exc)
                            summary.skipped_corrupt += 1
                            bar.update(1)
                            continue
                        items.append((index, variant))
                        samples.append(sample)
                if not items:
                    continue
                plans = [plan_variant(i, v, semantic_variants=sem_variants, vp_variants=cfg.visual.variants,
                                      augment=cfg.visual.augment, base_seed=cfg.generation.seed)
                         for i, v in items]
                with watch("captions"):
                    captions = text.captions(samples)
                with watch("rewrites"):
                    rewrites = text.rewrites(captions, samples, [p.rewrite_index for p in plans])
                with watch("visual_prompts"):
                    if kind == "direct":  # one caption, several seeds, no visual prompt
                        vps = [None] * len(items)
                    else:
                        vcfg = dataclasses.replace(cfg.visual, kind=kind)
                        vps = build_visual_prompts([s.image for s in samples], [i for i, _ in items],
                                                   [v for _, v in items], cfg=vcfg, resolution=res,
                                                   base_seed=cfg.generation.seed, segmenter=segmenter,
                                                   semantic_variants=sem_variants)
                result = gen.generate(rewrites, vps, [p.seed for p in plans])
                for name, dt in result.seconds.items():
                    seconds[name] = seconds.get(name, 0.0) + dt
                with watch("write"):
                    for j, ((index, variant), sample) in enumerate(zip(items, samples)):
                        ok = bool(result.finite[j])
                        store.add(result.images[j] if ok else None, index=index, variant=variant,
                                  relpath=sample.relpath, caption=captions[j], rewrite=rewrites[j],
                                  vp_kind=kind, seed=int(result.seeds[j]), settings=s_hash,
                                  retries=int(result.retries[j]))
                        summary.generated += ok
                        summary.failed += not ok
                        if ok and len(grid) < GRID_ROWS:
                            grid.append([sample.image, _vp_cell(vps[j], rewrites[j]), result.images[j]])
                bar.update(len(items))
    finally:
        store.close()
        summary.wall_seconds = time.perf_counter() - t_start
        summary.seconds = seconds
        if summary.generated or summary.failed:
            atomic_write_json(Path(store_path) / REPORTS / TIMING_FILE, {"kind": kind, **summary.to_dict()})
            if grid:
                save_grid(grid, Path(store_path) / REPORTS / GRID_FILE, titles=["real", "visual prompt", "SASI"])
    return summary


def _vp_cell(vp: Any, rewrite: str) -> Any:
    """What the grid shows as the visual prompt: its start image, its mask map, or the text."""
    if vp is None:
        return rewrite
    if vp.init_image is not None:
        return vp.init_image
    if vp.control_image is not None:
        return vp.control_image
    return rewrite
