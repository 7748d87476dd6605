"""`evaluate_checkpoint`: every evaluation of one trained encoder, resumable, into eval.json.

Order: features of the train and test splits (cached, safetensors) → kNN → linear probe →
semi-supervised (each label fraction or split file) → transfer (each dataset) → t-SNE.
`eval.json` is rewritten atomically after each section; a re-run with the same checkpoint
and settings skips what is already there (features included), so an interrupted run resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from sasi_online.config import Config, DataConfig, EvalConfig, config_from_dict, parse_overrides
from sasi_online.errors import UserInputError
from sasi_online.eval.features import Features, extract_features, load_features, save_features
from sasi_online.eval.knn import knn_evaluate
from sasi_online.eval.linear import SgdProtocol, Standardizer, linear_probe, sgd_linear_probe
from sasi_online.eval.semi import (balanced_subset, fraction_label, match_split, read_split_file,
                                   split_file_label)
from sasi_online.utils import atomic_write_json, file_sha256

SCHEMA = 1
# Only these sections may be overridden at evaluation time: the model must stay as trained.
OVERRIDABLE = ("eval", "data")


def parse_transfer(spec: str) -> tuple[str, str]:
    """'cifar10:/data/cifar10' -> ('cifar10', '/data/cifar10'); 'fashion_mnist' -> (name, '')."""
    name, _, root = str(spec).partition(":")
    if not name.strip():
        raise UserInputError(f"transfer entry '{spec}' must look like DATASET:ROOT, e.g. cifar10:data/cifar10")
    return name.strip(), root.strip()


def _floats(values, key: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise UserInputError(f"{key} must be a list of numbers, got {values!r}") from None


def check_eval_config(ev: EvalConfig) -> None:
    """Refuse impossible evaluation settings before any image is read."""
    problems = []
    if ev.knn_k < 1:
        problems.append(f"eval.knn_k must be >= 1 (e.g. 200), got {ev.knn_k}")
    if ev.knn_t <= 0:
        problems.append(f"eval.knn_t must be > 0 (e.g. 0.07), got {ev.knn_t}")
    if not 0.0 < ev.crop_ratio <= 1.0:
        problems.append(f"eval.crop_ratio must be in (0, 1] (1.0 or 0.875), got {ev.crop_ratio}")
    for key in ("batch_size", "linear_max_iter"):
        if getattr(ev, key) < 1:
            problems.append(f"eval.{key} must be >= 1, got {getattr(ev, key)}")
    if ev.tsne_classes < 0 or ev.tsne_per_class < 1:
        problems.append("eval.tsne_classes must be >= 0 (0 skips the plot) and eval.tsne_per_class >= 1")
    if ev.linear not in ("lbfgs", "sgd"):
        problems.append(f"eval.linear must be lbfgs (fast probe) or sgd (the standard protocol), got '{ev.linear}'")
    if ev.linear == "sgd" and (ev.linear_epochs < 1 or ev.linear_batch_size < 1 or ev.linear_lr <= 0):
        problems.append("eval.linear=sgd needs eval.linear_epochs >= 1, eval.linear_batch_size >= 1 and "
                        f"eval.linear_lr > 0 (MoCo: 100, 256, 30.0), got {ev.linear_epochs}, "
                        f"{ev.linear_batch_size}, {ev.linear_lr}")
    decays = _floats(ev.linear_weight_decays, "eval.linear_weight_decays")
    if not decays or min(decays) < 0:
        problems.append(f"eval.linear_weight_decays must be a non-empty list of values >= 0, got {decays}")
    for fr in _floats(ev.semi_fractions, "eval.semi_fractions"):
        if not 0.0 < fr <= 1.0:
            problems.append(f"eval.semi_fractions entries must be in (0, 1], got {fr}")
    if problems:
        raise UserInputError("; ".join(problems))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"eval.device={name} but no CUDA device is visible; use eval.device=cpu")
    return torch.device(name)


def _normalisation(cfg: Config) -> tuple[tuple, tuple]:
    """The mean/std the encoder was trained with (its augmentation recipe's)."""
    try:
        from sasi_online.data.augment import load_recipe

        recipe = load_recipe(cfg.augment.recipe)
        return tuple(recipe.mean), tuple(recipe.std)
    except (ImportError, UserInputError) as exc:
        warnings.warn(f"using ImageNet mean/std for evaluation: the training recipe "
                      f"'{cfg.augment.recipe}' cannot be read ({exc})", stacklevel=2)
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def merge_overrides(cfg: Config, overrides: Sequence[str] | None) -> Config:
    """The checkpoint's config with `eval.*` / `data.*` overrides applied."""
    tree = parse_overrides(list(overrides or []))
    bad = sorted(set(tree) - set(OVERRIDABLE))
    if bad:
        raise UserInputError(f"at evaluation only {', '.join(s + '.*' for s in OVERRIDABLE)} can be "
                             f"overridden (the model is fixed by the checkpoint); got {', '.join(bad)}")
    values = cfg.to_dict()
    for section, items in tree.items():
        if not isinstance(items, dict):
            raise UserInputError(f"override '{section}' must name a key, e.g. {section}.KEY=VALUE")
        values[section].update(items)
    return config_from_dict(values)


class _Results:
    """eval.json on disk, rewritten after every section."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, None
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                if old.get("fingerprint") == header["fingerprint"] and old.get("schema") == SCHEMA:
                    self.data = old
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass
        if self.data is None:
            self.data = {**header, "results": {}, "complete": False}
        else:
            self.data.update({k: v for k, v in header.items() if k != "results"})
            # Sections may still be added (a new transfer set): until the run ends the file
            # must not claim to be complete, or an interruption now would go unnoticed.
            self.data["complete"] = False

    def has(self, *keys) -> bool:
        node = self.data["results"]
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return False
            node = node[k]
        return True

    def put(self, value, *keys) -> None:
        node = self.data["results"]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _num_classes(ds, *labels: torch.Tensor) -> int:
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes)
    return int(max(int(t.max()) for t in labels if len(t))) + 1


def _sasi_pair_rate(ckpt_file: Path) -> float | None:
    """The fraction of training samples paired with a SASI up to this checkpoint, over every
    trainer (their `client_rank*.json` beside it); None for a run that asked for none."""
    from collections import Counter

    from sasi_online.data.sasi_source import sasi_pair_rate

    outcomes: Counter = Counter()
    for client in sorted(Path(ckpt_file).parent.glob("client_rank*.json")):
        outcomes.update(json.loads(client.read_text(encoding="utf-8")).get("sasi_outcomes") or {})
    return sasi_pair_rate(outcomes)


def evaluate_checkpoint(checkpoint: str | Path, out_dir: str | Path | None = None,
                        overrides: Sequence[str] | None = None, transfer: Sequence[str] = (),
                        run_name: str | None = None) -> dict:
    """Evaluate one checkpoint; returns the eval.json contents (also written to OUT/eval.json)."""
    from sasi_online.data.datasets import build_dataset
    from sasi_online.eval.checkpoint_loader import load_encoder, resolve_checkpoint_file, run_folder
    from sasi_online.eval.tsne import plot_tsne

    ckpt_file = resolve_checkpoint_file(checkpoint)
    method, train_cfg = load_encoder(ckpt_file)
    cfg = merge_overrides(train_cfg, overrides)
    ev: EvalConfig = cfg.eval
    check_eval_config(ev)
    device = _device(ev.device)
    method.to(device)
    weight_decays = _floats(ev.linear_weight_decays, "eval.linear_weight_decays")
    fractions = _floats(ev.semi_fractions, "eval.semi_fractions")
    transfer_specs = [parse_transfer(s) for s in [*ev.transfer, *transfer]]
    mean, std = _normalisation(cfg)
    out = Path(out_dir) if out_dir else run_folder(ckpt_file) / "eval"
    out.mkdir(parents=True, exist_ok=True)

    ckpt_sha = file_sha256(ckpt_file)
    feature_key = {"checkpoint": ckpt_sha, "mean": mean, "std": std, "image_size": cfg.data.image_size,
                   "crop_ratio": ev.crop_ratio}
    # Transfer entries are left out: adding a dataset later keeps the results already there.
    fingerprint = hashlib.sha256(json.dumps(
        {**feature_key, "data": dataclasses.asdict(cfg.data),
         "eval": {k: v for k, v in dataclasses.asdict(ev).items() if k != "transfer"}},
        sort_keys=True, default=str).encode()).hexdigest()
    header = {"schema": SCHEMA, "run": run_name or run_folder(ckpt_file).name, "checkpoint": str(ckpt_file),
              "checkpoint_sha256": ckpt_sha, "fingerprint": fingerprint, "dataset": cfg.data.name,
              "method": cfg.method.name, "backbone": cfg.method.backbone,
              "pair_mode": cfg.train.pair_mode, "sasi_pair_rate": _sasi_pair_rate(ckpt_file),
              "eval": dataclasses.asdict(ev)}

    def open_split(data_cfg: DataConfig, split: str, transfer_name: str | None = None):
        # ImageNet-style folders have train/val, the array datasets train/test.
        candidates = ["test", "val"] if split == "auto" else [split]
        first_error = None
        for candidate in candidates:
            try:
                return build_dataset(data_cfg, candidate)
            except UserInputError as exc:
                first_error = first_error or exc
        if transfer_name is None:
            raise first_error
        raise UserInputError(f"transfer dataset '{transfer_name}:{data_cfg.root or ''}' ({split} "
                             f"split): {first_error}. Pass it as --transfer DATASET:ROOT") from None

    def same_images(a, b) -> bool:
        return len(a) == len(b) and all(a.relpath(i) == b.relpath(i) for i in range(min(3, len(a))))

    def features(ds, data_cfg: DataConfig, split: str, tag: str) -> Features:
        key = hashlib.sha256(json.dumps({**feature_key, "data": dataclasses.asdict(data_cfg),
                                         "split": split}, sort_keys=True, default=str).encode()).hexdigest()
        # Named by content, so a transfer set equal to the main one reuses its features.
        cache = out / "features" / f"{data_cfg.name}_{split}_{key[:12]}.safetensors"
        feats = load_features(cache, key)
        if feats is None:
            feats = extract_features(method, ds, cfg.data.image_size, mean, std, ev.batch_size,
                                     ev.crop_ratio, device, ev.num_workers, desc=f"{tag}/{split}")
            save_features(cache, feats, key)
        return feats

    # Open every dataset and split file first: a wrong path fails before any encoding.
    train_ds, test_ds = open_split(cfg.data, ev.train_split), open_split(cfg.data, ev.test_split)
    transfer_sets = []
    for name, root in transfer_specs:
        tcfg = dataclasses.replace(cfg.data, name=name, root=root or None)
        transfer_sets.append((name, root, tcfg, open_split(tcfg, ev.train_split, name),
                              open_split(tcfg, ev.test_split, name)))
    for name, a, b in [(cfg.data.name, train_ds, test_ds), *[(t[0], t[3], t[4]) for t in transfer_sets]]:
        if same_images(a, b):
            warnings.warn(f"{name}: the train and test splits hold the same images (a folder without "
                          "train/ and val/ subfolders?); accuracies will be optimistic", stacklevel=2)
    split_names = [(f, read_split_file(f)) for f in ev.semi_split_files]
    results = _Results(out / "eval.json", header)
    results.save()

    train = features(train_ds, cfg.data, train_ds.split, cfg.data.name)
    test = features(test_ds, cfg.data, test_ds.split, cfg.data.name)
    num_classes = _num_classes(train_ds, train.labels, test.labels)
    results.data.update({"feature_dim": int(train.feats.shape[1]), "train_size": len(train.labels),
                         "test_size": len(test.labels), "splits": [train_ds.split, test_ds.split]})
    dev = lambda t: t.to(device)  # noqa: E731

    if not results.has("knn"):
        results.put(knn_evaluate(dev(train.feats), dev(train.labels), dev(test.feats), dev(test.labels),
                                 k=ev.knn_k, t=ev.knn_t, num_classes=num_classes, center=ev.knn_center), "knn")
    if not results.has("linear") and ev.linear == "sgd":
        proto = SgdProtocol(ev.linear_epochs, ev.linear_lr, ev.linear_batch_size, seed=ev.seed,
                            num_workers=ev.num_workers)
        results.put(sgd_linear_probe(method, train_ds, test.feats, test.labels, num_classes, cfg.data.image_size,
                                     mean, std, proto, device, out / "linear_sgd_state.pt", fingerprint), "linear")
    elif not results.has("linear"):
        results.put({**linear_probe(dev(train.feats), dev(train.labels), dev(test.feats), test.labels,
                                    num_classes, weight_decays, ev.seed, ev.linear_max_iter),
                     "protocol": "lbfgs"}, "linear")

    # Semi-supervised: labelled subsets of the train split; features standardised with the
    # statistics of the whole (unlabelled) train split, which needs no labels.
    standardizer = Standardizer.fit(dev(train.feats))
    if ev.semi_split_files:
        relpaths = [train_ds.relpath(int(i)) for i in train.indices]
        subsets = []
        for f, names in split_names:
            idx, missing = match_split(names, relpaths, source=f"split file '{f}'")
            subsets.append((split_file_label(f), idx, {"split": str(f), "unmatched_names": missing}))
    else:
        subsets = [(fraction_label(fr), balanced_subset(train.labels.numpy(), fr, ev.seed),
                    {"split": f"class-balanced, seed {ev.seed}", "fraction": fr}) for fr in fractions]
    for label, idx, info in subsets:
        if results.has("semi", label):
            continue
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        res = linear_probe(dev(train.feats[idx_t]), dev(train.labels[idx_t]), dev(test.feats), test.labels,
                           num_classes, weight_decays, ev.seed, ev.linear_max_iter, standardizer=standardizer)
        results.put({**res, **info, "labelled": len(idx), "classifier": "linear (frozen features)"},
                    "semi", label)

    for name, root, tcfg, t_train_ds, t_test_ds in transfer_sets:
        if results.has("transfer", name) and results.data["results"]["transfer"][name].get("root") == root:
            continue
        t_train = features(t_train_ds, tcfg, t_train_ds.split, f"transfer_{name}")
        t_test = features(t_test_ds, tcfg, t_test_ds.split, f"transfer_{name}")
        res = linear_probe(dev(t_train.feats), dev(t_train.labels), dev(t_test.feats), t_test.labels,
                           _num_classes(t_train_ds, t_train.labels, t_test.labels), weight_decays,
                           ev.seed, ev.linear_max_iter)
        results.put({**res, "root": root}, "transfer", name)

    if ev.tsne_classes > 0 and not (results.data.get("tsne") and (out / "tsne.png").is_file()):
        plot_tsne(test.feats, test.labels, out / "tsne.png", getattr(test_ds, "classes", None),
                  ev.tsne_classes, ev.tsne_per_class, ev.seed,
                  title=f"{results.data['run']}: {cfg.method.name}, {cfg.data.name} test")
        results.data["tsne"] = "tsne.png"
    results.data["complete"] = True
    results.save()
    return {**results.data, "_path": str(results.path)}  # as report.load_eval returns it
