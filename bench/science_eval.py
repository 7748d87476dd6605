"""The science bench's evaluation: the project's kNN and linear probe on frozen features, for
a trained checkpoint, an encoder that took no step ("random features") and raw pixels.

kNN here: k = 20 on centred, L2-normalised features (T = 0.07). With k = 50 of a bank of
2,000 and raw post-ReLU features, every cosine is near 1 and the vote is nearly uniform.
The product's eval.knn_k default stays ImageNet practice; only the bench sets these.
The test split is Fashion-MNIST's official 10,000 test images (`--test-split full`), or the
embedded 500 (`embedded`, for smoke runs and CI).
"""
from __future__ import annotations

from pathlib import Path

import torch

EVAL_KNN = ["eval.knn_k=20", "eval.knn_t=0.07", "eval.knn_center=true"]
TEST_SPLITS = {"full": "test_full", "embedded": "test"}


def eval_overrides(test_split: str) -> list[str]:
    """full | embedded | holdout (the embedded train split's last 400; train on data.limit=1600)."""
    return [*EVAL_KNN, f"eval.test_split={TEST_SPLITS.get(test_split, test_split)}"]


def check_test_split(test_split: str) -> None:
    """Fail before any job when the full test split is asked for and not installed."""
    from sasi_online.data.datasets import load_fashion_mnist

    if test_split == "full":
        load_fashion_mnist("test_full")  # raises naming `apt-get install dataset-fashion-mnist`


def evaluate_trained(run: Path, key: str, overrides: list[str]) -> dict:
    from sasi_online.eval.suite import evaluate_checkpoint

    ev = evaluate_checkpoint(run / "checkpoints", run / "eval", overrides=overrides, run_name=key)
    return {"knn": ev["results"]["knn"]["top1"], "linear": ev["results"]["linear"]["top1"],
            "test_size": ev.get("test_size")}


def evaluate_frozen(model: torch.nn.Module, cfg) -> dict:
    """kNN and linear top-1 of `model`'s flattened output (or `encode`), as evaluate_checkpoint
    computes them, on cfg's train split (bank, probe fit) and cfg.eval.test_split."""
    from sasi_online.data.datasets import build_dataset
    from sasi_online.eval.features import extract_features
    from sasi_online.eval.knn import knn_evaluate
    from sasi_online.eval.linear import linear_probe
    from sasi_online.eval.suite import _device, _normalisation, _num_classes

    ev = cfg.eval
    mean, std = _normalisation(cfg)
    device = _device(ev.device)
    train_ds, test_ds = build_dataset(cfg.data, ev.train_split), build_dataset(cfg.data, ev.test_split)
    train, test = (extract_features(model.to(device), ds, cfg.data.image_size, mean, std, ev.batch_size,
                                    ev.crop_ratio, device, 0, desc=ds.split) for ds in (train_ds, test_ds))
    classes = _num_classes(train_ds, train.labels, test.labels)
    knn = knn_evaluate(train.feats, train.labels, test.feats, test.labels, k=ev.knn_k, t=ev.knn_t,
                       num_classes=classes, center=ev.knn_center)
    lin = linear_probe(train.feats, train.labels, test.feats, test.labels, classes,
                       [float(w) for w in ev.linear_weight_decays], ev.seed, ev.linear_max_iter)
    return {"knn": knn["top1"], "linear": lin["top1"], "test_size": len(test.labels)}


class _FirstChannel(torch.nn.Module):
    """Raw pixels: the normalised grey image (channel 0 of the replicated three)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def pixel_baseline(cfg) -> dict:
    return evaluate_frozen(_FirstChannel(), cfg)


def random_features(cfg, seed: int) -> dict:
    """The encoder as initialised with `seed`: no step taken, BN statistics untouched."""
    from sasi_online.ssl import build_method
    from sasi_online.utils import derive_seed

    torch.manual_seed(derive_seed(seed, "random-features"))
    return evaluate_frozen(build_method(cfg.method), cfg)
