"""Shared fixtures. One thread per process: on small shared machines torch's default
thread count made small work many times slower."""
import os
import sys
from pathlib import Path

# `python -m pytest` puts the current folder first on sys.path. From the checkout's top that
# would make its `kernels/` shadow the Hugging Face package transformers imports: the tests
# import the installed package only (tests/test_import_roots.py checks it).
_TOP = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _TOP]
if getattr(sys.modules.get("kernels"), "__file__", "").startswith(str(_TOP / "kernels")):
    raise ImportError(f"`kernels` was imported from the checkout ({_TOP / 'kernels'}) before the tests started; "
                      f"remove the checkout's top folder from PYTHONPATH")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model-identity file hashes: a per-session cache, not the user's ~/.cache
os.environ.setdefault("SASI_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="sasi-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The tiny model set, built once per test session with the project's own builder."""
    from sasi_online.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny-zoo", seed=0)


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro model set (trained on Fashion-MNIST, shipped with the package), built once."""
    from sasi_online.zoo.micro.ship import build_micro

    return build_micro(tmp_path_factory.mktemp("micro") / "micro-zoo")
