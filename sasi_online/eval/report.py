"""Side-by-side report of several evaluated runs (paper Tables 1, 6, 7, 9, 10).

Rows: Linear / KNN / semi-supervised (each label fraction, top-1 and top-5) / transfer
(each dataset, and their average when every run has them all); columns: one per run,
then the difference of each later run from the first (e.g. base vs w/ SASI). Writes
`report.md`, `report.png` (grouped bars) and `report_tsne.png` (the runs' t-SNE pictures side
by side, when they have them). Everything it needs is in the runs' `eval.json` files.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

from sasi_online.errors import UserInputError
from sasi_online.utils import atomic_write_text, save_figure


def load_eval(path: str | Path) -> dict:
    """An `eval.json` written by `sasi eval` (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise UserInputError(f"eval results '{path}' not found; run `sasi eval CHECKPOINT` first, "
                             "it writes OUT/eval.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"eval results '{path}' are not valid JSON ({exc}); re-run `sasi eval`") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserInputError(f"'{path}' is not an eval.json written by `sasi eval` (no 'results' entry)")
    data["_path"] = str(path)
    return data


def _semi_sort_key(label: str) -> tuple:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", label)
    return (0, float(m.group(1)), label) if m else (1, 0.0, label)


def table_rows(runs: Sequence[dict]) -> list[tuple[str, list[float | None]]]:
    """[(row name, [value per run or None])] in the paper's order."""
    def get(run: dict, *keys):
        node = run.get("results", {})
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return float(node) if isinstance(node, (int, float)) else None

    rows = [("Linear", [get(r, "linear", "top1") for r in runs]),
            ("KNN", [get(r, "knn", "top1") for r in runs])]
    semi = sorted({k for r in runs for k in r.get("results", {}).get("semi", {})}, key=_semi_sort_key)
    for label in semi:
        for top in ("top1", "top5"):
            rows.append((f"Semi {label} {top.replace('top', 'top-')}", [get(r, "semi", label, top) for r in runs]))
    transfer = sorted({k for r in runs for k in r.get("results", {}).get("transfer", {})})
    for name in transfer:
        rows.append((f"Transfer {name}", [get(r, "transfer", name, "top1") for r in runs]))
    if len(transfer) > 1:
        avgs = []
        for r in runs:
            vals = [get(r, "transfer", n, "top1") for n in transfer]
            avgs.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
        rows.append(("Transfer avg", avgs))
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def _fmt_rate(rate: float | None) -> str:
    """SASI pairs: the share of training samples paired with a SASI (— for none asked)."""
    return "—" if rate is None else f"{100 * rate:.0f} %"


def _fmt_delta(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    d = b - a
    arrow = "↑" if d > 0 else ("↓" if d < 0 else "")
    return f"{d:+.1f}{arrow}"


def render_markdown(names: Sequence[str], runs: Sequence[dict]) -> str:
    rows = table_rows(runs)
    head = ["Metric (%)", *names] + [f"Δ {n} − {names[0]}" for n in names[1:]]
    lines = ["# Evaluation report", "",
             "Accuracies in percent on the test split; Δ is each run minus the first.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, vals in rows:
        cells = [label, *map(_fmt, vals)] + [_fmt_delta(vals[0], v) for v in vals[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "",
              "| Run | Method | Backbone | Pair mode | SASI pairs | Dataset | kNN k / T | Checkpoint |",
              "|---|---|---|---|---:|---|---|---|"]
    for n, r in zip(names, runs):
        knn = r.get("results", {}).get("knn", {})
        lines.append(f"| {n} | {r.get('method', '—')} | {r.get('backbone', '—')} | {r.get('pair_mode', '—')} "
                     f"| {_fmt_rate(r.get('sasi_pair_rate'))} | {r.get('dataset', '—')} "
                     f"| {knn.get('k', '—')} / {knn.get('t', '—')} | `{r.get('checkpoint', '—')}` |")
    notes = [f"- {n}: incomplete (interrupted evaluation; re-run `sasi eval` to finish)"
             for n, r in zip(names, runs) if not r.get("complete", True)]
    notes += [f"- {n}: **no SASI reached this run** (SASI pairs 0 %): it trained on real views only"
              for n, r in zip(names, runs) if r.get("sasi_pair_rate") == 0]
    if notes:
        lines += ["", *notes]
    lines += ["", "Linear: logistic regression on standardised frozen features. KNN: weighted "
              "k-nearest neighbours (InstDisc). Semi: a linear classifier trained on the labelled "
              "subset only (frozen backbone, no fine-tuning). Transfer: linear probe on another dataset.",
              "", "![accuracy by run](report.png)", ""]
    return "\n".join(lines)


def _bar_chart(names: Sequence[str], runs: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [(k, v) for k, v in table_rows(runs) if "top-5" not in k]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.6))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(rows))
    for j, name in enumerate(names):
        vals = [v[j] if v[j] is not None else 0.0 for _, v in rows]
        bars = ax.bar(x + (j - (len(names) - 1) / 2) * width, vals, width, label=name)
        ax.bar_label(bars, labels=[_fmt(v[j]) for _, v in rows], fontsize=6, padding=1)
    ax.set_xticks(x, [k for k, _ in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _tsne_side_by_side(names: Sequence[str], runs: Sequence[dict], path: Path) -> bool:
    pictures = []
    for n, r in zip(names, runs):
        rel = r.get("tsne")
        if rel and "_path" in r:
            p = Path(r["_path"]).parent / rel
            if p.is_file():
                pictures.append((n, p))
    if not pictures:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pictures), figsize=(4.5 * len(pictures), 4.3), squeeze=False)
    for ax, (n, p) in zip(axes[0], pictures):
        ax.imshow(mpimg.imread(p))
        ax.set_title(n, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def write_report(evals: Sequence[str | Path | dict], out_dir: str | Path,
                 names: Sequence[str] | None = None) -> Path:
    """Compare runs (eval.json paths or loaded dicts) → OUT/report.md (+ PNGs). Returns the .md path."""
    runs = [e if isinstance(e, dict) else load_eval(e) for e in evals]
    if not runs:
        raise UserInputError("nothing to compare: give at least one eval.json")
    if names is None:
        names = [str(r.get("run") or f"run{i + 1}") for i, r in enumerate(runs)]
    names = list(names)
    if len(names) != len(runs):
        raise UserInputError(f"{len(names)} names for {len(runs)} runs; give one --names entry per run")
    # Two runs with one name would make the table ambiguous: number the repeats.
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n} ({seen[n]})"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = render_markdown(names, runs)
    _bar_chart(names, runs, out / "report.png")
    if _tsne_side_by_side(names, runs, out / "report_tsne.png"):
        text += "\n## t-SNE (ten classes of the test split)\n\n![t-SNE by run](report_tsne.png)\n"
    atomic_write_text(out / "report.md", text)
    return out / "report.md"
