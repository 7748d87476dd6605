"""bench/gpu_check.py in --tiny mode (the same phases on a CPU, tiny zoo), its exit status,
resume, and the two GPU configs (they load and validate here; no machine here has the
real weights)."""
import json
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.parametrize("name,trainers,mode", [("online_1gpu", 1, "colocated"), ("online_8gpu", 6, "launched")])
def test_gpu_configs_load_and_validate(name, trainers, mode):
    from sasi_online.config import load_config
    from sasi_online.train import validate

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    validate(cfg, num_trainers=trainers)
    assert cfg.online.mode == mode and cfg.generation.resolution == 512 and cfg.data.image_size == 224
    assert cfg.method.backbone == "resnet50" and cfg.online.producers == (2 if mode == "launched" else 0)


def test_tiny_gpu_check_runs_every_phase_and_resumes(tiny_zoo, tmp_path, capsys):
    import gpu_check

    out = tmp_path / "gc"
    assert gpu_check.main(["--tiny", "--zoo", str(tiny_zoo), "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["train", "online", "generate", "kernels"]
    assert all(p["status"] == "ok" for p in phases.values()), phases
    for name in phases:  # each phase wrote its rows when it ended
        assert json.loads((out / name / "rows.json").read_text()) == phases[name]["rows"]
    assert phases["train"]["rows"][0]["images_per_s"] > 0 and phases["train"]["rows"][0]["steps"] == 2
    online = phases["online"]["rows"][0]
    assert online["ring_hits"] >= 1 and online["sasi_failed"] == 0 and online["sasi_per_s"] > 0
    assert any(r.get("sasi_per_s", 0) > 0 for r in phases["generate"]["rows"])
    assert "| online | ok |" in (out / "gpu_check.md").read_text()
    capsys.readouterr()
    assert gpu_check.main(["--tiny", "--resume", "--phases", "train,online", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already ok, skipped (--resume)") == 2


def test_a_failed_or_unrunnable_phase_makes_the_exit_non_zero(tmp_path, monkeypatch):
    import gpu_check
    import gpu_phases
    from gpu_phases import require

    # phases of this test's own: one needs a package this machine lacks, one raises
    missing = types.ModuleType("gpu_phases.needs_missing")
    missing.run = lambda args, out_dir: require("no_such_package_for_gpu_check")
    broken = types.ModuleType("gpu_phases.broken")
    broken.run = lambda args, out_dir: [{"what": "x"}][1]
    monkeypatch.setitem(sys.modules, "gpu_phases.needs_missing", missing)
    monkeypatch.setitem(sys.modules, "gpu_phases.broken", broken)
    monkeypatch.setattr(gpu_phases, "PHASES", (*gpu_phases.PHASES, "needs_missing", "broken"))
    for name, status in (("needs_missing", "skipped"), ("broken", "failed")):
        out = tmp_path / name
        assert gpu_check.main(["--tiny", "--phases", f"kernels,{name}", "--out", str(out)]) == 1
        got = json.loads((out / "gpu_check.json").read_text())["phases"]
        assert got["kernels"]["status"] == "ok" and got[name]["status"] == status
    note = json.loads((tmp_path / "needs_missing" / "gpu_check.json").read_text())["phases"]["needs_missing"]["note"]
    assert "no_such_package_for_gpu_check" in note and "--wheels" in note
