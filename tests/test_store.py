"""The SASI store: layout, manifest versions, crash recovery, ENOSPC, and generation into it."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sasi_online.commands import generate as generate_cmd
from sasi_online.data.store import MANIFEST, SasiStore, StoreMismatchError
from sasi_online.errors import UserInputError
from sasi_online.utils import DiskFullError, atomic_write_bytes

DATASET = {"name": "toy", "split": "train", "size": 10}
MODELS = {"sd21": "abc"}
SETTINGS = {"steps": 4}


def _img(value: int) -> np.ndarray:
    a = np.zeros((8, 8, 3), np.uint8)
    a[..., 0] = value
    a[0, 0] = (1, 2, 3)
    return a


def _new(root: Path, **kw) -> SasiStore:
    return SasiStore.create(root, dataset=kw.get("dataset", DATASET), models=kw.get("models", MODELS),
                            settings=kw.get("settings", SETTINGS),
                            allow_new_settings=kw.get("allow_new_settings", False))


def _manifest_lines(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / MANIFEST).read_text().splitlines()]


def test_layout_random_access_and_latest_version_wins(tmp_path):
    root = tmp_path / "store"
    with _new(root) as store:
        store.add(_img(10), index=3, variant=0, relpath="train/a/000003", caption="c", rewrite="r",
                  vp_kind="image", seed=7)
        store.add(_img(20), index=3, variant=1, relpath="train/a/000003", vp_kind="image", seed=8)
        store.add(None, index=4, variant=0, relpath="train/b/000004", vp_kind="image", seed=9)  # failed
        store.update(3, 1, similarity=0.3, fishy=True)
        assert store.next_variant(3) == 2 and store.next_variant(5) == 0
        with pytest.raises(UserInputError, match="already in store"):
            store.add(_img(1), index=3, variant=0, relpath="train/a/000003")
    assert (root / "train/a/000003/v0.png").is_file() and (root / "train/a/000003/v1.png").is_file()
    assert not (root / "train/b/000004").exists()  # a failed SASI never becomes a file

    store = SasiStore.open(root)
    assert np.array_equal(np.asarray(store.get(3, 0)), _img(10))
    assert store.get(4, 0) is None and store.get(9, 0) is None
    assert [r.variant for r in store.variants(3)] == [0, 1]
    assert store.variants(4) == [] and store.variants(4, include_failed=True)[0].failed
    assert store.is_fishy(3, 1) and not store.is_fishy(3, 0)
    assert store.usable_variants(3) == [0]
    rec = store.record(3, 1)
    assert (rec.similarity, rec.seed, rec.vp_kind) == (0.3, 8, "image")  # update kept older fields
    assert [r.key for r in store.iter_records()] == [(3, 0), (3, 1)]
    with pytest.raises(UserInputError, match="read-only"):
        store.update(3, 0, fishy=True)
    (root / "train/a/000003/v1.png").unlink()  # damaged from outside: a clear error, not a traceback
    with pytest.raises(UserInputError, match=r"SASI \(3, 1\).*v1.png"):
        store.get(3, 1)


def test_reopen_checks_dataset_and_settings(tmp_path):
    root = tmp_path / "store"
    _new(root).close()
    with pytest.raises(StoreMismatchError, match="made for dataset"):
        _new(root, dataset={**DATASET, "size": 11})
    with pytest.raises(StoreMismatchError, match="steps differ.*--allow-new-settings"):
        _new(root, settings={"steps": 8})
    with pytest.raises(StoreMismatchError, match="model files"):
        _new(root, models={"sd21": "zzz"})
    _new(root, settings={"steps": 8}, allow_new_settings=True).close()
    header = json.loads((root / "store.json").read_text())
    assert len(header["settings_history"]) == 2 and header["settings"] == {"steps": 8}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UserInputError, match="not a SASI store"):
        _new(tmp_path / "other")
    with pytest.raises(UserInputError, match="not a SASI store"):  # a file, not a folder
        _new(tmp_path / "other" / "x.txt")
    with pytest.raises(UserInputError, match="no store.json"):
        SasiStore.open(tmp_path / "nothing")


def test_partial_manifest_line_and_orphan_files_are_recovered(tmp_path):
    root = tmp_path / "store"
    store = _new(root)
    store.add(_img(1), index=0, variant=0, relpath="t/0")
    # what a kill leaves: a half-written line, an image without its line, a temp file
    with open(root / MANIFEST, "ab") as fh:
        fh.write(b'{"index": 1, "variant": 0, "fi')
    (root / "t/1").mkdir(parents=True)
    Image.fromarray(_img(99)).save(root / "t/1/v0.png")
    (root / "t/1/.v1.png.abc.tmp").write_bytes(b"half")
    os.close(store._mark_fd)  # the writer died: the kernel drops its lock, the mark file stays

    reader = SasiStore.open(root)  # a reader ignores the partial line and touches nothing
    assert len(reader) == 1 and (1, 0) not in reader
    store = _new(root)  # a writer truncates it and sweeps temp files
    assert (root / MANIFEST).read_bytes().endswith(b"\n")
    assert not (root / "t/1/.v1.png.abc.tmp").exists()
    store.add(_img(5), index=1, variant=0, relpath="t/1")  # the orphan is redone
    store.close()
    again = SasiStore.open(root)
    assert np.array_equal(np.asarray(again.get(1, 0)), _img(5))
    assert [(r["index"], r["variant"]) for r in _manifest_lines(root)] == [(0, 0), (1, 0)]


def test_disk_full_stops_cleanly_and_the_store_stays_consistent(tmp_path):
    root = tmp_path / "store"
    store = _new(root)
    store.add(_img(1), index=0, variant=0, relpath="t/0")

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    store.write_bytes = full_disk  # fault injection into the store's own writer
    with pytest.raises(DiskFullError, match="run the same command again"):
        store.add(_img(2), index=1, variant=0, relpath="t/1")
    store.write_bytes = atomic_write_bytes

    def half_then_full(fd, blob):  # the manifest append fills the disk halfway through a line
        os.write(fd, blob[: len(blob) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    size = (root / MANIFEST).stat().st_size
    store.append_bytes = half_then_full
    with pytest.raises(DiskFullError, match="manifest.jsonl"):
        store.add(_img(3), index=2, variant=0, relpath="t/2")
    assert (root / MANIFEST).stat().st_size == size  # the half line was cut back
    store.close()
    again = SasiStore.open(root)
    assert [r.key for r in again.iter_records()] == [(0, 0)]
    assert all(again.get(*r.key) is not None for r in again.iter_records())


# ----------------------------------------------------------------------------- generation
def _cli_args(store: Path, zoo: Path, *extra: str) -> list[str]:
    return ["--store", str(store), "--models", str(zoo), "--text", "class_name", "--steps", "2",
            "--resolution", "64", "--no-progress", *extra]


def _cfg_and_args(argv: list[str]):
    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    return generate_cmd.build_config(args), args


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("v*.png")}


def test_img2img_settings_without_a_step_are_refused_before_the_store_exists(tmp_path):
    from sasi_online.generation.offline import generate_store

    cfg, _ = _cfg_and_args(_cli_args(tmp_path / "s", tmp_path / "no-zoo", "--steps", "1", "--strength", "0.8"))
    with pytest.raises(UserInputError, match="steps x strength >= 1"):
        generate_store(cfg, tmp_path / "s", kind="mix", limit=1, progress=False)
    # nothing recorded: rerunning with fixed settings is not refused as "other settings"
    assert not (tmp_path / "s" / "store.json").exists()


def test_generate_fills_store_deterministically_and_resumes(tiny_zoo, tmp_path):
    from sasi_online.generation.offline import generate_store

    cfg, _ = _cfg_and_args(_cli_args(tmp_path / "a", tiny_zoo, "--batch-size", "3"))
    s1 = generate_store(cfg, tmp_path / "a", kind="image", variants=2, limit=3, progress=False)
    assert (s1.generated, s1.failed, s1.skipped_existing) == (6, 0, 0)
    store = SasiStore.open(tmp_path / "a")
    assert sorted(r.key for r in store.iter_records()) == [(i, v) for i in range(3) for v in range(2)]
    assert store.get(0, 0).size == (64, 64)
    assert (tmp_path / "a" / "reports" / "grid.png").is_file()
    timing = json.loads((tmp_path / "a" / "reports" / "timing.json").read_text())
    assert timing["generated"] == 6 and {"denoise", "decode", "write"} <= set(timing["seconds"])
    # same command again: nothing to do; one more image: only it is generated
    assert generate_store(cfg, tmp_path / "a", kind="image", variants=2, limit=3, progress=False).generated == 0
    s3 = generate_store(cfg, tmp_path / "a", kind="image", variants=2, limit=4, progress=False)
    assert (s3.generated, s3.skipped_existing) == (2, 6)
    # another batch size, same seeds: the same bytes (per-image generators)
    cfg_b, _ = _cfg_and_args(_cli_args(tmp_path / "b", tiny_zoo, "--batch-size", "1"))
    generate_store(cfg_b, tmp_path / "b", kind="image", variants=2, limit=4, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:  # batched vs single forwards differ in float rounding only
        pa = np.asarray(Image.open(tmp_path / "a" / k), dtype=int)
        pb = np.asarray(Image.open(tmp_path / "b" / k), dtype=int)
        assert np.abs(pa - pb).max() <= 2


def test_direct_kind_and_failed_images(tiny_zoo, tmp_path):
    from sasi_online.generation import SASIGenerator
    from sasi_online.generation.offline import generate_store

    cfg, _ = _cfg_and_args(_cli_args(tmp_path / "d", tiny_zoo))
    generate_store(cfg, tmp_path / "d", kind="direct", variants=2, limit=1, progress=False)
    recs = SasiStore.open(tmp_path / "d").variants(0)
    assert [r.vp_kind for r in recs] == ["direct", "direct"]
    assert recs[0].rewrite == recs[1].rewrite and recs[0].seed != recs[1].seed
    im = [np.asarray(SasiStore.open(tmp_path / "d").get(0, v), dtype=int) for v in (0, 1)]
    assert np.abs(im[0] - im[1]).mean() > 2  # different seeds, different images

    def always_nan(backend):
        return lambda sample, t, states, down=None, mid=None: backend(sample, t, states, down, mid) * float("nan")

    cfg.generation.max_retries = 1
    gen = SASIGenerator.from_config(cfg.models, cfg.generation, backend_hook=always_nan)
    s = generate_store(cfg, tmp_path / "f", kind="noise", variants=1, limit=2, progress=False, generator=gen)
    assert (s.generated, s.failed) == (0, 2)
    store = SasiStore.open(tmp_path / "f")
    assert store.variants(0) == [] and store.record(0, 0).failed and store.record(0, 0).retries == 1
    assert not list((tmp_path / "f").rglob("*.png"))
    # failed SASI count as done: a rerun does not loop on them
    assert generate_store(cfg, tmp_path / "f", kind="noise", variants=1, limit=2, progress=False,
                          generator=gen).skipped_existing == 2


def test_disk_full_during_generate_stops_with_message(tiny_zoo, tmp_path, monkeypatch, capsys):
    import sasi_online.data.store as store_mod
    from sasi_online.cli import main

    real_write = store_mod.atomic_write_bytes
    calls = {"n": 0}

    def fills_up(path, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", fills_up)
    root = tmp_path / "s"
    argv = ["generate", *_cli_args(root, tiny_zoo, "--vp-kind", "noise", "--limit", "6")]
    assert main(argv) == 3
    assert "no space left" in capsys.readouterr().err
    store = SasiStore.open(root)
    assert len(store) == 3 and all(store.get(*r.key) is not None for r in store.iter_records())
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real_write)
    assert main(argv) == 0  # space freed: the same command finishes the job
    assert sorted(r.key for r in SasiStore.open(root).iter_records()) == [(i, 0) for i in range(6)]


def test_kill_9_mid_run_then_rerun_leaves_every_sasi_exactly_once(tiny_zoo, tmp_path):
    from sasi_online.generation.offline import generate_store

    root = tmp_path / "killed"
    argv = _cli_args(root, tiny_zoo, "--vp-kind", "image", "--variants", "2", "--limit", "8",
                     "--batch-size", "1", "--steps", "4")
    cmd = [sys.executable, "-m", "sasi_online.cli", "generate", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = root / MANIFEST
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = manifest.read_bytes().count(b"\n")
    assert 3 <= done_before < 16

    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    lines = _manifest_lines(root)
    keys = [(r["index"], r["variant"]) for r in lines]
    assert sorted(keys) == [(i, v) for i in range(8) for v in range(2)]  # each exactly once
    assert not list(root.rglob("*.tmp"))
    # nothing corrupt: every file decodes, and matches an uninterrupted run byte for byte
    cfg, _ = _cfg_and_args(argv)
    generate_store(cfg, tmp_path / "clean", kind="image", variants=2, limit=8, progress=False)
    killed, clean = _files(root), _files(tmp_path / "clean")
    assert killed.keys() == clean.keys() and all(killed[k] == clean[k] for k in clean)
    for rel in killed:
        with Image.open(root / rel) as im:
            im.load()


def test_generate_with_captioner_rewriter_and_segmenter(tiny_zoo, tmp_path):
    """The paper's path: BLIP-2 caption → LLM rewrite → mask map → ControlNet generation."""
    from sasi_online.generation.offline import generate_store

    root = tmp_path / "paper"
    cfg, _ = _cfg_and_args(["--store", str(root), "--models", str(tiny_zoo), "--text", "model",
                            "--steps", "2", "--no-progress", "semantics.variants=2"])
    s = generate_store(cfg, root, kind="mask", variants=2, limit=2, progress=False)
    assert s.generated == 4 and s.seconds["captions"] > 0 and s.seconds["rewrites"] > 0
    store = SasiStore.open(root)
    recs = store.variants(0)
    assert [r.vp_kind for r in recs] == ["mask", "mask"]
    assert all(r.caption and r.rewrite for r in recs) and recs[0].caption == recs[1].caption
    assert (root / "captions.jsonl").is_file()  # captions are computed once per image
    header = json.loads((root / "store.json").read_text())
    assert {"sd15", "controlnet-sd15-seg", "upernet", "blip2", "llama"} <= set(header["models"])
