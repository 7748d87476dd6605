"""Start a multi-rank training job on this machine through the deepspeed launcher."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

from sasi_online.errors import UserInputError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_train(config: str, ranks: int, overrides: list[str]) -> dict:
    """`deepspeed --num_gpus RANKS sasi_online/train.py --config CONFIG ...`; returns the run's
    online_summary.json (plus the paths of its plots) when it wrote one."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserInputError("the deepspeed launcher is not installed: pip install deepspeed")
    from sasi_online.utils import child_env

    package = Path(__file__).resolve().parents[1]
    env = child_env(OMP_NUM_THREADS="1")  # the ranks import the installed package, nothing from the checkout's top
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"  # --num_gpus then counts CPU processes
        else:  # refused here, before any rank starts, rather than by NCCL inside every rank
            from sasi_online.online.roles import check_devices

            mode = next((o.split("=", 1)[1] for o in overrides if o.startswith("online.mode=")), "launched")
            check_devices(mode, ranks, torch.cuda.device_count())
    except ImportError:
        pass
    # the `deepspeed` command, run through this interpreter so that PATH does not matter
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(package / "train.py"), "--config", config, *overrides]
    print("$ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd, env=env, stdout=sys.stdout, stderr=sys.stderr)
    if code:
        raise SystemExit(f"the launched training job failed with exit code {code}")
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.out=")), None)
    summary: dict = {}
    if out and Path(out, "online_summary.json").exists():
        summary = json.loads(Path(out, "online_summary.json").read_text(encoding="utf-8"))
        summary.update({p.stem: str(p) for p in sorted(Path(out).glob("*.png"))})
    return summary
