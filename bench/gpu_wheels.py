"""Build the wheel folder the GPU check installs on a box without network.

    python bench/gpu_wheels.py DIR [--python-version 3.12] [--have FREEZE.txt]

Run on a machine that reaches the package index. It resolves, with their dependencies,
every package the check's phases import (`PHASE_REQUIREMENTS`) for CPython X.Y on Linux
x86-64, then downloads each wheel that is not already on the box: torch, torchvision,
triton, the NVIDIA runtime wheels torch brings (and everything torch and torchvision
depend on) are left out, and so is every package a `pip freeze` of the box (`--have`)
lists; those lines also constrain the resolution, so the folder fits what is there.
DeepSpeed ships as a source archive only: its wheel is built here, without its compiled
ops (they build on first use, as on any install). DALI (~200 MB) never travels.

Writes DIR/requirements.txt (name==version, the list `gpu_check.py --wheels DIR` installs
with --no-deps --no-index) and prints the folder's size; exits 1 when it exceeds
--max-mib (a device call carries at most 64 MiB with the working tree).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# What the phases import (bench/gpu_phases/): configs and progress bars everywhere;
# DeepSpeed (and its pydantic) for train/online; diffusers and transformers for
# online/generate. Versions pinned where the project is tested against them.
PHASE_REQUIREMENTS = ("pyyaml", "tqdm", "packaging", "requests", "deepspeed==0.19.8", "pydantic",
                      "diffusers==0.42.1", "transformers", "huggingface_hub", "safetensors", "regex",
                      "tokenizers", "peft")  # peft: the zoo build makes a LoRA (online phase)
SOURCE_ONLY = ("deepspeed",)  # no binary wheel on the index: built here with --no-deps
BASE = ("torch", "torchvision")  # on the box already; their whole dependency closure stays out
ALWAYS_OUT = re.compile(r"^(torch|torchvision|triton|nvidia-dali-.*)$")  # plus the closure of BASE
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "linux_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_freeze(path: Path | None) -> dict[str, str | None]:
    """{canonical name: version or None} from `pip freeze` output ('name==1.2', 'name @ url')."""
    if path is None:
        return {}
    if not path.is_file():
        raise SystemExit(f"--have {path}: no such file; write it on the box with `pip freeze > {path.name}`")
    have = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([^\s;]+))?", line)
        if m:
            have[canonical(m.group(1))] = m.group(2)
    return have


def target_flags(python_version: str) -> list[str]:
    digits = python_version.replace(".", "")
    flags = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
             "--abi", f"cp{digits}", "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def pip(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip {' '.join(args[:2])} failed:\n{proc.stderr.strip()[-3000:]}")
    return proc


def resolve(requirements: list[str], python_version: str, find_links: Path, constraints: Path) -> dict[str, str]:
    """{canonical name: version} that pip resolves for the target (metadata only, no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(["install", "--dry-run", "--ignore-installed", "-q", "--target", str(Path(tmp) / "t"),
             "--report", str(report), "--find-links", str(find_links), "-c", str(constraints),
             *target_flags(python_version), *requirements])
        items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def build_source_wheels(folder: Path, have: dict) -> None:
    for req in PHASE_REQUIREMENTS:
        name = canonical(re.split(r"[=<>!]", req)[0])
        if name in SOURCE_ONLY and name not in have and not list(folder.glob(f"{name}-*.whl")):
            pip(["wheel", "--no-deps", "-q", "-w", str(folder), req])


def select(wanted: dict[str, str], base: dict[str, str], have: dict) -> list[str]:
    """name==version for each resolved package the box lacks: not torch's or torchvision's
    closure, not on the box at that version (`have`; a name without a version counts as
    there), never torch/torchvision/triton/DALI themselves."""
    def on_box(n: str, v: str) -> bool:
        return n in have and have[n] in (None, v)

    keep = {n: v for n, v in wanted.items() if n not in base and not on_box(n, v) and not ALWAYS_OUT.match(n)}
    return [f"{n}=={v}" for n, v in sorted(keep.items())]


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.whl")) / 2 ** 20


def build(folder: Path, python_version: str, have: dict) -> list[str]:
    """Download the wheels into `folder`; returns the name==version lines it holds."""
    folder.mkdir(parents=True, exist_ok=True)
    build_source_wheels(folder, have)
    constraints = folder / ".constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in have.items()
                                   if v and "+" not in v and not ALWAYS_OUT.match(n)))
    empty = folder / ".no-constraints.txt"
    empty.write_text("")
    base = resolve(list(BASE), python_version, folder, empty)
    try:
        wanted = resolve(list(PHASE_REQUIREMENTS), python_version, folder, constraints)
    except SystemExit as exc:  # a package on the box is too old (or too new) for the pins
        print(f"the box's versions conflict with the phases' requirements; resolving without them (the folder's "
              f"newer copies come first on sys.path): {str(exc).splitlines()[-1][:300]}", file=sys.stderr)
        wanted = resolve(list(PHASE_REQUIREMENTS), python_version, folder, empty)
    empty.unlink()
    pins = select(wanted, base, have)
    binary = [p for p in pins if canonical(p.split("==")[0]) not in SOURCE_ONLY]
    if binary:
        pip(["download", "--no-deps", "-q", "-d", str(folder), *target_flags(python_version), *binary])
    constraints.unlink()
    tmp = folder / ".requirements.txt.tmp"
    tmp.write_text("".join(p + "\n" for p in pins))
    tmp.replace(folder / "requirements.txt")
    return pins


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the wheel folder to fill (kept out of git)")
    ap.add_argument("--python-version", default="3.12", help="the box's CPython X.Y (default 3.12)")
    ap.add_argument("--have", type=Path, default=None, help="`pip freeze` of the box: those stay out")
    ap.add_argument("--max-mib", type=float, default=48.0, help="fail above this size (default 48)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"--python-version {args.python_version}: expected X.Y, e.g. 3.12")
    pins = build(args.dir, args.python_version, read_freeze(args.have))
    size = folder_mib(args.dir)
    print(f"{len(pins)} wheel(s) for CPython {args.python_version} in {args.dir}: {size:.1f} MiB "
          f"(requirements: {args.dir / 'requirements.txt'})")
    if size > args.max_mib:
        print(f"too large for a device call (> {args.max_mib:.0f} MiB); pass --have with the box's pip freeze",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
