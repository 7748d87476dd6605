"""The checkout's top folder is never an import root, so its `kernels/` never shadows the
Hugging Face `kernels` package (transformers >= 5.25 imports it when diffusers and
transformers load models). Checked in every way the project starts Python:

- this pytest process, and `python -m pytest` from the checkout's top (which puts the
  current folder on sys.path: tests/conftest.py takes it off);
- `deepspeed sasi_online/train.py`, launched by a bench (1 producer + 1 trainer), and
  `python sasi_online/train.py` co-located: every process of theirs records, at exit, which
  `kernels` it imported (a `sitecustomize` on PYTHONPATH: the probe, not the checkout).

Each loads the micro set's BLIP-2, LLaMA, SD + seg ControlNet through the project's loaders.
And a run whose producer fails says so: it exits non-zero with the producer's error.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _multirank import free_port, run_ranks

REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "kernels"
PROBE = '''import atexit, json, os, sys

def _record():
    k = sys.modules.get("kernels")
    top = os.environ["SASI_CHECKOUT_TOP"]
    rec = {"pid": os.getpid(), "argv": sys.argv[:2], "kernels": getattr(k, "__file__", None),
           "top_on_path": [p for p in sys.path if os.path.abspath(p or os.curdir) == top],
           "transformers": "transformers" in sys.modules, "diffusers": "diffusers" in sys.modules}
    with open(os.environ["SASI_IMPORT_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\\n")

atexit.register(_record)
'''
# a few steps of online_tiny with the models of every stage: BLIP-2 + LLaMA text, mix VP
# (segmenter, SD-2.1 family + its seg ControlNet)
RUN = ["generation.text=model", "visual.kind=mix", "generation.steps=2", "generation.batch_size=8",
       "generation.resolution=32", "train.batch_size=8", "train.steps=4", "train.log_every=2", "train.ckpt_every=4",
       "train.knn_every=1000", "train.knn_bank=64", "train.knn_test=32", "data.limit=64", "online.lookahead=4",
       "online.start_sasi=8", "online.max_age=50", "online.plots=false"]


def assert_site_kernels(path=None) -> None:
    import kernels

    where = Path(path or kernels.__file__).resolve()
    assert OURS not in where.parents, f"`kernels` came from the checkout: {where}"
    assert "site-packages" in where.parts, where
    from importlib.metadata import version

    assert version("kernels")  # installed ([dev]): the check can never pass vacuously


def load_every_model(zoo) -> None:
    from sasi_online.config import load_config
    from sasi_online.data.datasets import build_dataset
    from sasi_online.online.maker import SasiMaker

    cfg = load_config(REPO / "configs/online_tiny.yaml", [f"models.root={zoo}", *RUN])
    maker = SasiMaker(cfg, build_dataset(cfg.data, "train"))
    assert maker.segmenter is not None and maker.generator is not None
    assert len(maker.make([(0, 0), (1, 0)])) == 2  # captions, rewrites, mask maps, SASI


def test_this_process_imports_kernels_from_site_packages(micro_zoo):
    assert str(REPO) not in [str(Path(p or ".").resolve()) for p in sys.path]
    load_every_model(micro_zoo)  # diffusers.loaders.peft -> transformers' hub kernels -> kernels
    assert_site_kernels()


def test_python_m_pytest_from_the_checkout_top():
    """`python -m pytest` puts the current folder on sys.path; from the checkout's top that is
    the folder holding `kernels/`. The inner run repeats the test above."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_import_roots.py::test_this_process_imports_kernels_from_site_packages"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout


def test_python_c_from_the_checkout_top_hands_kernels_to_the_installed_package():
    """`python -m sasi_online.cli` / `python -c` / a REPL in the checkout put its top folder
    first on sys.path; `import kernels` then finds the checkout's folder, which hands the name
    to the installed package, while `sasi_online.kernels` stays the project's."""
    code = ("import kernels, sys; import sasi_online.kernels as ours; import diffusers.loaders.peft; "
            "print(kernels.__file__); print(ours.__file__); print(sorted(m for m in sys.modules if m.startswith('kernels.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-3000:]
    theirs, ours, submodules = r.stdout.splitlines()[-3:]
    assert_site_kernels(theirs)
    assert Path(ours).resolve() == OURS / "__init__.py" or "site-packages" in ours
    assert "_handover" not in submodules


@pytest.fixture()
def probe(tmp_path, monkeypatch):
    """Every Python process started from here records the `kernels` it imported."""
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PROBE, encoding="utf-8")
    log = tmp_path / "imports.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.setenv("SASI_IMPORT_LOG", str(log))
    monkeypatch.setenv("SASI_CHECKOUT_TOP", str(REPO))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def records() -> list[dict]:
        rows = [json.loads(x) for x in log.read_text(encoding="utf-8").splitlines()] if log.is_file() else []
        for r in rows:
            if r["transformers"] or any(str(a).endswith("train.py") for a in r["argv"]):  # not the launchers'
                assert not r["top_on_path"], f"the checkout's top folder is on sys.path of {r['argv']}"
            if r["kernels"]:
                assert_site_kernels(r["kernels"])
        return rows

    return records


