"""`sasi eval`: evaluate trained encoders and compare runs side by side.

    sasi eval runs/base/ckpt.pt                            # → runs/base/eval/{eval.json,report.md,...}
    sasi eval runs/base/ckpt.pt runs/sasi/ckpt.pt --names base sasi --out runs/compare
    sasi eval runs/base/ckpt.pt --transfer cifar10:data/cifar10 eval.knn_k=20
    sasi eval --compare runs/base/eval/eval.json runs/sasi/eval/eval.json --out runs/compare
"""
from __future__ import annotations

import re

from pathlib import Path

from sasi_online.errors import UserInputError


def add_arguments(parser) -> None:
    parser.add_argument("items", nargs="*", metavar="CHECKPOINT|key=value",
                        help="checkpoint files (or DeepSpeed checkpoint folders) to evaluate, and "
                             "eval.*/data.* overrides such as eval.knn_k=20 or data.root=DIR")
    parser.add_argument("--out", default=None,
                        help="output folder (default: RUN_FOLDER/eval for one checkpoint, "
                             "runs/eval for several; each run then goes to OUT/NAME)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="one column name per run, checkpoints first, then --compare files")
    parser.add_argument("--transfer", nargs="+", default=[], metavar="DATASET:ROOT",
                        help="also linear-probe these datasets, e.g. cifar10:data/cifar10")
    parser.add_argument("--compare", nargs="+", default=[], metavar="EVAL_JSON",
                        help="eval.json files of earlier runs to put in the report")


def _split_items(items: list[str]) -> tuple[list[str], list[str]]:
    checkpoints, overrides = [], []
    for item in items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            checkpoints.append(item)
    return checkpoints, overrides


def run(args) -> int:
    from sasi_online.utils import limit_threads

    limit_threads()
    checkpoints, overrides = _split_items(args.items)
    # Options taking several values swallow the key=value overrides that follow them.
    for option in ("names", "transfer", "compare"):
        values = getattr(args, option) or []
        kept = [v for v in values if not ("=" in v and not Path(v).exists())]
        overrides += [v for v in values if v not in kept]
        setattr(args, option, kept if (kept or option != "names") else None)
    if not checkpoints and not args.compare:
        raise UserInputError("give a checkpoint to evaluate, or --compare EVAL_JSON ... to compare runs")
    if overrides and not checkpoints:
        raise UserInputError(f"overrides {overrides} need a checkpoint to evaluate; --compare only reads results")
    total = len(checkpoints) + len(args.compare)
    if args.names is not None and len(args.names) != total:
        raise UserInputError(f"--names gives {len(args.names)} names for {total} runs; give one per run "
                             "(checkpoints first, then --compare files)")
    from sasi_online.eval.checkpoint_loader import resolve_checkpoint_file, run_folder
    from sasi_online.eval.report import load_eval, write_report
    from sasi_online.eval.suite import evaluate_checkpoint

    names = list(args.names) if args.names else [None] * total
    single = len(checkpoints) == 1 and not args.compare
    evals, used = [], set()
    for ckpt, name in zip(checkpoints, names):
        file = resolve_checkpoint_file(ckpt)
        name = name or run_folder(file).name
        if name in used:  # two tags of one run: keep their outputs apart
            name = f"{name}-{len(used) + 1}"
        used.add(name)
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"  # "w/ SASI" -> w_SASI
        if args.out is None:
            out = run_folder(file) / "eval" if single else Path("runs/eval") / folder
        else:
            out = Path(args.out) if single else Path(args.out) / folder
        print(f"evaluating {file} → {out}")
        evals.append(evaluate_checkpoint(file, out, overrides, args.transfer, run_name=name))
    for path in args.compare:
        evals.append(load_eval(path))
    final_names = [str(e.get("run") or f"run{i + 1}") if i < len(checkpoints) or not n else n
                   for i, (n, e) in enumerate(zip(names, evals))]
    report_dir = Path(args.out) if args.out else (
        Path(evals[0]["_path"]).parent if single else Path("runs/eval"))
    report = write_report(evals, report_dir, final_names)
    print(report.read_text(encoding="utf-8").split("\n## Runs")[0].strip())
    print(f"\nreport: {report}")
    return 0
