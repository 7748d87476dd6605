"""The SASI store: one browsable image file per SASI plus an append-only manifest.

Layout::

    <store>/store.json          header: dataset (name, split, size), model hashes, settings
    <store>/manifest.jsonl      one JSON record per line, appended, never rewritten
    <store>/<relpath>/v<N>.png  SASI number N of the dataset image at <relpath>

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
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from sasi_online.errors import CorruptImageError, UserInputError
from sasi_online.utils import DiskFullError, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

STORE_FORMAT = 1
HEADER, MANIFEST, WRITING_MARK = "store.json", "manifest.jsonl", ".writing"
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
        self._records: dict[tuple[int, int], Record] = {}
        self._by_index: dict[int, list[int]] = {}
        self._offset = 0  # bytes of the manifest already read
        self.refresh()

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
        self._mark_fd = os.open(self.root / WRITING_MARK, os.O_RDWR | os.O_CREAT, 0o644)
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
            try:  # the last writer out removes the mark: a clean shutdown
                fcntl.flock(self._mark_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                (self.root / WRITING_MARK).unlink(missing_ok=True)
            except BlockingIOError:
                pass
            os.close(self._mark_fd)
            self.writable = False

    def __enter__(self) -> "SasiStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
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
        count = 0
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                self._apply(json.loads(line))
                count += 1
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("store %s: skipping an unreadable manifest line (%s)", self.root, exc)
        self._offset += end
        return count

    def _apply(self, obj: dict) -> None:
        key = (int(obj["index"]), int(obj["variant"]))
        rec = self._records.get(key)
        if rec is None:
            rec = Record(index=key[0], variant=key[1])
            self._records[key] = rec
            self._by_index.setdefault(key[0], []).append(key[1])
        for name, value in obj.items():
            if name in _RECORD_FIELDS:
                setattr(rec, name, value)
            else:
                rec.extra[name] = value

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return (int(key[0]), int(key[1])) in self._records

    def record(self, index: int, variant: int) -> Optional[Record]:
        return self._records.get((int(index), int(variant)))

    def variants(self, index: int, include_failed: bool = False) -> list[Record]:
        """Records of image `index`, by variant; only those with an image unless `include_failed`."""
        recs = [self._records[(int(index), v)] for v in sorted(self._by_index.get(int(index), []))]
        return recs if include_failed else [r for r in recs if not r.failed]

    def usable_variants(self, index: int) -> list[int]:
        """Variant numbers of image `index` that have an image and are not flagged fishy."""
        return [r.variant for r in self.variants(index) if not r.fishy]

    def iter_records(self, include_failed: bool = False) -> Iterator[Record]:
        """Every SASI's latest record, in the order they were first written."""
        for rec in list(self._records.values()):
            if include_failed or not rec.failed:
                yield rec

    def is_fishy(self, index: int, variant: int) -> bool:
        rec = self.record(index, variant)
        return bool(rec and rec.fishy)

    def next_variant(self, index: int) -> int:
        """The first free variant number of image `index` (online runs keep adding)."""
        taken = self._by_index.get(int(index), [])
        return max(taken) + 1 if taken else 0

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
        if (int(index), int(variant)) in self._records:
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
        return self._records[(int(index), int(variant))]

    def update(self, index: int, variant: int, **fields_: Any) -> None:
        """Append a new version of a record (e.g. similarity, fishy); the latest wins."""
        self.update_many([(index, variant, fields_)])

    def update_many(self, changes: list[tuple[int, int, dict]]) -> None:
        self._require_writable()
        lines = []
        for index, variant, values in changes:
            if (int(index), int(variant)) not in self._records:
                raise UserInputError(f"SASI ({index}, {variant}) is not in store '{self.root}'")
            lines.append({"index": int(index), "variant": int(variant), **values})
        self._append(lines)

    def _append(self, lines: list[dict]) -> None:
        """Append whole lines under a lock, then fsync; on any write error cut back to the
        previous end, so the manifest never keeps half a line from this writer."""
        manifest = self.root / MANIFEST
        blob = "".join(json.dumps(x, sort_keys=True, default=_jsonable) + "\n" for x in lines).encode()
        fd = os.open(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        self.refresh()

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
