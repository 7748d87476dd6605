"""The science bench: its statistics on numbers worked out here by other means, and a
two-step run of every arm (base, offline SASI, online co-located) on the tiny zoo."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image
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
    arms = _bench().plan_arms(sweep=True, per_image=[1, 3], pair_modes=["mix"])
    names = [a.name for a in arms]
    assert names == ["random features", "base", "SASI image 0.5", "SASI mix", "positive control", "VAE control",
                     "online", "SASI image 0.75", "SASI image 0.9", "SASI mask", "SASI text-to-image", "SASI ×3",
                     "SASI pair=mix"]
    assert [a.name for a in arms if a.seeds == "main"] == ["base", "SASI image 0.5"]  # --seeds seeds
    assert [a.name for a in arms if a.seeds == "power"] == ["positive control"]  # --power-seeds
    assert len({a.slug for a in arms}) == len(arms) and all(" " not in a.slug for a in arms)


def test_same_class_partners_are_other_images_of_the_class():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from science_controls import same_class_partners

    labels = np.array([0, 1, 0, 2, 1, 0, 1, 0])
    p = same_class_partners(labels, seed=3)
    assert (labels[p] == labels).all()
    assert p[3] == 3  # class 2 has one image: its own partner
    assert all(p[i] != i for i in range(len(labels)) if i != 3)
    assert (same_class_partners(labels, seed=3) == p).all()
    assert any((same_class_partners(labels, seed=s) != p).any() for s in range(4, 10))  # the seed matters


def test_power_says_whether_the_positive_control_is_above_zero():
    bench = _bench()

    def summary(low, high):
        return {"positive control": {"knn": {"vs_base": {"mean": (low + high) / 2, "low": low, "high": high}}},
                bench.DEFAULT_SASI: {"knn": {"vs_base": {"mean": 0.0, "low": -1.5, "high": 2.0}}},
                "base": {"knn": {"mean": 80.0}}, "random features": {"knn": {"mean": 70.0}}}
    yes, no = bench.power(summary(0.5, 3.0)), bench.power(summary(-0.5, 3.0))
    assert yes["has_power"] and not no["has_power"]
    assert yes["sasi_knn_interval_width"] == pytest.approx(3.5) and yes["base_above_random_features_knn"]
    assert "NO POWER" in bench._power_line({"power": no}) and "NO POWER" not in bench._power_line({"power": yes})


def test_two_step_run_of_every_arm_then_resume(tmp_path, tiny_zoo, capsys):
    bench = _bench()
    argv = ["--out", str(tmp_path), "--zoo", str(tiny_zoo), "--steps", "2", "--seeds", "2", "--power-seeds", "1", "--control-seeds", "1",
            "--limit", "32", "--test-split", "embedded", "--jobs", "0", "--pair-modes", "mix", "train.batch_size=16",
            "method.queue_size=32", "data.image_size=16", "generation.batch_size=8", "online.start_sasi=8"]
    results = bench.main(argv)
    saved = json.loads((tmp_path / "science.json").read_text())
    arms = {"random features", "base", "SASI image 0.5", "SASI mix", "positive control", "VAE control", "online",
            "SASI pair=mix"}
    assert set(saved["per_seed"]) == arms
    for arm, runs in saved["per_seed"].items():
        assert sorted(runs) == (["0", "1"] if arm in ("base", "SASI image 0.5") else ["0"]), arm
        run = runs["0"]
        assert run["steps"] == (0 if arm == "random features" else 2), arm
        assert 0.0 <= run["knn"] <= 100.0 and 0.0 <= run["linear"] <= 100.0
    for slug in ("base", "SASI_image_0.5", "SASI_mix", "positive_control", "VAE_control", "online", "SASI_pair-mix"):
        ev = json.loads((tmp_path / "runs" / f"{slug}_s0" / "eval" / "eval.json").read_text())
        assert ev["results"]["knn"]["k"] == 20 and ev["results"]["knn"]["center"] is True, slug
    for arm in ("SASI image 0.5", "SASI mix", "positive control", "VAE control"):
        assert saved["per_seed"][arm]["0"]["sasi_pair_rate"] == 1.0, arm  # every image has its partner
    assert 0.0 < saved["per_seed"]["online"]["0"]["sasi_pair_rate"] <= 1.0
    assert sorted(saved["stores"]) == ["control_same_class_s0", "control_vae_s0", "store_image_0.5_x1_s0",
                                       "store_image_0.5_x1_s1", "store_mix_0.5_x1_s0"]  # pair=mix reads image's
    assert all(st["generated"] == 32 for st in saved["stores"].values())
    assert saved["pixels"]["knn"] > 0 and saved["pixels"]["test_size"] == 32  # the raw-pixel baseline
    row = results["summary"]["SASI image 0.5"]["knn"]
    assert row["vs_base"]["diffs"] == [saved["per_seed"]["SASI image 0.5"][s]["knn"] - saved["per_seed"]["base"][s]["knn"]
                                       for s in ("0", "1")]
    assert row["vs_base"]["low"] is not None  # two paired seeds: an interval
    assert saved["power"]["positive_control_knn"]["mean"] == pytest.approx(
        saved["per_seed"]["positive control"]["0"]["knn"] - saved["per_seed"]["base"]["0"]["knn"])
    assert (tmp_path / "science.png").stat().st_size > 0
    md = (tmp_path / "science.md").read_text()
    assert "| online | 1 |" in md and "| raw pixels |" in md and "Power:" in md

    # a rerun finds every job finished and runs none of them
    stamp = (tmp_path / "runs" / "online_s0" / "result.json").stat().st_mtime_ns
    capsys.readouterr()
    again = bench.main(argv)
    assert "16 jobs, 16 already finished, 0 to run" in capsys.readouterr().out
    assert (tmp_path / "runs" / "online_s0" / "result.json").stat().st_mtime_ns == stamp
    assert again["summary"] == results["summary"]

    # other settings: those jobs run again, in a clean folder
    changed = list(argv)
    changed[changed.index("--steps") + 1] = "3"
    capsys.readouterr()
    third = bench.main([*changed, "--arms", "base"])
    assert "3 jobs, 1 already finished, 2 to run" in capsys.readouterr().out  # pixels: no training steps
    assert third["per_seed"]["base"][0]["steps"] == 3


def test_the_control_stores_hold_a_real_partner_and_a_vae_round_trip(tmp_path, tiny_zoo):
    from sasi_online.config import load_config
    from sasi_online.data.datasets import build_dataset
    from sasi_online.data.store import SasiStore

    bench = _bench()
    from science_controls import build_control_store

    cfg = load_config(bench.CONFIG, [f"models.root={tiny_zoo}", "data.limit=12"])
    ds = build_dataset(cfg.data)
    for control in ("same_class", "vae"):
        assert build_control_store(cfg, tmp_path / control, control, seed=0, progress=False)["generated"] == 12
        assert build_control_store(cfg, tmp_path / control, control, seed=0, progress=False)["generated"] == 0
    with SasiStore.open(tmp_path / "same_class") as st:
        rec = st.record(4, 0)
        partner = int(rec.caption.split()[2])
        assert partner != 4 and partner < 12 and ds[partner].label == ds[4].label
        want = np.asarray(ds[partner].image.resize((64, 64), Image.BICUBIC))
        assert np.array_equal(np.asarray(st.get(4, 0)), want)
    with SasiStore.open(tmp_path / "vae") as st:
        got = np.asarray(st.get(4, 0)).astype(float)
        real = np.asarray(ds[4].image.resize((64, 64), Image.BICUBIC)).astype(float)
        assert got.shape == (64, 64, 3) and not np.array_equal(got, real)  # the VAE changed it
