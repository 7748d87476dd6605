"""A SASI store seen as a Hugging Face ImageFolder: its metadata.jsonl files.

`datasets.load_dataset("imagefolder", data_dir=STORE)` reads, for each split folder it
finds (the store mirrors the dataset's tree, so the SASI files lie under `<split>/`), the
metadata.jsonl in it: one row per SASI with a file, `file_name` relative to that folder,
`label` (the real image's class, from its folder `<label>_<name>`; -1 when unlabeled)
and the record's fields. Fishy SASI are listed, flagged.

Writers bring the files up to date on close. When every manifest line since the last
write belongs to a SASI written since then (generation, online producers), the new rows
are appended (a copy of the old file plus the rows, renamed over it: no half-written
file); when a line changed an older SASI (`sasi filter`), the files are written anew.
`.hf_metadata.json` says how much of the manifest they reflect.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from sasi_online.utils import atomic_write_bytes, atomic_write_json

from . import store_index as sx

HF_METADATA, STATE = "metadata.jsonl", ".hf_metadata.json"


def label_of(relpath: str) -> int:
    """The class label in a dataset relpath `<split>/<label>_<name>/<index>` (-1 if none)."""
    parts = relpath.split("/")
    head = parts[-2].split("_", 1)[0] if len(parts) >= 2 else ""
    return int(head) if head.isdigit() else -1


def _row(rec: Any) -> tuple[str, str]:
    """(folder, JSON line) of a record with a file."""
    top, _, rest = rec.file.partition("/")
    folder, name = (top, rest) if rest else ("", top)
    row = {"file_name": name, "label": label_of(rec.relpath), "index": rec.index, "variant": rec.variant,
           "caption": rec.caption, "rewrite": rec.rewrite, "vp_kind": rec.vp_kind, "seed": rec.seed,
           "settings": rec.settings, "retries": rec.retries, "fishy": bool(rec.fishy),
           "similarity": None if rec.similarity is None else float(rec.similarity)}
    return folder, json.dumps(row, default=str)


def _grouped(records: Iterable[Any]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rec in records:
        if rec.file and not rec.failed:
            folder, line = _row(rec)
            groups.setdefault(folder, []).append(line)
    return groups


def existing_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"*/{HF_METADATA}")) + [p for p in (root / HF_METADATA,) if p.exists()]


def _appendable(store: Any, snap: "sx.ManifestIndex") -> Optional[np.ndarray]:
    """Record ids written since the files were, if nothing older changed; else None."""
    try:
        state = json.loads((store.root / STATE).read_text())
        covered = int(state["covered"])
        if not 0 < covered <= snap.covered or state["check"] != sx.span_check(store.root / "manifest.jsonl", covered):
            return None
        if sorted(state["files"]) != sorted(str(p.relative_to(store.root)) for p in existing_files(store.root)):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    a = snap.a
    line_rid = np.repeat(np.arange(snap.n), np.diff(a["rec_line_start"]))
    rids = np.unique(line_rid[a["line_off"] >= covered])
    if (a["line_off"][a["rec_line_start"][rids]] < covered).any():
        return None  # a new version of a SASI already listed
    return rids


def write_metadata(store: Any, snap: "sx.ManifestIndex") -> list[Path]:
    """Bring the metadata.jsonl files up to date with `snap`, which covers the whole manifest."""
    rids = _appendable(store, snap)
    if rids is None:
        groups, append = _grouped(store.iter_records()), False
    else:
        groups, append = _grouped(store.record_by_id(int(r)) for r in rids), True
    written = []
    for folder, rows in groups.items():
        path = store.root / folder / HF_METADATA
        old = path.read_bytes() if append and path.exists() else b""
        atomic_write_bytes(path, old + ("\n".join(rows) + "\n").encode())
        written.append(path)
    files = [str(p.relative_to(store.root)) for p in existing_files(store.root)]
    if snap.covered:
        atomic_write_json(store.root / STATE, {"covered": snap.covered, "files": files,
                                               "check": sx.span_check(store.root / "manifest.jsonl", snap.covered)})
    return written
