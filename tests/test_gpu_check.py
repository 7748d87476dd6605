"""bench/gpu_check.py in --tiny mode (the same phases on a CPU, tiny zoo), its exit status,
resume, and the two GPU configs (they load and validate here; no machine here has the
real weights)."""
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

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


def test_tiny_gpu_check_runs_every_phase_with_triton_disabled_by_the_probe(tiny_zoo, tmp_path, capsys,
                                                                           monkeypatch):
    """The whole check on a CPU, the Triton probe failing as on a box without a C compiler
    (fault injection): every phase passes, and the report names the path each kernel took."""
    import gpu_check
    from sasi_online.kernels import probe

    def no_compiler(device_type):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(probe, "compile_and_run", no_compiler)
    probe.forget()
    out = tmp_path / "gc"
    try:
        assert gpu_check.main(["--tiny", "--zoo", str(tiny_zoo), "--out", str(out)]) == 0
    finally:
        probe.forget()
    report = json.loads((out / "gpu_check.json").read_text())
    phases = report["phases"]
    assert list(phases) == ["train", "online", "kernels", "generate"]  # kernels before generate
    assert all(p["status"] == "ok" for p in phases.values()), phases
    for name in phases:  # each phase wrote its rows when it ended
        assert json.loads((out / name / "rows.json").read_text()) == phases[name]["rows"]
    assert "C compiler" in report["env"]["triton_probe"] and report["env"]["triton_probe"].startswith("failed")
    assert any(line.startswith("torch==") for line in report["env"]["pip_freeze"])
    ring = report["kernel_paths"]["ring_augment"]
    assert ring["torch"] > 0 and ring.get("triton", 0) == 0 and ring["reason"]
    on_device, data_path = phases["train"]["rows"]
    assert on_device["images_per_s"] > 0 and "on device" in on_device["what"]
    assert data_path["images_per_s"] > 0 and data_path["steps"] == 2
    online = phases["online"]["rows"][0]
    assert online["ring_hits"] >= 1 and online["sasi_failed"] == 0 and online["sasi_per_s"] > 0
    ring_row = next(r for r in phases["kernels"]["rows"] if r["what"].startswith("ring_augment"))
    assert ring_row["vectorized_ms"] > 0 and ring_row["loop_ms"] > 0 and "loop_speedup_vs_vectorized" in ring_row
    assert any(r.get("sasi_per_s", 0) > 0 for r in phases["generate"]["rows"])
    md = (out / "gpu_check.md").read_text()
    assert "| online | ok |" in md and "| ring_augment | 0 |" in md and "C compiler" in md
    capsys.readouterr()
    assert gpu_check.main(["--tiny", "--resume", "--phases", "train,online", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already ok, skipped (--resume)") == 2


def test_phase_limits_sum_to_at_most_seven_minutes():
    import gpu_check
    from gpu_phases import PHASE_SECONDS, PHASES, SETUP_SECONDS

    assert set(PHASE_SECONDS) == set(PHASES) and SETUP_SECONDS + sum(PHASE_SECONDS.values()) <= 7 * 60
    args = gpu_check.parse_args([])
    assert args.budget_seconds == SETUP_SECONDS + sum(PHASE_SECONDS.values())
    assert args.phases.index("kernels") < args.phases.index("generate") and args.compile
    assert args.compile_min_seconds < args.generate_seconds  # the compile child fits the phase


def test_spec_peak_table_and_unknown_devices():
    from gpu_phases import spec_peak_tflops

    assert spec_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert spec_peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert spec_peak_tflops("NVIDIA H200")[0] == 989.0
    assert spec_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0 and spec_peak_tflops("NVIDIA L40S")[0] == 362.0
    peak, note = spec_peak_tflops("NVIDIA GeForce RTX 4090")
    assert peak is None and "measured matmul rate only" in note


GROUP = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_past_its_hard_limit_is_killed_with_its_workers(tmp_path):
    import os
    import time

    from gpu_phases import run_limited

    t0 = time.perf_counter()
    rc = run_limited([sys.executable, "-c", GROUP], 1.5, tmp_path / "child.log")
    assert rc is None and time.perf_counter() - t0 < 20
    worker = int((tmp_path / "child.log").read_text().split()[0])
    deadline = time.time() + 5
    while time.time() < deadline:  # the grandchild (a compile worker, say) is gone too
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker {worker} survived the kill")
    assert run_limited([sys.executable, "-c", "raise SystemExit(3)"], 30, tmp_path / "b.log") == 3


def test_require_names_the_wheel_a_dependency_lacks(tmp_path, monkeypatch):
    from gpu_phases import MissingPackage, require

    (tmp_path / "phase_dep_probe_pkg.py").write_text("import yaml\nimport absent_dep_for_gpu_check\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingPackage, match=r"absent-dep-for-gpu-check \(needed by phase_dep_probe_pkg\)"):
        require("yaml", "phase_dep_probe_pkg")
    (tmp_path / "phase_needs_pyyaml.py").write_text("raise ModuleNotFoundError(\"No module named 'yaml'\", name='yaml')\n")
    with pytest.raises(MissingPackage, match=r"bring wheel\(s\) pyyaml \(needed by phase_needs_pyyaml\)"):
        require("phase_needs_pyyaml")
    require("yaml", "tqdm")  # present here: no error


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
    for name in ("needs_missing", "broken"):  # every phase has its own limit
        monkeypatch.setitem(gpu_phases.TINY_PHASE_SECONDS, name, 30.0)
        monkeypatch.setitem(gpu_phases.PHASE_SECONDS, name, 30.0)
    for name, status in (("needs_missing", "skipped"), ("broken", "failed")):
        out = tmp_path / name
        assert gpu_check.main(["--tiny", "--phases", f"kernels,{name}", "--out", str(out)]) == 1
        got = json.loads((out / "gpu_check.json").read_text())["phases"]
        assert got["kernels"]["status"] == "ok" and got[name]["status"] == status
    note = json.loads((tmp_path / "needs_missing" / "gpu_check.json").read_text())["phases"]["needs_missing"]["note"]
    assert "bring wheel(s) no-such-package-for-gpu-check" in note and "--wheels" in note


def test_wheel_folder_leaves_out_what_the_box_has(tmp_path):
    import gpu_wheels

    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# box\nTransformers==5.17.0\nhuggingface_hub==1.33.0\nsympy @ file:///tmp/sympy.whl\n"
                      "-e git+https://example.invalid/x.git#egg=x\ntorch==2.11.0+cu130\n")
    have = gpu_wheels.read_freeze(freeze)
    assert have == {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "sympy": None, "torch": "2.11.0+cu130"}
    have["requests"] = "2.0.0"  # too old on the box: the folder's newer copy travels
    wanted = {"diffusers": "0.42.1", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "requests": "2.34.2",
              "filelock": "4.3.2", "triton": "3.6.0", "nvidia-dali-cuda130": "2.4.0", "pyyaml": "6.0.4"}
    base = {"torch": "2.11.0", "filelock": "4.3.2", "nvidia-cublas": "13.1"}
    assert gpu_wheels.select(wanted, base, have) == ["diffusers==0.42.1", "pyyaml==6.0.4", "requests==2.34.2"]
    with pytest.raises(SystemExit, match="pip freeze"):
        gpu_wheels.read_freeze(tmp_path / "absent.txt")
    flags = gpu_wheels.target_flags("3.12")
    assert "cp312" in flags and "--only-binary=:all:" in flags and "manylinux2014_x86_64" in flags


def test_wheels_folder_without_requirements_names_the_builder(tmp_path):
    import gpu_check

    with pytest.raises(SystemExit, match="gpu_wheels.py"):
        gpu_check.install_wheels(str(tmp_path), tmp_path / "out")


@pytest.mark.skipif(not os.environ.get("SASI_OFFLINE_WHEELS_TEST"),
                    reason="about 2 minutes and the package index: set SASI_OFFLINE_WHEELS_TEST=1")
def test_offline_install_into_a_bare_venv_then_tiny_check(tmp_path):
    """Build the wheel folder for this interpreter, make a virtual environment holding only
    torch and torchvision, install the folder there offline, run `gpu_check.py --tiny`."""
    import subprocess

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels, venv, out = tmp_path / "wheels", tmp_path / "venv", tmp_path / "gc"
    run = lambda *cmd, **kw: subprocess.run(cmd, capture_output=True, text=True, **kw)  # noqa: E731
    r = run(sys.executable, str(REPO / "bench" / "gpu_wheels.py"), str(wheels), "--python-version", version)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (wheels / "requirements.txt").is_file() and "MiB" in r.stdout
    r = run(sys.executable, "-m", "venv", str(venv))
    assert r.returncode == 0, r.stderr
    py = str(venv / "bin" / "python")
    r = run(py, "-m", "pip", "install", "-q", f"torch=={_version('torch')}", f"torchvision=={_version('torchvision')}")
    assert r.returncode == 0, r.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = run(py, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--wheels", str(wheels), "--out", str(out),
            env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert all(p["status"] == "ok" for p in report["phases"].values()), report["phases"]
    assert not any(line.lower().startswith(("diffusers==", "deepspeed==")) for line in report["env"]["pip_freeze"])


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist).split("+")[0]


def test_compile_child_settings_drop_coordinate_descent_and_keep_the_vae_eager(monkeypatch, tmp_path):
    from gpu_phases.compiled import child_env

    from sasi_online.config import Config
    from sasi_online.engines.backends import inductor_options
    from sasi_online.errors import UserInputError
    from sasi_online.generation.backend import Decoder, build_decoder

    env = child_env(tmp_path / "generate")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path.resolve()))  # under --out: a rerun is warm
    monkeypatch.delenv("SASI_INDUCTOR_TUNING", raising=False)
    assert inductor_options("default")["coordinate_descent_tuning"] is True  # the product's default
    monkeypatch.setenv("SASI_INDUCTOR_TUNING", env["SASI_INDUCTOR_TUNING"])
    assert "coordinate_descent_tuning" not in inductor_options("default")
    monkeypatch.setenv("SASI_INDUCTOR_TUNING", "fastest")
    with pytest.raises(UserInputError, match="SASI_INDUCTOR_TUNING"):
        inductor_options("default")
    monkeypatch.delenv("SASI_INDUCTOR_TUNING")

    from diffusers import AutoencoderKL
    from gpu_phases.generate import TINY_VAE

    cfg = Config().generation
    cfg.backend = "compile"
    fam = types.SimpleNamespace(vae=AutoencoderKL(**TINY_VAE), device=torch.device("cpu"), name="sd15")
    monkeypatch.setenv("SASI_COMPILE_DECODER", env["SASI_COMPILE_DECODER"])
    assert "compiled" not in build_decoder(cfg, None, fam).name
    monkeypatch.delenv("SASI_COMPILE_DECODER")
    assert "compiled" in build_decoder(cfg, None, fam).name and isinstance(build_decoder(cfg, None, fam), Decoder)


def test_stage_models_are_the_published_full_sizes():
    """The online phase's BLIP-2 OPT-2.7B and LLaMA-7B configs, built on the meta device
    (no memory): their parameter counts are the released checkpoints' (3.74 B, 6.74 B)."""
    from gpu_phases.semantics import EVA_VIT_G, LLAMA_7B, OPT_2_7B, QFORMER
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        blip2 = Blip2ForConditionalGeneration(Blip2Config(
            vision_config=EVA_VIT_G, qformer_config=QFORMER, text_config=dict(OPT_2_7B, model_type="opt"),
            num_query_tokens=32, image_token_index=OPT_2_7B["vocab_size"] - 7))
        llama = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    assert round(sum(p.numel() for p in blip2.parameters()) / 1e9, 2) == 3.74
    assert round(sum(p.numel() for p in llama.parameters()) / 1e9, 2) == 6.74
    assert OPT_2_7B["vocab_size"] - 7 == 50265  # '<image>' in the real vocabulary (NOTES: blip2-opt-2.7b)
