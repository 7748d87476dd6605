"""Run a multi-rank launch (deepspeed or torchrun) from a test, on the CPU."""
import os
import signal
import subprocess
from pathlib import Path

from sasi_online.commands._launch import free_port  # noqa: F401  (re-exported for the tests)
from sasi_online.utils import child_env

REPO = Path(__file__).resolve().parents[1]
SHM = "/dev/shm"


def cpu_env() -> dict:
    """The ranks find `sasi_online` where it is installed; nothing puts the checkout's top
    folder on their path (its `kernels/` would shadow the Hugging Face package)."""
    return child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def run_ranks(cmd: list, timeout: float) -> tuple[int, str]:
    """Run `cmd` in its own session and return (exit code, stdout + stderr).

    On timeout the launcher and all its ranks are killed. Files of DeepSpeed's that
    appeared in /dev/shm during the run are removed (the trainer disables DeepSpeed's shm
    comm op; this catches what a future version might still leave)."""
    shm_before = set(os.listdir(SHM)) if os.path.isdir(SHM) else set()
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    finally:
        for leftover in set(os.listdir(SHM)) - shm_before if os.path.isdir(SHM) else []:
            if "deepspeed" in leftover.lower():
                try:
                    os.unlink(os.path.join(SHM, leftover))
                except OSError:
                    pass
    return proc.returncode, log