def _trainer_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if any(str(a).endswith("train.py") for a in r["argv"])]


def test_bench_launched_run_imports_kernels_from_site_packages(micro_zoo, probe, tmp_path):
    """`deepspeed sasi_online/train.py` as bench/bench_offline_online.py launches it."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_offline_online import _launch

    out = tmp_path / "launched"
    _launch(2, "configs/online_tiny.yaml", [f"models.root={micro_zoo}", f"train.out={out}", *RUN])
    ranks = _trainer_rows(probe())
    assert len(ranks) == 2, ranks  # the producer and the trainer
    assert any(r["kernels"] and r["diffusers"] for r in ranks)  # the producer loaded the models
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["outcomes"]["ring_hit"] > 0 and summary["producers"][0]["error"] == ""


def test_colocated_script_imports_kernels_from_site_packages(micro_zoo, probe, tmp_path):
    out = tmp_path / "colocated"
    cmd = [sys.executable, "sasi_online/train.py", "--config", "configs/online_tiny.yaml",
           f"models.root={micro_zoo}", f"train.out={out}", *RUN, "online.mode=colocated", "online.producers=0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rank,) = _trainer_rows(probe())
    assert rank["kernels"] and rank["diffusers"]
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["outcomes"]["ring_hit"] > 0 and summary["sasi_pair_rate"] > 0


def test_a_never_installed_checkout_names_the_install(tmp_path):
    """Without site-packages (`-S`) the package cannot be found: one line says what to run."""
    r = subprocess.run([sys.executable, "-S", "sasi_online/train.py", "--config", "tiny_cpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "error:" in r.stderr and "pip install -e ." in r.stderr


# ----------------------------------------------------------------------------- loud failures
def test_launched_producer_that_fails_at_load_stops_the_run(tiny_zoo, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "sasi_online/train.py", "--config", "configs/online_tiny.yaml", f"models.root={tiny_zoo}",
           f"train.out={out}", *RUN, "generation.text=class_name", "visual.kind=image", "online.fault_load=true"]
    code, log = run_ranks(cmd, timeout=240)
    assert code != 0, log[-3000:]
    assert "online.fault_load=true: injected failure while loading" in log
    assert "every producer stopped with an error" in log and "rank 1:" in log  # the producer says it too
    assert (out / "checkpoints" / "global_step2" / "meta.json").is_file()  # stopped at a checkpoint
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["failure"] and summary["sasi_received"] == 0 and summary["sasi_pair_rate"] == 0.0


def test_colocated_producer_that_fails_at_load_stops_the_run(tiny_zoo, tmp_path, capsys):
    from sasi_online.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "online_tiny", f"models.root={tiny_zoo}", f"train.out={out}", *RUN,
                 "generation.text=class_name", "visual.kind=image", "online.mode=colocated", "online.producers=0",
                 "online.fault_load=true"])
    err = capsys.readouterr().err
    assert code != 0 and "injected failure while loading" in err and "co-located producer stopped" in err
    assert "online.allow_fallback_only=true" in err  # the message says how to go on anyway
    # nothing lost: the checkpoint of the step it stopped at resumes once the cause is gone
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert main(["train", "--config", "online_tiny", f"models.root={tiny_zoo}", f"train.out={out}", *RUN,
                 "generation.text=class_name", "visual.kind=image", "online.mode=colocated",
                 "online.producers=0"]) == 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4


def test_allow_fallback_only_keeps_the_drill_going(tiny_zoo, tmp_path, capsys):
    from sasi_online.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", "online_tiny", f"models.root={tiny_zoo}", f"train.out={out}", *RUN,
                 "generation.text=class_name", "visual.kind=image", "online.mode=colocated", "online.producers=0",
                 "online.fault_load=true", "online.allow_fallback_only=true"])
    assert code == 0
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["outcomes"]["fallback"] == 4 * 8 and summary["sasi_pair_rate"] == 0.0
