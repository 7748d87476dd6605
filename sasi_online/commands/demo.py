"""`sasi demo`: the whole method on the embedded data with the tiny models, on a CPU.

Each step runs the same `sasi` command a user would type, so the demo is also a smoke
test of the command line. Steps whose outputs exist are skipped on a rerun (each
command resumes on its own), so an interrupted demo continues where it stopped.

  1. zoo        build the tiny model set (skipped when it is already complete)
  2. semantics  captions, rewrites, visual prompts; grid.png
  3. generate   offline SASI store for the first images; grid.png, timing.json
  4. filter     CLIP similarity to the real image, fishy flags, histogram
  5. train      the same short MoCo-v2 run twice: base pairs, then (real, SASI) pairs
  6. online     the same run with SASI generated in the loop: one producer rank and one
                trainer rank in one deepspeed launch (`--skip-online` leaves it out)
  7. eval       kNN, linear probe, semi-supervised, t-SNE; a side-by-side report
Then SUMMARY.md links every picture and table.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--models", default="tiny-zoo",
                        help="model set root; built here with `sasi zoo build` when missing")
    parser.add_argument("--images", type=int, default=256, help="images that get SASI offline")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--vp-kind", default="mix", choices=["image", "mask", "mix", "noise"],
                        help="visual prompt kind (the paper's best is mix)")
    parser.add_argument("--skip-online", action="store_true", help="leave out the online run")


def _sasi(*argv: str) -> None:
    from sasi_online.cli import main

    print(f"\n$ sasi {' '.join(argv)}", flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"sasi demo: step `sasi {' '.join(argv)}` failed with exit code {code}")


def _online(out: Path, models: str, steps: int, vp_kind: str) -> dict:
    """One producer and one trainer in one launch, through the deepspeed launcher."""
    from sasi_online.commands._launch import launch_train

    return launch_train("online_tiny", ranks=2, overrides=[
        f"models.root={models}", f"train.out={out}", f"train.steps={steps}", f"visual.kind={vp_kind}",
        f"train.ckpt_every={steps}", f"train.knn_every={steps}"])


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = args.models
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times[name] = round(time.perf_counter() - t0, 1)

    from sasi_online.zoo import verify_zoo

    step("zoo", lambda: (not Path(models, "zoo.json").exists() or verify_zoo(models))
         and _sasi("zoo", "build", models))
    step("semantics", lambda: _sasi("semantics", "--models", models, "--limit", "16", "--vp-kind", args.vp_kind,
                                    "--out", str(out / "semantics")))
    store = out / "sasi-store"
    step("generate", lambda: _sasi("generate", "--models", models, "--store", str(store), "--vp-kind", args.vp_kind,
                                   "--limit", str(args.images), "--steps", "10", "--batch-size", "16"))
    step("filter", lambda: _sasi("filter", str(store), "--models", models))
    runs = {"base": ["train.pair_mode=base"],
            "sasi": ["train.pair_mode=sasi", f"store.path={store}"]}
    for name, extra in runs.items():
        step(f"train_{name}", lambda n=name, e=extra: _sasi(
            "train", "--config", "tiny_cpu", f"train.out={out / n}", f"train.steps={args.steps}",
            f"models.root={models}", *e))
    online = None
    names = ["base", "w/ SASI (offline)"]
    if not args.skip_online:
        t0 = time.perf_counter()
        online = _online(out / "online", models, args.steps, args.vp_kind)
        times["online"] = round(time.perf_counter() - t0, 1)
        runs["online"] = []
        names.append("w/ SASI (online)")
    step("eval", lambda: _sasi("eval", *[str(out / n / "checkpoints") for n in runs], "--names", *names,
                               "--out", str(out / "compare")))
    times["total"] = round(time.perf_counter() - t_all, 1)
    _write_summary(out, store, times, online)
    print(f"\nsasi demo: done in {times['total']:.0f} s -> {out / 'SUMMARY.md'}")
    return 0


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _write_summary(out: Path, store: Path, times: dict, online: dict | None) -> None:
    from sasi_online.utils import atomic_write_text

    lines = ["# sasi demo", "",
             "The paper's method end to end on the embedded Fashion-MNIST subset with the tiny model set.",
             "Tiny models make tiny pictures: this shows that every stage runs and how they connect,",
             "not the paper's accuracy.", ""]
    pictures = [
        ("Captions, rewrites and visual prompts", out / "semantics" / "grid.png"),
        ("Real | visual prompt | SASI", store / "reports" / "grid.png"),
        ("CLIP similarity of each SASI to its real image", store / "reports" / "similarity_hist.png"),
    ]
    for title, path in pictures:
        if path.exists():
            lines += [f"## {title}", "", f"![{title}]({_rel(path, out)})", ""]
    report = out / "compare" / "report.md"
    if report.exists():
        # the report's own picture links are relative to its folder
        text = re.sub(r"!\[([^\]]*)\]\(([^)/]+)\)", r"![\1](compare/\2)", report.read_text(encoding="utf-8"))
        text = re.sub(r"^# .*\n", "", text).replace("\n## ", "\n### ")  # nest under this heading
        lines += ["## Evaluation: base vs w/ SASI, offline and online", "", text.strip(), ""]
    timing = store / "reports" / "timing.json"
    if timing.exists():
        lines += ["## Generation time per stage (paper Table 13)", "", "```json",
                  timing.read_text(encoding="utf-8").strip(), "```", ""]
    if online:
        lines += ["## Online generation", ""]
        for key, value in online.items():
            if str(value).endswith(".png") and Path(value).exists():
                lines += [f"![{key}]({_rel(Path(value), out)})", ""]
            else:
                lines.append(f"- {key}: {value}")
        lines.append("")
    lines += ["## Wall-clock seconds per step", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in times.items()]
    atomic_write_text(out / "SUMMARY.md", "\n".join(lines) + "\n")
