"""Linear probe on frozen features: standardised features, multinomial logistic regression.

The fit is full-batch L-BFGS (torch.optim.LBFGS with a strong-Wolfe line search) on an
L2-regularised cross-entropy. The problem is convex and starts from zero weights, so the
result does not depend on a seed or on batch order; the gradient is accumulated over
chunks so an ImageNet-size feature matrix fits on one device. The L2 strength is picked
from a small list on a seeded, class-balanced hold-out of the training features, then
the probe is refitted on all of them (the usual protocol: SimCLR, solo-learn).

`sgd_linear_probe` is the standard protocol instead (`eval.linear=sgd`, MoCo's lincls and
solo-learn's linear evaluation): a linear layer trained by SGD on the frozen backbone's
features of random-resized-crop + flip views, re-encoded every epoch, with a cosine
schedule; slower (a GPU job at ImageNet size), resumable after every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sasi_online.eval.metrics import topk_accuracy


@dataclass
class Standardizer:
    """Per-dimension mean/std fitted on features that need no labels (the whole train split)."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, feats: torch.Tensor, eps: float = 1e-6) -> "Standardizer":
        feats = feats.float()
        return cls(feats.mean(0), feats.std(0, unbiased=False).clamp_min(eps))

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float().to(self.mean.device) - self.mean) / self.std


@dataclass
class LinearClassifier:
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    weight_decay: float
    iterations: int

    def scores(self, feats: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        w, b = self.weight, self.bias
        return torch.cat([feats[i:i + chunk].to(w.device) @ w.T + b for i in range(0, len(feats), chunk)]) \
            if len(feats) else torch.zeros(0, len(b))


def fit_logistic(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = 200, chunk: int = 65536) -> LinearClassifier:
    """Minimise mean CE + weight_decay/2 * ||W||² over (W, b) with full-batch L-BFGS.

    `feats` should already be standardised. Deterministic: zero init, no sampling.
    """
    if len(feats) == 0:
        raise ValueError("cannot fit a linear probe on zero labelled features")
    feats = feats.float()
    labels = labels.long().to(feats.device)
    weight = torch.zeros(num_classes, feats.shape[1], device=feats.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=feats.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    n = len(feats)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=feats.device)
        for i in range(0, n, chunk):
            part = F.cross_entropy(feats[i:i + chunk] @ weight.T + bias, labels[i:i + chunk],
                                   reduction="sum") / n
            part.backward()
            total += part.detach()
        reg = 0.5 * weight_decay * weight.pow(2).sum()
        reg.backward()
        return total + reg.detach()

    opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))  # L-BFGS keeps its state on the first param
    return LinearClassifier(weight.detach(), bias.detach(), weight_decay, iterations)


def select_weight_decay(feats: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        candidates: list[float], seed: int, max_iter: int = 200,
                        holdout_fraction: float = 0.2) -> tuple[float, dict]:
    """Pick the L2 strength with the best top-1 on a class-balanced hold-out.

    Returns (weight_decay, {str(wd): holdout top-1}). With one candidate, or when some
    class has fewer than two examples (nothing to hold out), the middle candidate is used
    and the dict says why.
    """
    from sasi_online.eval.semi import balanced_subset
    from sasi_online.utils import derive_seed

    candidates = sorted(float(c) for c in candidates)
    if not candidates:
        raise ValueError("eval.linear_weight_decays is empty; give at least one value, e.g. [1e-3]")
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    present = counts[counts > 0]
    if len(candidates) == 1 or int(present.min()) < 2:
        return candidates[len(candidates) // 2], {"note": "no hold-out selection (one candidate or a class with < 2 examples)"}
    held = torch.as_tensor(balanced_subset(labels.cpu().numpy(), holdout_fraction, derive_seed("holdout", seed),
                                           min_per_class=1, max_fraction_per_class=0.5))
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    fit_x, fit_y = feats[mask.to(feats.device)], labels[mask.to(labels.device)]
    val_x, val_y = feats[held.to(feats.device)], labels[held.to(labels.device)]
    scores = {}
    for wd in candidates:
        clf = fit_logistic(fit_x, fit_y, num_classes, wd, max_iter=max_iter)
        scores[repr(wd)] = topk_accuracy(clf.scores(val_x), val_y, ks=(1,))["top1"]
    # Ties go to the stronger regulariser (more conservative).
    best = max(candidates, key=lambda wd: (scores[repr(wd)], wd))
    return best, scores


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, weight_decays: list[float],
                 seed: int = 0, max_iter: int = 200,
                 standardizer: Standardizer | None = None) -> dict:
    """Fit on (train_feats, train_labels), report top-1/top-5 on the test features (percent).

    `standardizer` defaults to one fitted on `train_feats`; semi-supervised evaluation
    passes one fitted on the whole (unlabelled) train split.
    """
    standardizer = standardizer or Standardizer.fit(train_feats)
    x_train, x_test = standardizer(train_feats), standardizer(test_feats)
    y_train = train_labels.long().to(x_train.device)
    wd, holdout = select_weight_decay(x_train, y_train, num_classes, weight_decays, seed, max_iter)
    clf = fit_logistic(x_train, y_train, num_classes, wd, max_iter=max_iter)
    return {**topk_accuracy(clf.scores(x_test), test_labels), "weight_decay": wd,
            "holdout_top1": holdout, "iterations": clf.iterations, "train_size": len(train_feats)}


