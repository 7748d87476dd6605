"""`sasi demo`: the whole method on the embedded data with the micro model set, on a CPU.

Each step runs the same `sasi` command a user would type, so the demo is also a smoke
test of the command line. Steps whose outputs exist are skipped on a rerun (each
command resumes on its own), so an interrupted demo continues where it stopped.

  1. zoo        build the micro model set (`sasi zoo build DIR --micro`; kept when it is already
                complete, rebuilt when DIR holds the random tiny set of an earlier demo, is
                damaged, or the package ships newer micro models; outputs made with other
                models are then removed so that every step runs again)
  2. semantics  captions, rewrites, visual prompts; grid.png
  3. generate   offline SASI store for the first images; grid.png, timing.json
  4. filter     CLIP similarity to the real image, fishy flags, histogram
  5. train      the same short MoCo-v2 run twice: base pairs, then (real, SASI) pairs
  6. online     the same run with SASI generated in the loop: one producer rank and one
                trainer rank in one deepspeed launch (`--skip-online` leaves it out)
  7. eval       kNN, linear probe, semi-supervised, t-SNE; a side-by-side report
Then SUMMARY.md links every picture and table and says what the one-seed comparison
can and cannot show (bench/bench_science.py measures it over seeds, with error bars).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

# the folders under --out that hold what a step made with the models
MODEL_OUTPUTS = ("semantics", "sasi-store", "base", "sasi", "online", "compare")
ZOO_STAMP = ".zoo_identity"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--models", default="tiny-zoo",
                        help="model set root; the micro set is built there with `sasi zoo build DIR --micro` "
                             "when missing (a folder holding the random tiny set is rebuilt)")
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


def _zoo_manifest(models: str) -> dict:
    path = Path(models, "zoo.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def _micro_zoo(models: str, out: Path) -> None:
    """The micro set in MODELS; outputs under OUT made with other models are removed."""
    from sasi_online.zoo import verify_zoo

    manifest = _zoo_manifest(models)
    argv = ["zoo", "build", models, "--micro"]
    if manifest and manifest.get("kind") != "micro":
        print(f"sasi demo: {models} holds the {manifest.get('kind', 'random')} model set of an earlier run; "
              f"rebuilding it with the micro set", flush=True)
        argv.append("--force")
    elif manifest and verify_zoo(models):
        print(f"sasi demo: {models} differs from its zoo.json; rebuilding it", flush=True)
        argv.append("--force")
    _sasi(*argv)  # a no-op when the folder already holds the shipped micro set
    identity = json.dumps(_zoo_manifest(models).get("files", {}), sort_keys=True)
    stamp = out / ZOO_STAMP
    if stamp.is_file() and stamp.read_text(encoding="utf-8") != identity:
        stale = [n for n in MODEL_OUTPUTS if (out / n).exists()]
        if stale:
            print(f"sasi demo: the models changed since the last demo; removing {', '.join(stale)} "
                  f"under {out} so that every step runs again", flush=True)
        for name in stale:
            shutil.rmtree(out / name)
    elif not stamp.is_file() and (out / "SUMMARY.md").is_file():
        # a demo from before the micro set, which did not record its models: the random tiny set
        for name in MODEL_OUTPUTS:
            shutil.rmtree(out / name, ignore_errors=True)
    from sasi_online.utils import atomic_write_text

    atomic_write_text(stamp, identity)


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

    step("zoo", lambda: _micro_zoo(models, out))
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
    _write_summary(out, store, times, online, _zoo_manifest(models))
    print(f"\nsasi demo: done in {times['total']:.0f} s -> {out / 'SUMMARY.md'}")
    return 0


def _rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _models_paragraph(manifest: dict) -> str:
    """What the models learned from and what this one-seed run can show."""
    if manifest.get("kind") == "micro":
        trained = ", ".join(sorted(manifest.get("trained") or {})) or "none"
        random = ", ".join(manifest.get("random") or []) or "none"
        models = (f"The models are the micro set shipped with the package, trained once on Fashion-MNIST's "
                  f"60,000 training images (trained: {trained}; still random: {random}).")
    else:
        models = (f"The models are the {manifest.get('kind', 'random')} tiny set: random weights (the captioner "
                  f"and rewriter briefly trained), so SASI and mask maps are noise.")
    return (f"{models} The SSL runs below see only the embedded 2,000-image training subset and are tested on "
            "its 500 test images, which come from Fashion-MNIST's official test split, so no model here has "
            "seen them. The evaluation below is one seed of short runs: it shows that every stage runs end to "
            "end and how the outputs connect, not whether SASI help. Runs of one arm differ by up to 2.5 "
            "points from seed to seed (measured by the science bench, over 3 seeds of longer runs), so a "
            "difference of a few points between base and w/ SASI here is no evidence either way. For the "
            "method's effect with error bars (mean ± std over seeds, paired 95 % intervals) see "
            "`python bench/bench_science.py` and the README's \"Science at micro scale\" section.")


def _write_summary(out: Path, store: Path, times: dict, online: dict | None, manifest: dict) -> None:
    from sasi_online.utils import atomic_write_text

    lines = ["# sasi demo", "",
             "The paper's method end to end on the embedded Fashion-MNIST subset with the micro model set.", "",
             _models_paragraph(manifest), ""]
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
