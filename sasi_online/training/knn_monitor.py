"""Online kNN monitor: clean (resize + normalise only) features of a labelled bank from
the training split and of the test split, classified by weighted kNN."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sasi_online.data.augment import PLAIN
from sasi_online.ssl.monitor import feature_std, knn_predict


class KnnMonitor:
    def __init__(self, train_ds, test_ds, augmenter, bank_size: int, test_size: int,
                 k: int, t: float, batch: int = 256):
        self.augmenter = augmenter
        self.k, self.t, self.batch = k, t, batch
        # evenly spaced subsets: every class is represented whatever the index order
        self.bank_idx = np.linspace(0, len(train_ds) - 1, min(bank_size, len(train_ds))).astype(int)
        self.test_idx = np.linspace(0, len(test_ds) - 1, min(test_size, len(test_ds))).astype(int)
        self.train_ds, self.test_ds = train_ds, test_ds
        self.bank_labels = torch.as_tensor(train_ds.labels()[self.bank_idx])
        self.test_labels = torch.as_tensor(test_ds.labels()[self.test_idx])
        self.num_classes = int(max(self.bank_labels.max(), self.test_labels.max())) + 1
        self._cache: dict[int, list[np.ndarray]] = {}  # the clean images never change

    def _images(self, ds, idx, key) -> list[np.ndarray]:
        if key not in self._cache:
            self._cache[key] = [np.asarray(ds[int(i)].image) for i in idx]
        return self._cache[key]

    @torch.no_grad()
    def _embed(self, method, images, device, dtype) -> torch.Tensor:
        feats = []
        for s in range(0, len(images), self.batch):
            x = self.augmenter.apply(PLAIN, images[s:s + self.batch]).to(device=device, dtype=dtype)
            feats.append(method.encode(x).float().cpu())
        return torch.cat(feats)

    @torch.no_grad()
    def evaluate(self, method: Any, device, dtype) -> dict:
        was_training = method.training
        method.eval()
        try:
            bank = self._embed(method, self._images(self.train_ds, self.bank_idx, 0), device, dtype)
            test = self._embed(method, self._images(self.test_ds, self.test_idx, 1), device, dtype)
        finally:
            method.train(was_training)
        pred = knn_predict(bank, self.bank_labels, test, k=self.k, t=self.t, num_classes=self.num_classes)
        if pred.ndim == 2:  # class scores → labels
            pred = pred.argmax(dim=1)
        return {"knn_acc": float((pred == self.test_labels).float().mean()),
                "feature_std": float(feature_std(test).mean())}
