"""The GPU check: one script for a bare one-GPU machine with no network, in phases.

    python bench/gpu_check.py [--phases train,online,kernels,generate] [--wheels DIR] [--out DIR]
    python bench/gpu_check.py --tiny --out /tmp/gc     # the same phases on a CPU, tiny models (CI)

Phases (bench/gpu_phases/, each `run(args, out_dir) -> list[dict]`), in this order, each
with its own time limit (gpu_phases.PHASE_SECONDS; they sum to 7 minutes, the run's budget):
  train     train() on data already on the GPU, and on the product's data path
  online    co-located train() with full-size random-weight SD-1.5 + seg ControlNet
  kernels   Triton kernels vs the vectorised torch path the product would otherwise run
  generate  SASI/s and MFU (against the device's spec peak) of the generator's own loop;
            each compile in a child process killed at its share of the phase's limit
At start-up a Triton probe compiles and runs one trivial kernel; if it fails, every kernel
takes its torch path and the report says why. The report names the path each kernel took.
Each phase writes its rows when it ends, to <out>/<phase>/rows.json and the summary
gpu_check.json / gpu_check.md, so a run cut short keeps what finished; `--resume` skips
phases already done (ok). Exit status: 0 only when every selected phase passed; a phase
that fails, or is skipped for want of a package, makes it 1 (the summary names the wheel:
build the folder with bench/gpu_wheels.py and pass `--wheels DIR`, see README "GPU check").
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the gpu_phases package


def _import_project() -> None:
    """Make `sasi_online` importable from this checkout without putting the repository
    root on sys.path: there, the top-level `kernels/` folder would shadow the Hugging Face
    package of that name, which diffusers and transformers probe for."""
    try:
        importlib.import_module("sasi_online")
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("sasi_online", REPO / "sasi_online" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "sasi_online")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sasi_online"] = module
    spec.loader.exec_module(module)


_import_project()


# ----------------------------------------------------------------------------- report
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Report:
    """Phases so far; written after every phase (and readable by --resume)."""

    def __init__(self, out: Path, config: dict, resume: bool):
        self.out = out
        old = out / "gpu_check.json"
        previous = json.loads(old.read_text()) if resume and old.is_file() else {}
        self.data: dict = {"config": config, "env": {}, "phases": previous.get("phases", {})}

    def done(self, name: str) -> bool:
        return self.data["phases"].get(name, {}).get("status") == "ok"

    def phase(self, name: str, status: str, seconds: float, note: str = "", rows: list | None = None) -> None:
        self.data["phases"][name] = {"status": status, "seconds": round(seconds, 2), "note": note, "rows": rows or []}
        _atomic_write(self.out / name / "rows.json", json.dumps(rows or [], indent=2, default=str) + "\n")
        print(f"[gpu_check] {name}: {status} in {seconds:.1f} s {note}", flush=True)
        self.write()

    def write(self) -> None:
        _atomic_write(self.out / "gpu_check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        _atomic_write(self.out / "gpu_check.md", self.markdown())

    def markdown(self) -> str:
        env = self.data["env"]
        lines = ["# GPU check", "", f"- device: {env.get('device', '?')}", f"- torch {env.get('torch', '?')}, "
                 f"python {env.get('python', '?')}", f"- mode: {'tiny (CPU smoke test)' if self.data['config']['tiny'] else 'full size'}",
                 "", "| phase | status | s | note |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['status']} | {v['seconds']} | {v['note']} |" for k, v in self.data["phases"].items()]
        lines += ["", f"Triton probe: {env.get('triton_probe', '?')}. MFU denominator: "
                      f"{env.get('spec_note', '?')}."]
        paths = self.data.get("kernel_paths") or {}
        if paths:
            lines += ["", "| kernel | triton calls | torch calls | path (latest choice) |", "|---|---|---|---|"]
            lines += [f"| {k} | {v.get('triton', 0)} | {v.get('torch', 0)} | {v['reason']} |" for k, v in paths.items()]
        for name, v in self.data["phases"].items():
            if v["rows"]:
                keys = sorted({k for r in v["rows"] for k in r if k not in ("phase", "what")})
                lines += ["", f"## {name}", "", "| what | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
                lines += ["| " + str(r.get("what", "")) + " | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |"
                          for r in v["rows"]]
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- set-up
def install_wheels(folder: str, out: Path) -> str:
    """pip-install DIR/requirements.txt (bench/gpu_wheels.py wrote it) offline and without
    dependencies into <out>/site-packages, put first on sys.path (and on the PYTHONPATH of
    child processes): pip's --target would otherwise try to reinstall torch."""
    import shutil

    reqs = Path(folder) / "requirements.txt"
    if not reqs.is_file():
        raise SystemExit(f"--wheels {folder}: no requirements.txt there; build the folder with "
                         f"`python bench/gpu_wheels.py {folder} --python-version "
                         f"{sys.version_info.major}.{sys.version_info.minor}`")
    target = out / "site-packages"
    shutil.rmtree(target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--find-links", str(folder), "--target", str(target), "-r", str(reqs)]
    # no pip configuration: an index or find-links folder set there must not fill a gap in DIR
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    if proc.returncode != 0:
        raise SystemExit(f"pip install from '{folder}' failed: {proc.stderr.strip()[-1500:]}")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    count = sum(1 for line in reqs.read_text().splitlines() if line.strip())
    return f"installed {count} wheel(s) from '{folder}' into {target}"


def pip_freeze() -> list[str]:
    """The box's installed packages (`pip freeze`; from package metadata where pip is absent)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout.split()
    from importlib.metadata import distributions

    return sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())


def environment() -> dict:
    from gpu_phases import spec_peak_tflops
    from sasi_online.kernels import triton_probe

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    peak, peak_note = spec_peak_tflops(name)
    problem = triton_probe(dev.type)
    return {"device": name, "spec_bf16_tflops": peak, "spec_note": peak_note,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "triton_probe": "ok" if problem is None else f"failed: {problem}",
            "packages": {p: _has(p) for p in ("deepspeed", "pydantic", "diffusers", "transformers", "triton",
                                              "tensorboard", "yaml", "tqdm", "requests", "nvidia.dali")}}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is absent
        return False


def kernel_paths() -> dict:
    """Per kernel: calls on each path and the reason of the latest choice."""
    from sasi_online.kernels import dispatch_counts, last_choice

    return {k: {**v, "reason": getattr(last_choice(k), "reason", "")} for k, v in dispatch_counts().items()}


def parse_args(argv=None) -> argparse.Namespace:
    from gpu_phases import PHASE_SECONDS, PHASES, SETUP_SECONDS, TINY_PHASE_SECONDS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order (default: {','.join(PHASES)})")
    p.add_argument("--tiny", action="store_true", help="the same phases on a CPU with the tiny zoo (seconds, CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="output folder (default: $OUT if set, else runs/gpu_check)")
    p.add_argument("--wheels", default=None, help="install DIR/requirements.txt from this folder first (no network; "
                                                  "build it with bench/gpu_wheels.py)")
    p.add_argument("--zoo", default=None, help="an existing tiny zoo (default: built under --out)")
    p.add_argument("--resume", action="store_true", help="skip phases already ok in --out's gpu_check.json")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="no phase starts after this (default: the sum of the selected phases' limits)")
    p.add_argument("--section-seconds", type=float, default=None, help="timing loop per measurement (6; tiny 1)")
    for name in PHASES:
        p.add_argument(f"--{name}-seconds", type=float, default=None,
                       help=f"{name} phase limit (default {PHASE_SECONDS[name]:.0f}; tiny {TINY_PHASE_SECONDS[name]:.0f})")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per SASI, for SASI/s (default: 20)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile at the production batch (default: on unless --tiny)")
    p.add_argument("--compile-min-seconds", type=float, default=90.0,
                   help="start a compile child only with at least this much of the generate limit left (default: 90)")
    p.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)  # internal: one compiled row
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    limits = TINY_PHASE_SECONDS if args.tiny else PHASE_SECONDS
    for name in PHASES:
        key = f"{name}_seconds"
        setattr(args, key, getattr(args, key) or limits[name])
    args.budget_seconds = args.budget_seconds or SETUP_SECONDS + sum(getattr(args, f"{n}_seconds") for n in args.phases)
    args.section_seconds = args.section_seconds or (1.0 if args.tiny else 6.0)
    args.compile = (not args.tiny) if args.compile is None else args.compile
    return args


# ----------------------------------------------------------------------------- main
def run_phase(report: Report, name: str, args, deadline: float) -> bool:
    """Run one phase; True when it passed (or was already done with --resume)."""
    from gpu_phases import MissingPackage

    if args.resume and report.done(name):
        print(f"[gpu_check] {name}: already ok, skipped (--resume)", flush=True)
        return True
    if time.perf_counter() > deadline:
        report.phase(name, "skipped", 0.0, "time guard: the run's budget is spent")
        return False
    from gpu_phases import device, peak_memory_mib, reset_peak_memory

    reset_peak_memory(device())
    t0 = time.perf_counter()
    try:
        rows = importlib.import_module(f"gpu_phases.{name}").run(args, Path(args.out) / name)
    except MissingPackage as exc:
        report.phase(name, "skipped", time.perf_counter() - t0, str(exc))
        return False
    except Exception as exc:  # noqa: BLE001 - one phase failing must not stop the others
        traceback.print_exc()
        report.phase(name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:400])
        return False
    errors = [r for r in rows if "error" in r]
    seconds, limit = time.perf_counter() - t0, getattr(args, f"{name}_seconds", None)
    note = f"{len(errors)} row(s) with errors" if errors else ""
    if limit and seconds > limit:
        errors.append(name)
        note = f"ran {seconds:.0f} s, past its limit of {limit:.0f} s" + (f"; {note}" if note else "")
    if device().type == "cuda":
        note = f"peak GPU memory {peak_memory_mib(device()):.0f} MiB" + (f"; {note}" if note else "")
    report.phase(name, "failed" if errors else "ok", seconds, note, rows)
    return not errors


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_child:
        from gpu_phases.compiled import child_main

        return child_main(Path(args.compile_child))
    start = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = Report(Path(args.out), {k: v for k, v in vars(args).items()}, args.resume)
    freeze = pip_freeze()  # the box as it was, before --wheels
    if args.wheels:
        print(f"[gpu_check] {install_wheels(args.wheels, Path(args.out))}", flush=True)
    report.data["env"] = {**environment(), "pip_freeze": freeze}
    print(f"[gpu_check] Triton probe: {report.data['env']['triton_probe']}", flush=True)
    report.write()
    ok = []
    for name in args.phases:
        ok.append(run_phase(report, name, args, start + args.budget_seconds))
        report.data["kernel_paths"] = kernel_paths()
    report.data["total_seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    print(f"[gpu_check] {sum(ok)}/{len(ok)} phase(s) passed in {report.data['total_seconds']} s -> "
          f"{Path(args.out) / 'gpu_check.md'}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
