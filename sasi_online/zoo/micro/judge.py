"""The judge of the micro set's SASI: a small classifier, trained in seconds on the embedded
train split, that reads the Fashion-MNIST class of a picture (a real image or a SASI), and
SASI made from the embedded test split by the project's own offline generation
(`generate_store`, what `sasi generate` runs) for it to read."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

JUDGE_SIZE = 28  # the side the judge reads at (Fashion-MNIST's own)


def judge_input(images: Sequence[Any]):
    """(N, 1, 28, 28) float tensor in [0, 1]: each picture (PIL, HxW or HxWx3 uint8) in grey,
    area-resized to 28 px (a 64 px SASI lands where a real image is)."""
    import torch
    from PIL import Image

    out = np.empty((len(images), JUDGE_SIZE, JUDGE_SIZE), np.float32)
    for i, im in enumerate(images):
        pil = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        pil = pil.convert("L")
        if pil.size != (JUDGE_SIZE, JUDGE_SIZE):
            pil = pil.resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX)
        out[i] = np.asarray(pil, np.float32) / 255.0
    return torch.from_numpy(out).unsqueeze(1)


def _net():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 7 * 7, 10))


def _augment(x, gen):
    """Shifts of up to 2 px, gain 0.7-1.3 and, for half the batch, a light blur: what a
    faithful SASI may change without changing the garment."""
    import torch
    import torch.nn.functional as F

    n = len(x)
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, (dy, dx), dims=(2, 3))
    x = x * torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
    blur = torch.rand(n, 1, 1, 1, generator=gen) < 0.5
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    return x.clamp(0, 1)


@dataclasses.dataclass
class Judge:
    net: Any

    def classes(self, images: Sequence[Any], batch_size: int = 250) -> np.ndarray:
        """The class the judge reads in each picture."""
        import torch

        x = judge_input(images)
        self.net.eval()
        with torch.inference_mode():
            out = [self.net(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.int64)

    def accuracy(self, images: Sequence[Any], labels: Sequence[int]) -> float:
        return float(np.mean(self.classes(images) == np.asarray(labels)))


def train_judge(images: np.ndarray, labels: np.ndarray, seed: int = 0, epochs: int = 12,
                batch_size: int = 64, lr: float = 3e-3) -> Judge:
    """A small CNN trained on `images` (N x 28 x 28 uint8): seeded, a few seconds on one thread."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = _net()
    x, y = judge_input(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return Judge(net.eval())


# ---------------------------------------------------------------- SASI, as `sasi generate` makes them

def sasi_config(zoo: str | Path, *, steps: int = 10, strength: float = 0.5, text: str = "model",
                seed: int = 0, batch_size: int = 25, **generation: Any):
    """The default config with the embedded test split and `zoo` as models.root."""
    from sasi_online.config import Config

    cfg = Config()
    cfg.models.root = str(zoo)
    cfg.data.name, cfg.data.split = "fashion_mnist", "test"
    gen = dict(steps=steps, strength=strength, text=text, seed=seed, batch_size=batch_size, **generation)
    cfg.generation = dataclasses.replace(cfg.generation, **gen)
    return cfg


def make_sasi(zoo: str | Path, kind: str, limit: int = 200, store: Optional[str | Path] = None,
              **settings: Any) -> dict:
    """SASI of the first `limit` embedded test images, VP `kind` (image, mask, mix, noise),
    generated into a store (`store`, or a temporary one) and read back from it.
    Returns {"images": [HxWx3 uint8], "labels", "prompts" (the rewrites), "indices"}."""
    from sasi_online.data.store import SasiStore
    from sasi_online.generation.offline import generate_store
    from sasi_online.zoo.micro.data import embedded_split

    cfg = sasi_config(zoo, **settings)
    with tempfile.TemporaryDirectory(prefix="sasi-judge-") as tmp:
        path = Path(store) if store is not None else Path(tmp) / "store"
        generate_store(cfg, path, kind=kind, limit=limit, progress=False)
        with SasiStore.open(path) as st:
            kept = [i for i in range(limit) if st.record(i, 0) is not None and st.get(i, 0) is not None]
            images = [np.asarray(st.get(i, 0).convert("RGB")) for i in kept]
            prompts = [st.record(i, 0).rewrite for i in kept]
    labels = embedded_split("test")[1][kept]
    return {"images": images, "labels": labels, "prompts": prompts, "indices": kept}


def sasi_accuracy(judge: Judge, zoo: str | Path, kind: str, limit: int = 200, **settings: Any) -> dict:
    """Share of SASI (VP `kind`) whose class the judge reads as their real image's class;
    SASI that failed count as misread."""
    made = make_sasi(zoo, kind, limit, **settings)
    read = judge.classes(made["images"]) if made["images"] else np.zeros(0, np.int64)
    hits = int((read == made["labels"]).sum())
    return {"accuracy": hits / limit, "read": read, **made}


def visual_prompts(zoo: str | Path, kind: str, indices: Sequence[int], **settings: Any) -> list:
    """The visual prompts `make_sasi` used for these test images (variant 0), built again by
    the same functions (for grids: real | visual prompt | SASI)."""
    from sasi_online.data.datasets import build_dataset
    from sasi_online.visual.prompts import build_visual_prompts
    from sasi_online.visual.segmenter import Segmenter

    cfg = sasi_config(zoo, **settings)
    vcfg = dataclasses.replace(cfg.visual, kind=kind)
    ds = build_dataset(cfg.data)
    segmenter = Segmenter.from_config(cfg.models, vcfg) if kind in ("mask", "mix") else None
    return build_visual_prompts([ds[int(i)].image for i in indices], list(indices), [0] * len(indices), cfg=vcfg,
                                resolution=cfg.generation.resolution, base_seed=cfg.generation.seed,
                                segmenter=segmenter, semantic_variants=cfg.semantics.variants)
