"""Training monitors shared by the methods, the trainer and the evaluation: collapse
(per-dimension std of normalised features) and the weighted kNN classifier.

`knn_predict` is the evaluation's own (one implementation for the trainer's monitor and
the final report): `knn_predict(train_feats, train_labels, test_feats, k=200, t=0.07,
num_classes=None)` returns class scores [N_test, C]; `.argmax(1)` gives labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sasi_online.eval.knn import knn_predict

__all__ = ["feature_std", "knn_predict"]


@torch.no_grad()
def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Per-dimension std over the batch after L2-normalising each feature vector.

    Collapsed features give ~0; healthy d-dimensional ones ~1/sqrt(d) (SimSiam's monitor).
    """
    return F.normalize(features.detach().float(), dim=1).std(dim=0)
