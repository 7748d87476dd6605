"""`sasi filter STORE`: flag fishy SASI by CLIP similarity to their real image.

Scores every SASI not scored yet (scores are kept in the store's manifest), flags those
under --threshold as fishy (readers such as the trainer skip them; nothing is deleted),
writes STORE/reports/similarity_hist.png and STORE/reports/filter.json. Rerun with another threshold
to re-flag without rescoring.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("store", help="SASI store folder written by `sasi generate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--threshold", type=float, help="flag SASI with cosine below this (filter.threshold; "
                                                        "paper Appendix A)")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--models", help="model set root holding the CLIP folder (models.root)")
    parser.add_argument("--data-root", help="dataset folder, when the dataset is not embedded (data.root)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per CLIP forward")
    parser.add_argument("--device", help="where CLIP runs: auto (cuda if present), cpu, cuda, cuda:N "
                                         "(filter.device; filter.dtype sets its precision)")
    parser.add_argument("--rescore", action="store_true", help="recompute every similarity")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    from pathlib import Path

    from sasi_online.config import load_config
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.store import SasiStore, StoreMismatchError
    from sasi_online.eval.similarity import ClipSimilarity, flag_fishy, score_store, similarity_histogram
    from sasi_online.utils import atomic_write_json, limit_threads

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    limit_threads()
    overrides = list(args.overrides or [])
    for opt, key in (("threshold", "filter.threshold"), ("models", "models.root"), ("data_root", "data.root"),
                     ("device", "filter.device")):
        if getattr(args, opt) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, opt))}")
    cfg = load_config(args.config, overrides)
    store = SasiStore.open(args.store, writable=True)
    try:
        want = store.header["dataset"]
        data_cfg = dataclasses.replace(cfg.data, name=want["name"], split=want["split"], limit=None)
        ds = build_dataset(data_cfg)
        if len(ds) != want["size"]:
            raise StoreMismatchError(f"store '{args.store}' was made for {want}, but data.root gives "
                                     f"{len(ds)} images; point --data-root at the dataset it was made from")
        scorer = ClipSimilarity.from_config(cfg, batch_size=args.batch_size)
        scored = score_store(store, ds, scorer, batch_size=args.batch_size, progress=not args.no_progress,
                             rescore=args.rescore)
        counts = flag_fishy(store, cfg.filter.threshold)
        sims = [r.similarity for r in store.iter_records() if r.similarity is not None]
        hist = similarity_histogram(sims, cfg.filter.threshold, store.reports_dir() / "similarity_hist.png")
        summary = {"threshold": cfg.filter.threshold, "newly_scored": scored, **counts,
                   "mean_similarity": float(sum(sims) / len(sims)) if sims else None}
        atomic_write_json(store.reports_dir() / "filter.json", summary)
    finally:
        store.close()
    print(f"{counts['fishy']} of {counts['scored']} SASI under threshold {cfg.filter.threshold:g} are flagged "
          f"fishy ({counts['changed']} flags changed, {scored} newly scored); histogram: {hist}")
    return 0
