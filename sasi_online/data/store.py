"""The SASI store: one browsable image file per SASI plus an append-only manifest.

Layout::

    <store>/store.json          header: dataset (name, split, size), model hashes, settings
    <store>/manifest.jsonl      one JSON record per line, appended, never rewritten (the log)
    <store>/manifest.index      the log's records as memory-mapped columns (store_index.py)
    <store>/<relpath>/v<N>.png  SASI number N of the dataset image at <relpath>
    <store>/<top>/metadata.jsonl  Hugging Face ImageFolder metadata of the SASI under <top>/
    <store>/reports/            grid.png, timing.json, similarity_hist.png, filter.json

Opening reads the index (milliseconds, a few MB, shared by DataLoader workers through
the page cache) and only the manifest lines written after it. A missing or stale index
(the manifest replaced, or an old store) is rebuilt from the manifest. Writers keep it
current: they fold new lines in as they go and on close, and then rewrite the
metadata.jsonl files, so `datasets.load_dataset("imagefolder", data_dir=STORE)` opens
the store (columns: image, label, index, variant, caption, rewrite, vp_kind, seed, ...).

Read API (training picks a random non-fishy variant per image)::

    store = SasiStore.open("sasi-store")
    store.variants(12)          # [Record(index=12, variant=0, ...), ...] with an image
    store.get(12, 0)            # PIL image, or None if absent / failed
    store.is_fishy(12, 0)       # flagged by `sasi filter`: readers skip it
    for rec in store.iter_records(): ...

Crash safety: an image is written to a temporary name, fsynced and renamed; only then is
its manifest line appended (flush + fsync). A manifest line therefore always has its
file. On reopen a trailing partial line (a kill mid-append) is ignored, and truncated
by a writer; an image file without a manifest line is simply redone. Variants are
numbered from 0 without an upper bound.

Later facts about a SASI (its CLIP similarity, the fishy flag) are appended as new
versions of its record: for each (index, variant) the latest line wins, field by field.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from sasi_online.errors import CorruptImageError, UserInputError
from sasi_online.utils import DiskFullError, atomic_write_bytes, atomic_write_json

from . import store_hf
from . import store_index as sx

log = logging.getLogger(__name__)

STORE_FORMAT = 1
HEADER, MANIFEST, WRITING_MARK = "store.json", "manifest.jsonl", ".writing"
REPORTS, HF_METADATA = "reports", store_hf.HF_METADATA
# a writer folds its new lines into the index once there are this many (or 1/32 of the store)
INDEX_EVERY = 50_000
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


class StoreMismatchError(UserInputError):
    """An existing store that was made for another dataset, model set or settings."""


@dataclass
class Record:
    """The latest version of one SASI's manifest record."""

    index: int
    variant: int
    relpath: str = ""
    file: Optional[str] = None  # relative to the store root; None when generation failed
    caption: str = ""
    rewrite: str = ""
    vp_kind: str = ""
    seed: int = 0
    settings: str = ""  # hash of the generation settings that made it
    retries: int = 0
    failed: bool = False  # non-finite after every retry: no image was written
    fishy: bool = False  # CLIP similarity under the filter threshold
    similarity: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return (self.index, self.variant)


_RECORD_FIELDS = {f.name for f in fields(Record)}


