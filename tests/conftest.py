"""Shared fixtures. One thread per process: on small shared machines torch's default
thread count made small work many times slower."""
import os

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
