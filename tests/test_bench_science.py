"""The science bench: its statistics on numbers worked out here by other means, and a
two-step run of every arm (base, offline SASI, online co-located) on the tiny zoo."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from sasi_online.eval.stats import mean_std, paired_interval, t_quantile


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_science.py"
    spec = importlib.util.spec_from_file_location("bench_science", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_science"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_mean_and_sample_std_on_known_numbers():
    mean, std = mean_std([70.0, 72.0, 77.0])
    assert mean == pytest.approx(73.0)
    # by hand: squared deviations 9 + 1 + 16 = 26 over n - 1 = 2
    assert std == pytest.approx(math.sqrt(13.0))
    values = [81.2, 79.4, 80.0, 82.6]
    assert mean_std(values) == pytest.approx((statistics.fmean(values), statistics.stdev(values)))
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_interval_on_known_numbers():
    arm, base = [72.0, 75.0, 74.0], [70.0, 71.0, 73.0]  # differences 2, 4, 1
    d = paired_interval(arm, base)
    assert d["diffs"] == [2.0, 4.0, 1.0]
    assert d["mean"] == pytest.approx(7.0 / 3.0)
    sd = math.sqrt(((2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2 + (1 - 7 / 3) ** 2) / 2)  # = sqrt(7/3)
    assert d["std"] == pytest.approx(sd)
    # Student's t, 2 dof, 97.5 % quantile: 4.302652729911275 (printed tables: 4.303)
    half = 4.302652729911275 * sd / math.sqrt(3)
    assert d["low"] == pytest.approx(7 / 3 - half, abs=1e-9)
    assert d["high"] == pytest.approx(7 / 3 + half, abs=1e-9)
    assert d["low"] < 0 < d["high"]  # three seeds this spread do not exclude zero
    one = paired_interval([1.0], [0.5])
    assert one["mean"] == 0.5 and one["low"] is None
    with pytest.raises(ValueError):
        paired_interval([1.0, 2.0], [1.0])


def test_t_table_without_scipy_matches_scipy(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = {dof: float(scipy_stats.t.ppf(0.975, dof)) for dof in (1, 2, 3, 4, 9, 19, 30)}
    assert t_quantile(2) == pytest.approx(expected[2], abs=1e-12)
    monkeypatch.setitem(sys.modules, "scipy", None)  # `from scipy.stats import t` now raises ImportError
    for dof, value in expected.items():
        assert t_quantile(dof) == pytest.approx(value, abs=1e-3)
    assert t_quantile(22) >= float(scipy_stats.t.ppf(0.975, 22))  # between rows: the conservative one
    with pytest.raises(ValueError):
        t_quantile(0)


def test_arms_vary_one_factor_and_drop_duplicates():
    arms = _bench().plan_arms("image", vp_kinds=["image", "mask", "mix"], per_image=[1, 3], pair_modes=["mix"])
    names = [a.name for a in arms]
    assert names == ["untrained", "base", "offline", "online", "offline vp=mask", "offline vp=mix", "offline ×3",
                     "offline pair=mix"]
    assert len({a.slug for a in arms}) == len(arms) and all(" " not in a.slug for a in arms)


def test_two_step_run_of_every_arm_then_resume(tmp_path, tiny_zoo, capsys):
    bench = _bench()
    argv = ["--out", str(tmp_path), "--zoo", str(tiny_zoo), "--steps", "2", "--seeds", "1", "--limit", "32",
            "--jobs", "0", "--pair-modes", "mix", "train.batch_size=16", "method.queue_size=32", "data.image_size=16",
            "generation.batch_size=8", "online.start_sasi=8"]
    results = bench.main(argv)
    saved = json.loads((tmp_path / "science.json").read_text())
    assert set(saved["per_seed"]) == {"untrained", "base", "offline", "online", "offline pair=mix"}
    for arm, runs in saved["per_seed"].items():
        run = runs["0"]
        assert run["steps"] == (1 if arm == "untrained" else 2), arm
        assert 0.0 <= run["knn"] <= 100.0 and 0.0 <= run["linear"] <= 100.0
    for slug in ("untrained", "base", "offline", "online", "offline_pair-mix"):
        assert (tmp_path / "runs" / f"{slug}_s0" / "eval" / "eval.json").is_file()
    assert saved["per_seed"]["offline"]["0"]["sasi_pair_rate"] == 1.0  # every image has its SASI
    assert 0.0 < saved["per_seed"]["online"]["0"]["sasi_pair_rate"] <= 1.0
    assert list(saved["stores"]) == ["store_image_x1_s0"]  # both offline arms read one store
    assert saved["stores"]["store_image_x1_s0"]["generated"] == 32
    row = results["summary"]["offline"]["knn"]
    assert row["vs_base"]["diffs"] == [saved["per_seed"]["offline"]["0"]["knn"] - saved["per_seed"]["base"]["0"]["knn"]]
    assert (tmp_path / "science.png").stat().st_size > 0
    assert "| online | 1 |" in (tmp_path / "science.md").read_text()

    # a rerun finds every job finished and runs none of them
    stamp = (tmp_path / "runs" / "online_s0" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    again = bench.main(argv)
    assert "6 jobs, 6 already finished, 0 to run" in capsys.readouterr().out
    assert (tmp_path / "runs" / "online_s0" / "result.json").stat().st_mtime_ns == stamp
    assert again["summary"] == results["summary"]

    # other settings: that job runs again, in a clean folder
    changed = [a if a != "2" else "3" for a in argv] + ["--arms", "base"]
    capsys.readouterr()
    third = bench.main(changed)
    assert "1 jobs, 0 already finished, 1 to run" in capsys.readouterr().out
    assert third["per_seed"]["base"][0]["steps"] == 3
