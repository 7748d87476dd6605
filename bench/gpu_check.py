"""The GPU check: one script for a bare one-GPU machine with no network, in phases.

    python bench/gpu_check.py [--phases train,online,generate,kernels] [--wheels DIR] [--out DIR]
    python bench/gpu_check.py --tiny --out /tmp/gc     # the same phases on a CPU, tiny models (CI)

Phases (bench/gpu_phases/, each `run(args, out_dir) -> list[dict]`):
  train     20 steps of train(): DeepSpeed bf16, ZeRO-1, ResNet-50, 224 px, batch 128
  online    30 steps of co-located train() with full-size random-weight SD-1.5 + seg
            ControlNet at 256 px; at least one ring hit, no non-finite SASI
  generate  matmul rate, SASI/s and MFU of UNet + ControlNet (eager grid, one compiled shape)
  kernels   Triton kernels vs their torch references; ring copy bandwidth
Each phase writes its rows (images/s, SASI/s, ring hit rate, peak GPU memory, seconds)
when it ends, to <out>/<phase>/rows.json and the summary gpu_check.json / gpu_check.md,
so a run cut short keeps what finished; `--resume` skips phases already done (ok).
Exit status: 0 only when every selected phase passed; a phase that fails, or is skipped
for want of a package, makes it 1 (the summary names the package: bring its wheel with
`--wheels DIR`, see README "GPU check"). The defaults finish in about 7 minutes on one GPU.
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
def install_wheels(folder: str) -> str:
    target = tempfile.mkdtemp(prefix="gpu_check_site_")
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        return f"no wheels in '{folder}'"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--target", target, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install from '{folder}' failed: {proc.stderr.strip()[-500:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return f"installed {len(wheels)} wheel(s) from '{folder}'"


def environment() -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "packages": {p: importlib.util.find_spec(p) is not None
                         for p in ("deepspeed", "pydantic", "diffusers", "transformers", "triton", "tensorboard")}}


def parse_args(argv=None) -> argparse.Namespace:
    from gpu_phases import PHASES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, in order (default: {','.join(PHASES)})")
    p.add_argument("--tiny", action="store_true", help="the same phases on a CPU with the tiny zoo (seconds, CI)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="output folder (default: $OUT if set, else runs/gpu_check)")
    p.add_argument("--wheels", default=None, help="pip-install every wheel in this folder first (no network)")
    p.add_argument("--zoo", default=None, help="an existing tiny zoo (default: built under --out)")
    p.add_argument("--resume", action="store_true", help="skip phases already ok in --out's gpu_check.json")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="no phase starts after this (default 420 full size, 300 tiny)")
    p.add_argument("--section-seconds", type=float, default=None, help="timing loop per measurement (8; tiny 1)")
    p.add_argument("--generate-seconds", type=float, default=None, help="generate phase guard (240; tiny 30): eager rows first, then one compile per shape while at least --compile-min-seconds are left")
    p.add_argument("--kernels-seconds", type=float, default=60.0, help="kernels phase guard (default 60)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per SASI, for SASI/s (default: 20)")
    p.add_argument("--batches", type=int, nargs=2, default=None, help="two batch sizes (default: 1 8; tiny: 1 2)")
    p.add_argument("--resolutions", type=int, nargs=2, default=None, help="two sides in px (256 512; tiny: 32 64)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile at one static shape (default: on unless --tiny)")
    p.add_argument("--compile-min-seconds", type=float, default=120.0,
                   help="skip compile when less than this is left of the generate guard (default: 120)")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    args.budget_seconds = args.budget_seconds or (300.0 if args.tiny else 420.0)
    args.section_seconds = args.section_seconds or (1.0 if args.tiny else 8.0)
    args.generate_seconds = args.generate_seconds or (30.0 if args.tiny else 240.0)
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8])
    args.resolutions = args.resolutions or ([32, 64] if args.tiny else [256, 512])
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
    note = f"{len(errors)} row(s) with errors" if errors else ""
    if device().type == "cuda":
        note = f"peak GPU memory {peak_memory_mib(device()):.0f} MiB" + (f"; {note}" if note else "")
    report.phase(name, "failed" if errors else "ok", time.perf_counter() - t0, note, rows)
    return not errors


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = Report(Path(args.out), {k: v for k, v in vars(args).items()}, args.resume)
    if args.wheels:
        print(f"[gpu_check] {install_wheels(args.wheels)}", flush=True)
    report.data["env"] = environment()
    report.write()
    ok = [run_phase(report, name, args, start + args.budget_seconds) for name in args.phases]
    report.data["total_seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    print(f"[gpu_check] {sum(ok)}/{len(ok)} phase(s) passed in {report.data['total_seconds']} s -> "
          f"{Path(args.out) / 'gpu_check.md'}", flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
