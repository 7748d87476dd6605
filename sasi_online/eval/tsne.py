"""t-SNE picture of the feature space for a few classes (paper Fig. 10: ten random classes)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sasi_online.utils import save_figure


def choose_classes(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """`num_classes` classes drawn at random (seeded) from those present; all when fewer."""
    from sasi_online.utils import derive_seed

    present = np.unique(labels)
    if len(present) <= num_classes:
        return present
    rng = np.random.default_rng(derive_seed("tsne-classes", seed))
    return np.sort(rng.choice(present, size=num_classes, replace=False))


def tsne_embed(feats: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int = 10,
               per_class: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE coordinates and labels of up to `per_class` points of each chosen class."""
    from sklearn.manifold import TSNE

    from sasi_online.utils import derive_seed

    feats = np.asarray(feats, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    keep = []
    rng = np.random.default_rng(derive_seed("tsne-points", seed))
    for cls in choose_classes(labels, num_classes, seed):
        members = np.flatnonzero(labels == cls)
        keep.append(np.sort(rng.permutation(members)[:per_class]))
    keep = np.concatenate(keep)
    if len(keep) < 3:
        raise ValueError(f"t-SNE needs at least 3 points, the chosen classes have {len(keep)}")
    x = feats[keep]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine geometry, as kNN
    perplexity = float(min(30.0, (len(keep) - 1) / 3.0))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed % (2**32),
                  metric="euclidean").fit_transform(x)
    return coords, labels[keep]


def plot_embedding(coords: np.ndarray, labels: np.ndarray, path: str | Path,
                   class_names: Sequence[str] | None = None, title: str = "") -> Path:
    """Scatter 2-D coordinates coloured by class into a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for j, cls in enumerate(classes):
        pts = coords[labels == cls]
        name = class_names[cls] if class_names is not None and cls < len(class_names) else str(cls)
        ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(j % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of frozen features", fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="best", frameon=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_tsne(feats, labels, path: str | Path, class_names: Sequence[str] | None = None,
              num_classes: int = 10, per_class: int = 100, seed: int = 0, title: str = "") -> Path:
    """t-SNE of up to `per_class` points of `num_classes` random classes, as a PNG."""
    coords, lab = tsne_embed(feats, labels, num_classes, per_class, seed)
    return plot_embedding(coords, lab, path, class_names, title)