# ----------------------------------------------------------------------------- SGD protocol
@dataclass
class SgdProtocol:
    """MoCo's / solo-learn's linear evaluation: `eval.linear=sgd`."""

    epochs: int = 100
    lr: float = 30.0
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    num_workers: int = 0


def train_transform(image_size: int, mean, std):
    """Random-resized-crop (area 8-100 %) + horizontal flip + normalise: the lincls recipe."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def _epoch_loader(train_ds, transform, proto: SgdProtocol, epoch: int, device: torch.device):
    """This epoch's batches: the order and every augmentation draw are functions of (seed, epoch),
    so a run resumed at epoch e sees exactly what the uninterrupted one saw."""
    from torch.utils.data import DataLoader

    from sasi_online.eval.features import _Clean, _collate
    from sasi_online.utils import derive_seed

    gen = torch.Generator().manual_seed(derive_seed("linear_sgd", proto.seed, epoch) % (1 << 62))
    return DataLoader(_Clean(train_ds, transform), batch_size=proto.batch_size, shuffle=True,
                      generator=gen, num_workers=proto.num_workers, collate_fn=_collate,
                      pin_memory=device.type == "cuda")


def _load_state(path, key: str):
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated state file is recomputed, never trusted
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _save_state(path, state: dict) -> None:
    import io

    from sasi_online.utils import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _new_layer(dim: int, num_classes: int, proto: SgdProtocol, steps: int, device: torch.device):
    """The layer (N(0, 0.01) weights drawn on the CPU from the seed, so every device starts
    from the same one; zero bias), its SGD and a cosine schedule over every step."""
    from sasi_online.utils import derive_seed

    layer = torch.nn.Linear(dim, num_classes, device="cpu", dtype=torch.float32)
    init = torch.Generator().manual_seed(derive_seed("linear_sgd_init", proto.seed) % (1 << 62))
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=init)
        layer.bias.zero_()
    layer = layer.to(device)
    opt = torch.optim.SGD(layer.parameters(), lr=proto.lr, momentum=proto.momentum,
                          weight_decay=proto.weight_decay)
    return layer, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def _train_epoch(encode, layer, opt, sched, loader, device: torch.device) -> float:
    """One pass; the mean loss is read back once, at the end (the epoch is the log step)."""
    total, seen = torch.zeros((), device=device), 0
    for batch in loader:
        if batch is None:  # every image of the batch was corrupt
            continue
        x, y, _ = batch
        with torch.no_grad():
            feats = encode(x.to(device, non_blocking=True)).float()
        loss = F.cross_entropy(layer(feats), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(y)
        seen += len(y)
    return float(total) / max(seen, 1)


def sgd_linear_probe(model: torch.nn.Module, train_ds, test_feats: torch.Tensor, test_labels: torch.Tensor,
                     num_classes: int, image_size: int, mean, std, proto: SgdProtocol,
                     device: str | torch.device = "cpu", state_path=None, key: str = "") -> dict:
    """Train a linear layer on the frozen backbone's features of augmented train images.

    The backbone stays in eval mode (BatchNorm on its running statistics) and under
    no_grad; only the layer learns (SGD + momentum, cosine over every step, N(0, 0.01)
    init, no feature normalisation, as MoCo's lincls). `test_feats` are the centre-crop
    features the suite already extracted: the frozen backbone gives the same ones again.
    With `state_path` the layer, optimizer and schedule are saved after every epoch and a
    re-run with the same `key` resumes after the last finished epoch.
    """
    from tqdm.auto import tqdm

    from sasi_online.eval.features import encoder_fn
    from sasi_online.utils import derive_seed

    device = torch.device(device)
    if len(train_ds) == 0:
        raise ValueError("cannot train a linear layer on an empty train split")
    steps = proto.epochs * -(-len(train_ds) // proto.batch_size)
    layer, opt, sched = _new_layer(test_feats.shape[1], num_classes, proto, steps, device)
    start, losses = 0, []
    state = _load_state(state_path, key)
    if state is not None:
        layer.load_state_dict(state["layer"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, losses = int(state["epoch"]), list(state["losses"])
    was_training = model.training
    model.eval()
    encode, transform = encoder_fn(model), train_transform(image_size, mean, std)
    try:
        for epoch in tqdm(range(start, proto.epochs), desc="linear (sgd)", unit="epoch", leave=False,
                          initial=start, total=proto.epochs):
            with torch.random.fork_rng(devices=[]):  # augmentation draws in this process
                torch.manual_seed(derive_seed("linear_sgd_aug", proto.seed, epoch) % (1 << 62))
                loader = _epoch_loader(train_ds, transform, proto, epoch, device)
                losses.append(_train_epoch(encode, layer, opt, sched, loader, device))
            if state_path is not None:
                _save_state(state_path, {"key": key, "epoch": epoch + 1, "losses": losses,
                                         "layer": layer.state_dict(), "optimizer": opt.state_dict(),
                                         "scheduler": sched.state_dict()})
    finally:
        model.train(was_training)
    with torch.no_grad():
        scores = layer(test_feats.to(device).float())
    return {**topk_accuracy(scores, test_labels), "protocol": "sgd", "epochs": proto.epochs, "lr": proto.lr,
            "batch_size": proto.batch_size, "momentum": proto.momentum, "weight_decay": proto.weight_decay,
            "train_losses": losses, "train_size": len(train_ds)}
