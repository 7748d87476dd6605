"""The SASI store's index: the manifest's records as memory-mapped numpy columns.

The append-only manifest stays the log; this index lets a store with millions of SASI
open in milliseconds and little memory, and lets DataLoader workers share it (the
page cache holds one copy of the mapped file for every process). One file,
`manifest.index`: a JSON header, then 64-byte aligned arrays.

- records, in first-write order: image index, variant, flags (failed, fishy), VP kind
  code, and where their manifest lines are (offset and length of each version: a full
  record is read back from the manifest on demand, latest version last);
- image index -> its records sorted by variant (CSR: `img_start`, `img_recs`).

The header records how many manifest bytes the index covers and a hash of the bytes at
both ends of that span: an index whose manifest has been replaced or cut is stale and
rebuilt. Lines after the covered span are read by the store on open (its overlay) and
folded in by the writer (`merge`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

INDEX_FILE = "manifest.index"
INDEX_VERSION = 1
MAGIC = b"SASIIDX1"
FLAG_FAILED, FLAG_FISHY = 1, 2
_UNSET = object()
_ALIGN = 64
_CHUNK = 4 << 20  # bytes of manifest parsed at a time while building (its records: ~4x that)
# (name, dtype) of the stored columns
_COLUMNS = (("rec_index", "<i8"), ("rec_variant", "<i8"), ("rec_flags", "u1"), ("rec_kind", "<i2"),
            ("rec_line_start", "<i8"), ("line_off", "<i8"), ("line_len", "<i4"),
            ("img_start", "<i8"), ("img_recs", "<i8"))


def _key(index: np.ndarray, variant: np.ndarray) -> np.ndarray:
    return (index.astype(np.int64) << 32) | variant.astype(np.int64)


@dataclass
class LineTable:
    """Manifest lines as columns: where each is and the fields the index keeps."""

    off: list = field(default_factory=list)
    length: list = field(default_factory=list)
    index: list = field(default_factory=list)
    variant: list = field(default_factory=list)
    # per field: value, or -1 when the line does not set it (kind: code into `kinds`)
    failed: list = field(default_factory=list)
    fishy: list = field(default_factory=list)
    kind: list = field(default_factory=list)

    def add(self, obj: dict, off: int, length: int, kinds: list[str]) -> None:
        self.add_many([(off, length, obj)], kinds)

    def add_many(self, items: list, kinds: list[str], where: Any = "", keep: Optional[list] = None) -> int:
        """Add (offset, length, record) items; records without a valid key are skipped."""
        a_off, a_len, a_idx, a_var = self.off.append, self.length.append, self.index.append, self.variant.append
        a_fail, a_fish, a_kind = self.failed.append, self.fishy.append, self.kind.append
        codes = {k: c for c, k in enumerate(kinds)}
        count = 0
        for off, length, obj in items:
            i, v = (obj.get("index"), obj.get("variant")) if type(obj) is dict else (None, None)
            if type(i) is not int or type(v) is not int or i < 0 or v < 0:
                log.warning("store %s: skipping an unreadable manifest line at byte %d", where, off)
                continue
            f, s, k = obj.get("failed", _UNSET), obj.get("fishy", _UNSET), obj.get("vp_kind", _UNSET)
            if k is not _UNSET:
                k = str(k or "")
                if k not in codes:
                    codes[k] = len(kinds)
                    kinds.append(k)
            a_off(off)
            a_len(length)
            a_idx(i)
            a_var(v)
            a_fail(-1 if f is _UNSET else int(bool(f)))
            a_fish(-1 if s is _UNSET else int(bool(s)))
            a_kind(-1 if k is _UNSET else codes[k])
            if keep is not None:
                keep.append(obj)
            count += 1
        return count

    def __len__(self) -> int:
        return len(self.off)

    def arrays(self) -> dict[str, np.ndarray]:
        types = {"off": np.int64, "length": np.int32, "index": np.int64, "variant": np.int64,
                 "failed": np.int8, "fishy": np.int8, "kind": np.int16}
        return {k: np.asarray(getattr(self, k), t) for k, t in types.items()}


def parse_lines(data: bytes, base: int, table: LineTable, kinds: list[str], where: Any = "",
                keep: Optional[list] = None) -> int:
    """Add the complete lines of `data` (starting at manifest byte `base`) to `table`; the
    parsed records go to `keep` too when given."""
    lines = data.split(b"\n")[:-1]  # the last piece has no newline: not a complete line
    starts = np.concatenate([[0], np.cumsum([len(x) + 1 for x in lines])])[:-1] + base if lines else []
    kept = [(int(s), x) for s, x in zip(starts, lines) if x.strip()]
    try:  # one call for many lines; a bad line sends the chunk down the careful path
        objs = json.loads(b"[" + b",".join(x for _, x in kept) + b"]")
        if len(objs) != len(kept):
            raise ValueError("a line held more than one value")
    except ValueError:
        objs = [_loads_or_none(x) for _, x in kept]
    return table.add_many([(start, len(line), obj) for (start, line), obj in zip(kept, objs)], kinds, where, keep)


def _loads_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def span_check(manifest: Path, covered: int) -> str:
    """A hash of the first and last 4 KiB of the covered span of the manifest."""
    h = hashlib.sha256(str(covered).encode())
    with open(manifest, "rb") as fh:
        h.update(fh.read(min(4096, covered)))
        fh.seek(max(0, covered - 4096))
        h.update(fh.read(covered - max(0, covered - 4096)))
    return h.hexdigest()[:32]


class ManifestIndex:
    """A read-only snapshot of the manifest's records up to byte `covered`."""

    def __init__(self, arrays: dict[str, np.ndarray], covered: int, kinds: list[str]):
        self.a = arrays
        self.covered = covered
        self.kinds = list(kinds)
        self.n = int(arrays["rec_index"].size)
        self._keys_sorted: Optional[np.ndarray] = None

    @classmethod
    def empty(cls) -> "ManifestIndex":
        arrays = {name: np.zeros(1 if name in ("rec_line_start", "img_start") else 0, dt) for name, dt in _COLUMNS}
        return cls(arrays, 0, [""])

    # ------------------------------------------------------------------ lookups
    def records_of(self, index: int) -> np.ndarray:
        """Record ids of image `index`, by variant."""
        start = self.a["img_start"]
        if not 0 <= index < start.size - 1:
            return np.empty(0, np.int64)
        return self.a["img_recs"][int(start[index]):int(start[index + 1])]

    def find(self, index: int, variant: int) -> int:
        rids = self.records_of(index)
        if rids.size:
            hit = np.flatnonzero(self.a["rec_variant"][rids] == variant)
            if hit.size:
                return int(rids[hit[0]])
        return -1

    def keys_sorted(self) -> np.ndarray:
        if self._keys_sorted is None:
            recs = self.a["img_recs"]
            self._keys_sorted = _key(self.a["rec_index"][recs], self.a["rec_variant"][recs])
        return self._keys_sorted

    def find_many(self, keys: np.ndarray) -> np.ndarray:
        """Record id of each packed (index, variant) key, -1 where absent."""
        sk = self.keys_sorted()
        if sk.size == 0:
            return np.full(keys.size, -1, np.int64)
        pos = np.minimum(np.searchsorted(sk, keys), sk.size - 1)
        return np.where(sk[pos] == keys, self.a["img_recs"][pos], -1)

    def lines_of(self, rid: int) -> list[tuple[int, int]]:
        s, e = int(self.a["rec_line_start"][rid]), int(self.a["rec_line_start"][rid + 1])
        return list(zip(self.a["line_off"][s:e].tolist(), self.a["line_len"][s:e].tolist()))

    def kind(self, rid: int) -> str:
        code = int(self.a["rec_kind"][rid])
        return self.kinds[code] if code >= 0 else ""

    # ------------------------------------------------------------------ files
    def save(self, path: Path, manifest: Path) -> None:
        """Write atomically (a temporary file renamed over the old index)."""
        header: dict = {"version": INDEX_VERSION, "covered": self.covered, "kinds": self.kinds,
                        "check": span_check(manifest, self.covered) if self.covered else "", "arrays": {}}
        offset = 0
        for name, dt in _COLUMNS:
            arr = np.ascontiguousarray(self.a[name], dtype=dt)
            header["arrays"][name] = {"dtype": dt, "size": int(arr.size), "offset": offset}
            offset += -(-arr.nbytes // _ALIGN) * _ALIGN
        blob = json.dumps(header).encode()
        start = -(-(len(MAGIC) + 8 + len(blob)) // _ALIGN) * _ALIGN
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            for name, dt in _COLUMNS:
                fh.seek(start + header["arrays"][name]["offset"])
                fh.write(np.ascontiguousarray(self.a[name], dtype=dt).tobytes())
            fh.truncate(start + offset)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, manifest: Path) -> Optional["ManifestIndex"]:
        """The index at `path` mapped read-only, or None when missing, damaged or stale."""
        try:
            with open(path, "rb") as fh:
                if fh.read(len(MAGIC)) != MAGIC:
                    return None
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            size = os.path.getsize(path)
            covered = int(header["covered"])
            if header.get("version") != INDEX_VERSION or covered > (manifest.stat().st_size if manifest.exists() else 0):
                return None
            if covered and header["check"] != span_check(manifest, covered):
                return None
            start = -(-(len(MAGIC) + 8 + n) // _ALIGN) * _ALIGN
            arrays = {}
            for name, dt in _COLUMNS:
                spec = header["arrays"][name]
                if spec["size"] == 0:
                    arrays[name] = np.zeros(0, dt)
                    continue
                if start + spec["offset"] + spec["size"] * np.dtype(dt).itemsize > size:
                    return None
                mapped = np.memmap(path, dtype=dt, mode="r", offset=start + spec["offset"], shape=(spec["size"],))
                arrays[name] = mapped.view(np.ndarray)  # plain arrays index faster; the map stays open
            return cls(arrays, covered, header["kinds"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def build(manifest: Path, where: Any = "") -> tuple[ManifestIndex, int]:
    """Parse the whole manifest (in chunks) into an index; returns it and the bytes covered."""
    kinds: list[str] = [""]
    parts: list[dict] = []  # each chunk's lines as arrays: memory stays near the index's size
    covered = 0
    if manifest.is_file():
        with open(manifest, "rb") as fh:
            rest = b""
            while True:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                data = rest + chunk
                end = data.rfind(b"\n") + 1
                table = LineTable()
                parse_lines(data[:end], covered, table, kinds, where)
                parts.append(table.arrays())
                covered += end
                rest = data[end:]
    lines = LineTable().arrays()
    for k in list(lines):  # one column at a time, dropping the chunks' copy as it goes
        lines[k] = np.concatenate([p.pop(k) for p in parts]) if parts else lines[k]
    return merge(ManifestIndex.empty(), lines, kinds, covered), covered


def merge(snap: ManifestIndex, lines: "LineTable | dict", kinds: list[str], covered: int) -> ManifestIndex:
    """A new index: `snap` plus `lines` (manifest lines after it, in file order; a LineTable
    or its `arrays()`)."""
    t = lines.arrays() if isinstance(lines, LineTable) else lines
    r0 = snap.n
    keys = _key(t["index"], t["variant"])
    rid = snap.find_many(keys)
    new = rid < 0
    uniq, first, inverse = np.unique(keys[new], return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # new records in first-write order
    rank = np.empty(uniq.size, np.int64)
    rank[order] = np.arange(uniq.size)
    rid[new] = r0 + rank[inverse.reshape(-1)]
    new_keys = uniq[order]
    n = r0 + new_keys.size
    a = snap.a
    rec_index = np.concatenate([a["rec_index"], new_keys >> 32])
    rec_variant = np.concatenate([a["rec_variant"], new_keys & 0xFFFFFFFF])
    flags = np.concatenate([a["rec_flags"], np.zeros(new_keys.size, np.uint8)]).astype(np.int64)
    kind = np.concatenate([a["rec_kind"], np.zeros(new_keys.size, np.int16)]).astype(np.int64)
    for name, bit in (("failed", FLAG_FAILED), ("fishy", FLAG_FISHY)):
        last = _last_setting(t[name], rid, n)
        upd = last >= 0
        flags[upd] = np.where(t[name][last[upd]] > 0, flags[upd] | bit, flags[upd] & ~bit)
    last = _last_setting(t["kind"], rid, n)
    kind[last >= 0] = t["kind"][last[last >= 0]]
    snap_rid = np.repeat(np.arange(r0), np.diff(a["rec_line_start"]))
    all_rid = np.concatenate([snap_rid, rid])
    by_rec = np.argsort(all_rid, kind="stable")  # a record's lines stay in file order
    line_start = np.concatenate([[0], np.cumsum(np.bincount(all_rid, minlength=n))])
    img_recs = np.argsort(_key(rec_index, rec_variant), kind="stable")
    n_img = int(rec_index.max()) + 1 if n else 0
    img_start = np.concatenate([[0], np.cumsum(np.bincount(rec_index, minlength=n_img))])
    arrays = {"rec_index": rec_index, "rec_variant": rec_variant, "rec_flags": flags.astype(np.uint8),
              "rec_kind": kind.astype(np.int16), "rec_line_start": line_start.astype(np.int64),
              "line_off": np.concatenate([a["line_off"], t["off"]])[by_rec],
              "line_len": np.concatenate([a["line_len"], t["length"]])[by_rec].astype(np.int32),
              "img_start": img_start.astype(np.int64), "img_recs": img_recs.astype(np.int64)}
    return ManifestIndex(arrays, covered, kinds)


def _last_setting(values: np.ndarray, rid: np.ndarray, n: int) -> np.ndarray:
    """Per record, the last line (position in `values`) that sets the field, else -1."""
    last = np.full(n, -1, np.int64)
    sel = np.flatnonzero(values >= 0)
    np.maximum.at(last, rid[sel], sel)
    return last
