"""A table's finished runs, in the paper's layout, with the paper's numbers beside ours.

Each run's `sasi eval` result is RUNS_ROOT/<run id>/eval/eval.json (top-1 of the
linear probe and of kNN). A run that has not finished shows "—"; a run whose eval.json
says it was trained with another method, pair mode or dataset than the table's config
is flagged, as is the linear protocol used when it is not the paper's SGD one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sasi_online.paper.tables import Run, Table


@dataclass
class Collected:
    table: Table
    values: dict  # (row, column) -> our top-1 or None
    missing: list = field(default_factory=list)  # run ids without a complete eval.json
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"table": self.table.number, "caption": self.table.caption, "missing": self.missing,
                "notes": self.notes,
                "cells": [{"row": r, "column": c, "run": self.table.cells[(r, c)][0].id,
                           "metric": self.table.cells[(r, c)][1], "ours": v,
                           "paper": self.table.rows[r][self.table.columns.index(c)]}
                          for (r, c), v in self.values.items()]}


def eval_path(runs_root: str | Path, run: Run) -> Path:
    return Path(runs_root) / run.id / "eval" / "eval.json"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("complete") else None


def _check(run: Run, data: dict, runs_root: str) -> list[str]:
    """Differences between what the run's eval.json records and what its config trains."""
    from sasi_online.config import load_config

    cfg = load_config(run.config, run.overrides(str(runs_root)))
    want = {"method": cfg.method.name, "pair_mode": cfg.train.pair_mode, "dataset": cfg.data.name}
    notes = [f"run {run.id}: eval.json says {k} '{data.get(k)}', the table's config trains '{v}'"
             for k, v in want.items() if data.get(k) is not None and str(data.get(k)) != str(v)]
    protocol = (data.get("results", {}).get("linear") or {}).get("protocol", "lbfgs")
    if protocol != "sgd":
        notes.append(f"run {run.id}: linear top-1 from the fast L-BFGS probe; the paper's protocol is "
                     "eval.linear=sgd (`sasi eval RUN/checkpoints eval.linear=sgd`)")
    return notes


def collect(table: Table, runs_root: str | Path) -> Collected:
    results: dict = {}
    out = Collected(table, {})
    for run in table.runs:
        data = _read(eval_path(runs_root, run))
        results[run.id] = data
        if data is None:
            out.missing.append(run.id)
        else:
            out.notes += _check(run, data, str(runs_root))
    for (row, col), (run, metric) in table.cells.items():
        data = results[run.id]
        top1 = ((data or {}).get("results", {}).get(metric) or {}).get("top1")
        out.values[(row, col)] = None if top1 is None else float(top1)
    return out


def _cell(ours: float | None, paper: float) -> str:
    return f"{'—' if ours is None else f'{ours:.1f}'} ({paper:.1f})"


def markdown(c: Collected, runs_root: str | Path) -> str:
    t = c.table
    lines = [f"## {t.caption}", "", "Top-1 accuracy (%): ours (the paper's).", "",
             "| | " + " | ".join(t.columns) + " |", "|---|" + "---:|" * len(t.columns)]
    for row, paper in t.rows.items():
        lines.append(f"| {row} | " + " | ".join(_cell(c.values[(row, col)], p)
                                                for col, p in zip(t.columns, paper)) + " |")
    if t.note:
        lines += ["", f"Note: {t.note}"]
    if c.missing:
        lines += ["", f"Not finished ({len(c.missing)} of {len(t.runs)} runs; no complete "
                      f"{runs_root}/RUN/eval/eval.json): " + ", ".join(c.missing)
                  + f". `sasi reproduce {t.number}` writes the script that makes them."]
    lines += [""] + [f"- {n}" for n in c.notes]
    return "\n".join(lines).rstrip() + "\n"