def settings_hash(settings: dict) -> str:
    """A short stable hash of a settings mapping (order-independent)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _disk_full(what: Path) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device while writing '{what}'. The store is consistent: "
        f"free some space and run the same command again; it resumes where it stopped.")


class SasiStore:
    """A SASI store folder. `open` reads; `create` (or `open(..., writable=True)`) appends."""

    def __init__(self, root: Path, header: dict, writable: bool, image_format: str = "png"):
        self.root = Path(root)
        self.header = header
        self.writable = writable
        if image_format not in IMAGE_FORMATS:
            raise UserInputError(f"store.image_format='{image_format}' is not known; "
                                 f"use one of {', '.join(IMAGE_FORMATS)}")
        self.image_format = image_format
        # the two writers, injectable for fault tests (ENOSPC): image files, manifest appends
        self.write_bytes = atomic_write_bytes
        self.append_bytes = _write_all
        self._open_index()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> "SasiStore":
        """Open an existing store (read-only unless `writable`)."""
        root = Path(path)
        head = root / HEADER
        if not head.is_file():
            raise UserInputError(f"'{root}' is not a SASI store (no {HEADER}); "
                                 f"create one with `sasi generate --store {root}`")
        try:
            header = json.loads(head.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UserInputError(f"'{head}' is not valid JSON ({exc}); the store header is damaged") from exc
        if header.get("format") != STORE_FORMAT:
            raise UserInputError(f"'{root}' has store format {header.get('format')}, this version "
                                 f"reads format {STORE_FORMAT}")
        store = cls(root, header, writable, header.get("image_format", "png"))
        if writable:
            store._recover()
        return store

    @classmethod
    def create(cls, path: str | Path, dataset: dict, models: dict, settings: dict,
               image_format: str = "png", allow_new_settings: bool = False) -> "SasiStore":
        """Open `path` for appending, creating it if needed.

        An existing store must have been made for the same dataset (name, split, size):
        anything else is refused. Different models or settings are refused too, unless
        `allow_new_settings`, which records them beside the old ones (each record keeps
        the hash of the settings that made it).
        """
        root = Path(path)
        wanted = {"format": STORE_FORMAT, "dataset": dataset, "models": models, "settings": settings,
                  "settings_hash": settings_hash({"models": models, "settings": settings}),
                  "image_format": image_format}
        if not (root / HEADER).is_file():
            if root.exists() and (not root.is_dir() or any(p.name != WRITING_MARK for p in root.iterdir())):
                raise UserInputError(f"'{root}' exists and is not a SASI store; choose a new or empty folder")
            root.mkdir(parents=True, exist_ok=True)
            wanted["settings_history"] = [wanted["settings_hash"]]
            atomic_write_json(root / HEADER, wanted)
            return cls.open(root, writable=True)
        store = cls.open(root, writable=True)
        try:
            store._check_and_update_header(dataset, models, settings, wanted, allow_new_settings)
        except Exception:
            store.close()
            raise
        return store

    def _check_and_update_header(self, dataset: dict, models: dict, settings: dict, wanted: dict,
                                 allow_new_settings: bool) -> None:
        root, have = self.root, self.header
        if have.get("dataset") != dataset:
            raise StoreMismatchError(
                f"store '{root}' was made for dataset {have.get('dataset')}, not {dataset}. "
                f"Use another --store folder for this dataset (or the same data.* settings as before).")
        if have.get("settings_hash") != wanted["settings_hash"]:
            changed = _changed_keys(have.get("settings", {}), settings)
            if have.get("models") != models:
                changed.append("model files")
            if not allow_new_settings:
                raise StoreMismatchError(
                    f"store '{root}' was made with other generation settings ({', '.join(changed)} differ). "
                    f"Use a new --store folder, the old settings, or --allow-new-settings to add "
                    f"SASI made with the new ones beside the old.")
            history = list(have.get("settings_history", [have.get("settings_hash")]))
            if wanted["settings_hash"] not in history:
                history.append(wanted["settings_hash"])
            have.update(models=models, settings=settings, settings_hash=wanted["settings_hash"],
                        settings_history=history)
            atomic_write_json(root / HEADER, have)

    def _recover(self) -> None:
        """After a crash: cut a partial last manifest line, drop orphan temporary files."""
        manifest = self.root / MANIFEST
        if manifest.is_file():
            with open(manifest, "r+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # no other writer is mid-append while we look
                self.refresh()
                if os.fstat(fh.fileno()).st_size > self._offset:
                    log.warning("store %s: dropping a partial manifest line left by an interrupted run",
                                self.root)
                    fh.truncate(self._offset)
                    os.fsync(fh.fileno())
        # Every live writer holds a shared lock on the mark file. Getting it exclusively
        # means no other writer is alive, so temporary files are leftovers of a dead one.
        mark_existed = (self.root / WRITING_MARK).exists()
        self._mark_fd = os.open(self.root / WRITING_MARK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._mark_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if mark_existed:  # the last writer did not close cleanly
                for tmp in self.root.rglob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
        except BlockingIOError:
            pass  # another writer is running: leave its files alone
        fcntl.flock(self._mark_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.writable:
            try:  # both are derived from the manifest: a failure here loses nothing
                self.refresh()
                if self._dirty or not store_hf.existing_files(self.root):
                    self.write_hf_metadata()
            except OSError as exc:
                log.warning("store %s: index or metadata.jsonl not updated on close (%s); the next "
                            "open rebuilds the index, the next writer the metadata", self.root, exc)
            try:  # the last writer out removes the mark: a clean shutdown
                fcntl.flock(self._mark_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (self.root / WRITING_MARK).unlink(missing_ok=True)
            except BlockingIOError:
                pass
            os.close(self._mark_fd)
            self.writable = False
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SasiStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _open_index(self) -> None:
        """Map the index (building it when missing or stale), then read the lines after it."""
        manifest, path = self.root / MANIFEST, self.root / sx.INDEX_FILE
        snap = sx.ManifestIndex.load(path, manifest)
        if snap is None:
            snap, _ = sx.build(manifest, self.root)
            if snap.n:
                log.info("store %s: index of %d records built from the manifest", self.root, snap.n)
                self._save_index(snap)
        self._snap = snap
        self._kinds = list(snap.kinds)
        # the overlay: records with manifest lines after the index (new ones, or new versions)
        self._records: dict[tuple[int, int], Record] = {}
        self._new: dict[tuple[int, int], None] = {}  # keys not in the index, first-write order
        self._new_by_index: dict[int, list[int]] = {}
        self._tail = sx.LineTable()
        self._offset = snap.covered  # bytes of the manifest already read
        self._fd: Optional[int] = None
        self._dirty = False  # this writer appended lines
        self.refresh()

    def _save_index(self, snap: "sx.ManifestIndex") -> None:
        try:
            snap.save(self.root / sx.INDEX_FILE, self.root / MANIFEST)
        except OSError as exc:  # a read-only folder: the index lives in this process only
            log.info("store %s: index not saved (%s)", self.root, exc)

    def flush_index(self) -> None:
        """Fold the lines read since the index was written into a new index file."""
        if len(self._tail) == 0:
            return
        snap = sx.merge(self._snap, self._tail, self._kinds, self._offset)
        self._save_index(snap)
        self._snap, self._kinds = snap, list(snap.kinds)
        self._records, self._new, self._new_by_index, self._tail = {}, {}, {}, sx.LineTable()

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) map the index again
        state = dict(self.__dict__)
        state.update(_fd=None, _snap=None, _snap_covered=self._snap.covered)
        state.pop("_mark_fd", None)
        state["writable"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        covered = state.pop("_snap_covered")
        self.__dict__.update(state)
        snap = sx.ManifestIndex.load(self.root / sx.INDEX_FILE, self.root / MANIFEST)
        if snap is None or snap.covered != covered:  # the overlay belongs to another index
            self._open_index()
        else:
            self._snap = snap

    def refresh(self) -> int:
        """Read manifest lines appended since the last read (another writer may be running).

        Returns how many complete lines were read. A trailing line without its newline is
        an append in progress (or cut by a crash) and is left for later.
        """
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            return 0
        with open(manifest, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        table, objs = sx.LineTable(), []
        count = sx.parse_lines(data[:end], self._offset, table, self._kinds, self.root, keep=objs)
        for k, obj in enumerate(objs):
            self._apply(table, k, obj)
        self._offset += end
        return count

    def _apply(self, table: "sx.LineTable", k: int, obj: dict) -> None:
        """Fold line k of `table` (a tail line) into the overlay and the tail table."""
        key = (table.index[k], table.variant[k])
        rec = self._records.get(key)
        if rec is None:
            rid = self._snap.find(*key)
            rec = self._materialise(rid) if rid >= 0 else Record(index=key[0], variant=key[1])
            self._records[key] = rec
            if rid < 0:
                self._new[key] = None
                self._new_by_index.setdefault(key[0], []).append(key[1])
        self._apply_fields(rec, obj)
        for name in ("off", "length", "index", "variant", "failed", "fishy", "kind"):
            getattr(self._tail, name).append(getattr(table, name)[k])

    @staticmethod
    def _apply_fields(rec: Record, obj: dict) -> None:
        for name, value in obj.items():
            if name in _RECORD_FIELDS:
                setattr(rec, name, value)
            else:
                rec.extra[name] = value

    def _read_line(self, off: int, length: int) -> dict:
        if self._fd is None:
            self._fd = os.open(self.root / MANIFEST, os.O_RDONLY)
        return json.loads(os.pread(self._fd, length, off))

    def _materialise(self, rid: int) -> Record:
        """A record of the index, read back from its manifest lines (latest version last)."""
        a = self._snap.a
        return self._from_lines(int(a["rec_index"][rid]), int(a["rec_variant"][rid]), self._snap.lines_of(rid))

    def _from_lines(self, index: int, variant: int, lines: Iterable[tuple[int, int]]) -> Record:
        merged: dict = {}
        for off, length in lines:
            merged.update(self._read_line(off, length))
        known = {k: v for k, v in merged.items() if k in _RECORD_FIELDS and k != "extra"}
        extra = {k: v for k, v in merged.items() if k not in known}
        return Record(**{**known, "index": index, "variant": variant}, extra=extra)

    def __len__(self) -> int:
        return self._snap.n + len(self._new)

    def __contains__(self, key: tuple[int, int]) -> bool:
        k = (int(key[0]), int(key[1]))
        return k in self._records or self._snap.find(*k) >= 0

    def record(self, index: int, variant: int) -> Optional[Record]:
        key = (int(index), int(variant))
        rec = self._records.get(key)
        if rec is not None:
            return rec
        rid = self._snap.find(*key)
        return self._materialise(rid) if rid >= 0 else None

    def variant_table(self, index: int) -> list[tuple[int, str, bool, bool]]:
        """(variant, vp_kind, failed, fishy) of each SASI of image `index`, by variant, from the
        index alone (no manifest read): the training path's per-sample lookup."""
        index = int(index)
        a, kinds = self._snap.a, self._snap.kinds
        rids = self._snap.records_of(index)
        flags = a["rec_flags"][rids].tolist()
        rows = [(v, kinds[k] if k >= 0 else "", bool(f & sx.FLAG_FAILED), bool(f & sx.FLAG_FISHY))
                for v, k, f in zip(a["rec_variant"][rids].tolist(), a["rec_kind"][rids].tolist(), flags)]
        if self._records:  # the overlay's versions win; its new records join
            newer = [(v, self._records[(index, v)]) for v in [r[0] for r in rows] + self._new_by_index.get(index, [])
                     if (index, v) in self._records]
            rows = [r for r in rows if (index, r[0]) not in self._records]
            rows += [(v, rec.vp_kind, bool(rec.failed), bool(rec.fishy)) for v, rec in newer]
            rows.sort()
        return rows

    def variants(self, index: int, include_failed: bool = False) -> list[Record]:
        """Records of image `index`, by variant; only those with an image unless `include_failed`."""
        rows = self.variant_table(index)
        return [self.record(index, v) for v, _, failed, _ in rows if include_failed or not failed]

    def usable_variants(self, index: int) -> list[int]:
        """Variant numbers of image `index` that have an image and are not flagged fishy."""
        return [v for v, _, failed, fishy in self.variant_table(index) if not failed and not fishy]

    def iter_records(self, include_failed: bool = False) -> Iterator[Record]:
        """Every SASI's latest record, in the order they were first written."""
        a, chunk = self._snap.a, 4096
        for r0 in range(0, self._snap.n, chunk):  # the index's columns a chunk at a time
            r1 = min(r0 + chunk, self._snap.n)
            starts = a["rec_line_start"][r0:r1 + 1].tolist()
            offs = a["line_off"][starts[0]:starts[-1]].tolist()
            lens = a["line_len"][starts[0]:starts[-1]].tolist()
            rows = zip(a["rec_index"][r0:r1].tolist(), a["rec_variant"][r0:r1].tolist(),
                       a["rec_flags"][r0:r1].tolist(), starts[:-1], starts[1:])
            for index, variant, flags, s, e in rows:
                rec = self._records.get((index, variant))
                if rec is None:
                    if not include_failed and flags & sx.FLAG_FAILED:
                        continue
                    k = s - starts[0]
                    rec = self._from_lines(index, variant, zip(offs[k:k + e - s], lens[k:k + e - s]))
                if include_failed or not rec.failed:
                    yield rec
        for key in list(self._new):
            rec = self._records[key]
            if include_failed or not rec.failed:
                yield rec

    def is_fishy(self, index: int, variant: int) -> bool:
        rec = self._records.get((int(index), int(variant)))
        if rec is not None:
            return bool(rec.fishy)
        rid = self._snap.find(int(index), int(variant))
        return rid >= 0 and bool(self._snap.a["rec_flags"][rid] & sx.FLAG_FISHY)

    def next_variant(self, index: int) -> int:
        """The first free variant number of image `index` (online runs keep adding)."""
        taken = [v for v, *_ in self.variant_table(index)]
        return max(taken) + 1 if taken else 0

    def reports_dir(self) -> Path:
        """Where commands put their reports about this store (grid, timing, histogram)."""
        return self.root / REPORTS

    # ------------------------------------------------------------------ Hugging Face view
    def write_hf_metadata(self) -> list[Path]:
        """Bring the metadata.jsonl files (Hugging Face ImageFolder) up to date: store_hf.py."""
        self.flush_index()
        return store_hf.write_metadata(self, self._snap)

    def record_by_id(self, rid: int) -> Record:
        """Record number `rid` of the index (first-write order), latest version."""
        a = self._snap.a
        rec = self._records.get((int(a["rec_index"][rid]), int(a["rec_variant"][rid])))
        return rec if rec is not None else self._materialise(rid)

    def path_for(self, relpath: str, variant: int) -> Path:
        return self.root / relpath / f"v{int(variant)}.{self.image_format}"

    def get(self, index: int, variant: int) -> Optional[Image.Image]:
        """The SASI image, or None when it was never made or its generation failed."""
        rec = self.record(index, variant)
        if rec is None or rec.failed or not rec.file:
            return None
        path = self.root / rec.file
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # the manifest promises this file: it was deleted or damaged after it was written
            err = CorruptImageError(
                f"SASI ({index}, {variant}) of store '{self.root}': '{path}' cannot be read ({exc}). "
                f"Restore the file (a store's files are never deleted by sasi), or generate into a new --store folder.")
            err.path = str(path)
            raise err from exc

    # ------------------------------------------------------------------ writing
    def add(self, image: Optional[np.ndarray], *, index: int, variant: int, relpath: str,
            **fields_: Any) -> Record:
        """Write one SASI (or, with `image=None`, a failed one) and then its manifest line."""
        self._require_writable()
        if (int(index), int(variant)) in self:
            raise UserInputError(f"SASI ({index}, {variant}) is already in store '{self.root}'")
        unknown = set(fields_) - _RECORD_FIELDS
        if unknown:
            raise TypeError(f"unknown record fields: {sorted(unknown)}")
        line = {"index": int(index), "variant": int(variant), "relpath": relpath, **fields_}
        if image is None:
            line.update(file=None, failed=True)
        else:
            path = self.path_for(relpath, variant)
            buf = io.BytesIO()
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=IMAGE_FORMATS[self.image_format])
            try:
                self.write_bytes(path, buf.getvalue())
            except DiskFullError:
                raise
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise _disk_full(path) from exc
                raise
            line.update(file=path.relative_to(self.root).as_posix(), failed=False)
        self._append([line])
        return self.record(index, variant)

    def update(self, index: int, variant: int, **fields_: Any) -> None:
        """Append a new version of a record (e.g. similarity, fishy); the latest wins."""
        self.update_many([(index, variant, fields_)])

    def update_many(self, changes: list[tuple[int, int, dict]]) -> None:
        self._require_writable()
        lines = []
        for index, variant, values in changes:
            if (int(index), int(variant)) not in self:
                raise UserInputError(f"SASI ({index}, {variant}) is not in store '{self.root}'")
            lines.append({"index": int(index), "variant": int(variant), **values})
        self._append(lines)

    def _append(self, lines: list[dict]) -> None:
        """Append whole lines under a lock, then fsync; on any write error cut back to the
        previous end, so the manifest never keeps half a line from this writer."""
        manifest = self.root / MANIFEST
        blob = "".join(json.dumps(x, sort_keys=True, default=_jsonable) + "\n" for x in lines).encode()
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # several producers may share one store
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                self.append_bytes(fd, blob)
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)
                if exc.errno == errno.ENOSPC:
                    raise _disk_full(manifest) from exc
                raise
        finally:
            os.close(fd)  # closing releases the lock
        self._dirty = True
        self.refresh()
        if len(self._tail) >= max(INDEX_EVERY, self._snap.n // 32):  # bounds the overlay, amortises the merge
            self.flush_index()

    def _require_writable(self) -> None:
        if not self.writable:
            raise UserInputError(f"store '{self.root}' is open read-only")


def _write_all(fd: int, blob: bytes) -> None:
    view = memoryview(blob)
    while view:
        view = view[os.write(fd, view):]


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix or "settings"] if old != new else []
    out = []
    for k in sorted(set(old) | set(new)):
        out += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


__all__ = ["SasiStore", "Record", "StoreMismatchError", "settings_hash", "STORE_FORMAT"]
