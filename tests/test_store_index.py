"""The store's index: kept current by writers, rebuilt when missing or stale, shared by
DataLoader workers, and the store seen as a Hugging Face ImageFolder."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import sasi_online.data.store as store_mod
from sasi_online.data.sasi_source import StoreSource
from sasi_online.data.store import HF_METADATA, MANIFEST, SasiStore
from sasi_online.data.store_index import INDEX_FILE

DATASET = {"name": "toy", "split": "train", "size": 40}


def _bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _img(v: int) -> np.ndarray:
    return np.full((4, 4, 3), v, np.uint8)


def _fill(root: Path, n: int = 30, variants: int = 2) -> None:
    with SasiStore.create(root, dataset=DATASET, models={}, settings={}) as store:
        for i in range(n):
            for v in range(variants):
                failed = (i, v) == (3, 1)
                store.add(None if failed else _img(i), index=i, variant=v,
                          relpath=f"train/{i % 3}_c{i % 3}/{i:06d}", caption=f"c{i}", vp_kind=("image", "mask")[v])
        store.update_many([(i, 0, {"similarity": i / n, "fishy": i % 4 == 0}) for i in range(n)])


def _reference(root: Path) -> dict:
    """Every record as the manifest says: the latest line wins, field by field."""
    out: dict = {}
    for line in (root / MANIFEST).read_text().splitlines():
        obj = json.loads(line)
        out.setdefault((obj["index"], obj["variant"]), {}).update(obj)
    return out


def _as_dict(rec) -> dict:
    d = {k: v for k, v in dataclasses.asdict(rec).items() if k != "extra"}
    return {**d, **rec.extra}


def _check_against_manifest(store: SasiStore, root: Path) -> None:
    ref = _reference(root)
    assert len(store) == len(ref)
    got = {r.key: _as_dict(r) for r in store.iter_records(include_failed=True)}
    assert got.keys() == ref.keys()
    for key, fields in ref.items():
        assert {k: got[key][k] for k in fields} == fields
        assert store.is_fishy(*key) == bool(fields.get("fishy"))
    for i in {k[0] for k in ref}:
        want = sorted(v for (j, v), f in ref.items() if j == i and not f.get("failed") and not f.get("fishy"))
        assert store.usable_variants(i) == want


def test_writer_keeps_the_index_current_and_a_reader_reads_no_manifest_line(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    assert (root / INDEX_FILE).is_file()
    store = SasiStore.open(root)
    assert store._offset == (root / MANIFEST).stat().st_size and len(store._tail) == 0  # all from the index
    _check_against_manifest(store, root)
    assert store.record(3, 1).failed and store.get(3, 1) is None and store.next_variant(3) == 2
    assert np.array_equal(np.asarray(store.get(5, 0)), _img(5))
    assert [r.variant for r in store.variants(3, include_failed=True)] == [0, 1]


def test_lines_after_the_index_are_read_and_folded_in(tmp_path, monkeypatch):
    root = tmp_path / "s"
    _fill(root)
    reader = SasiStore.open(root)
    writer = SasiStore.open(root, writable=True)
    writer.add(_img(9), index=35, variant=0, relpath="train/2_c2/000035", vp_kind="noise")
    writer.update(1, 1, fishy=True)  # a new version of a record the index holds
    assert reader.refresh() == 2
    _check_against_manifest(reader, root)
    assert reader.usable_variants(1) == [0] and (35, 0) in reader
    _check_against_manifest(pickle.loads(pickle.dumps(reader)), root)  # a spawned worker's copy
    monkeypatch.setattr(store_mod, "INDEX_EVERY", 3)  # writers fold lines in as they go (or at 1/32)
    covered = reader._snap.covered
    for i in range(8):
        writer.add(_img(i), index=32 + i, variant=1, relpath=f"train/0_c0/{32 + i:06d}")
    fresh = SasiStore.open(root)
    assert fresh._snap.covered > covered and len(fresh._tail) < 8
    _check_against_manifest(fresh, root)
    writer.close()
    _check_against_manifest(SasiStore.open(root), root)


def test_missing_or_stale_index_is_rebuilt(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    (root / INDEX_FILE).unlink()  # a store from before the index existed
    _check_against_manifest(SasiStore.open(root), root)
    assert (root / INDEX_FILE).is_file()
    # another manifest under the same index (a copied or restored store): the span check catches it
    other = tmp_path / "o"
    _fill(other, n=34, variants=1)
    index_bytes = (root / INDEX_FILE).read_bytes()
    os.replace(other / MANIFEST, root / MANIFEST)
    (root / INDEX_FILE).write_bytes(index_bytes)
    _check_against_manifest(SasiStore.open(root), root)
    # a manifest shorter than what the index covers
    (root / INDEX_FILE).write_bytes(index_bytes)
    lines = (root / MANIFEST).read_bytes().splitlines(keepends=True)
    (root / MANIFEST).write_bytes(b"".join(lines[:10]))
    store = SasiStore.open(root)
    assert len(store) == 10
    _check_against_manifest(store, root)
    (root / INDEX_FILE).write_bytes(b"not an index")  # damaged
    _check_against_manifest(SasiStore.open(root), root)


def test_old_store_layout_opens(tmp_path):
    """Manifest only, reports at the top: opens, and a writer adds the index and metadata."""
    root = tmp_path / "old"
    _fill(root)
    for p in [root / INDEX_FILE, *root.glob(f"*/{HF_METADATA}")]:
        p.unlink()
    (root / "grid.png").write_bytes(b"\x89PNG old report")
    store = SasiStore.open(root)
    _check_against_manifest(store, root)
    SasiStore.open(root, writable=True).close()
    assert (root / "train" / HF_METADATA).is_file()


def test_training_source_reads_the_index_only(tmp_path):
    root = tmp_path / "s"
    _fill(root)
    src = StoreSource(SasiStore.open(root))
    hits = src.get([0, 1, 3, 39], np.random.default_rng(0))
    assert [h.outcome for h in hits] == ["hit", "hit", "hit", "missing"]
    assert hits[0].variant == 1 and hits[2].variant == 0  # 0's variant 0 is fishy, 3's variant 1 failed
    assert [h.outcome for h in StoreSource(SasiStore.open(root), vp_kind="mask").get([4], np.random.default_rng(0))] \
        == ["hit"]


class _Lookups(torch.utils.data.Dataset):
    """Each item: open the store in the worker, look up every image, report RSS growth."""

    def __init__(self, root: Path, images: int):
        self.root, self.images = root, images

    def __len__(self) -> int:
        return 2

    def __getitem__(self, k: int):
        import psutil

        proc = psutil.Process()
        before = proc.memory_info().rss
        store = SasiStore.open(self.root)
        src = StoreSource(store)  # what training asks per sample (the synthetic SASI have no files)
        for i in range(self.images):
            usable, _ = src._usable_variants(i)
            store.record(i, usable[0])
        return (proc.memory_info().rss - before) / 2**20, os.getpid()


def test_dataloader_workers_share_the_index(tmp_path):
    bench = _bench("bench_store")
    root = tmp_path / "big"
    images = bench.synthesise(root, 100_000, variants=4)
    manifest_mb = (root / MANIFEST).stat().st_size / 2**20
    SasiStore.open(root)  # builds the index once
    loader = torch.utils.data.DataLoader(_Lookups(root, images), batch_size=None, num_workers=2)
    grown = list(loader)
    assert len({pid for _, pid in grown}) == 2
    # every worker looked up all 25k images: each holds only what it touched of the shared
    # index, not the manifest's records (a full parse held ~1.4 KB per record: ~140 MB here)
    print("RSS growth per worker (MB):", [round(mb, 1) for mb, _ in grown], f"manifest {manifest_mb:.0f} MB")
    for mb, _ in grown:
        assert mb < 30, f"a worker grew by {mb:.0f} MB for a {manifest_mb:.0f} MB manifest"


def test_a_store_opens_as_a_hugging_face_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = tmp_path / "s"
    _fill(root, n=6)
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf-cache"))
    rows = ds["train"]
    assert rows.num_rows == 6 * 2 - 1  # the failed SASI has no file
    store = SasiStore.open(root)
    for row in rows:
        rec = store.record(row["index"], row["variant"])
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(store.get(rec.index, rec.variant)))
        assert row["label"] == rec.index % 3 and row["caption"] == rec.caption and row["fishy"] == rec.fishy


def _metadata_rows(root: Path) -> dict:
    rows = [json.loads(x) for x in (root / "train" / HF_METADATA).read_text().splitlines()]
    keys = [(r["index"], r["variant"]) for r in rows]
    assert len(keys) == len(set(keys))  # one row per SASI
    return dict(zip(keys, rows))


def test_metadata_is_appended_for_new_sasi_and_rewritten_for_changed_ones(tmp_path, monkeypatch):
    root = tmp_path / "s"
    _fill(root, n=6)
    assert len(_metadata_rows(root)) == 11
    full_writes = []
    real_iter = SasiStore.iter_records
    monkeypatch.setattr(SasiStore, "iter_records", lambda self, *a, **k: full_writes.append(1) or real_iter(self, *a, **k))
    with SasiStore.open(root, writable=True) as store:  # new SASI only: rows appended
        store.add(_img(1), index=7, variant=0, relpath="train/1_c1/000007", caption="new")
        store.add(_img(1), index=7, variant=1, relpath="train/1_c1/000007")
        store.update(7, 1, fishy=True)  # a new SASI's own later version is still "new"
    rows = _metadata_rows(root)
    assert not full_writes and len(rows) == 13 and rows[7, 0]["caption"] == "new" and rows[7, 1]["fishy"]
    with SasiStore.open(root, writable=True) as store:  # an older SASI changed: written anew
        store.update(2, 0, fishy=True, similarity=0.1)
    rows = _metadata_rows(root)
    assert full_writes and len(rows) == 13 and rows[2, 0]["fishy"] and rows[2, 0]["similarity"] == 0.1
