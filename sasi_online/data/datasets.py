"""Index-addressed datasets: one small contract every later stage uses.

A dataset maps an index to a `Sample` (RGB image, label, relative path). The
relative path is the folder-tree location a SASI store mirrors, so a person can
browse synthetic images next to the dataset's own layout. Nothing downloads:
the embedded Fashion-MNIST subset ships with the package, every other dataset is
read in its native on-disk format from a folder the user names.
"""
from __future__ import annotations

import abc
import difflib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from sasi_online.config import DataConfig
from sasi_online.data import formats
from sasi_online.errors import CorruptImageError, UserInputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass
class Sample:
    index: int
    image: Image.Image  # RGB
    label: int  # -1 when unlabeled (STL-10 unlabeled split)
    relpath: str  # e.g. "train/3_dress/000123": folder-tree path, no extension


def slug(text: str) -> str:
    """A class name as a folder-name fragment: 'T-shirt/top' → 't_shirt_top'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "class"


class IndexedDataset(abc.ABC):
    """Random access by index. Subclasses implement `_load` (and may override `relpath`)."""

    name: str
    split: str
    classes: list[str]

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """All labels as int64 (N,), without decoding any image."""

    @abc.abstractmethod
    def _load(self, index: int) -> Image.Image: ...

    def relpath(self, index: int) -> str:
        index = self._check(index)
        label = int(self.labels()[index])
        folder = f"{label}_{slug(self.classes[label])}" if label >= 0 else "unlabeled"
        width = max(6, len(str(len(self) - 1)))
        return f"{self.split}/{folder}/{index:0{width}d}"

    def _check(self, index) -> int:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {self.name}/{self.split} ({len(self)} images)")
        return i

    def __getitem__(self, index: int) -> Sample:
        i = self._check(index)
        return Sample(index=i, image=self._load(i), label=int(self.labels()[i]), relpath=self.relpath(i))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}/{self.split}, {len(self)} images, {len(self.classes)} classes)"


class ArrayDataset(IndexedDataset):
    """Images held as an array (or memmap) of HWC uint8, or anything `to_hwc` turns into one."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray,
                 classes: list[str], to_hwc: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        if len(images) != len(labels):
            raise UserInputError(f"{name}/{split}: {len(images)} images but {len(labels)} labels")
        self.name, self.split, self.classes = name, split, list(classes)
        self._images = images
        self._labels = np.asarray(labels, dtype=np.int64)
        self._labels.setflags(write=False)
        if self._labels.size and self._labels.max() >= len(self.classes):
            raise UserInputError(
                f"{name}/{split}: labels go up to {int(self._labels.max())} but only {len(self.classes)} "
                f"class names are known ({self.classes[:3]}...); the label and class-name files do not "
                f"match, re-extract the dataset")
        self._to_hwc = to_hwc

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels

    def _load(self, index: int) -> Image.Image:
        arr = self._images[index]
        arr = self._to_hwc(arr) if self._to_hwc else np.asarray(arr)
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")  # grey (H, W) → RGB too


class LimitedDataset(IndexedDataset):
    """The first `limit` images of another dataset; indices and paths unchanged."""

    def __init__(self, base: IndexedDataset, limit: int):
        if limit < 1:
            raise UserInputError(f"data.limit must be >= 1 (got {limit}); leave it unset to use all images")
        self.base = base
        self.name, self.split, self.classes = base.name, base.split, base.classes
        self._n = min(limit, len(base))

    def __len__(self) -> int:
        return self._n

    def labels(self) -> np.ndarray:
        return self.base.labels()[: self._n]

    def _load(self, index: int) -> Image.Image:
        return self.base._load(index)

    def relpath(self, index: int) -> str:
        return self.base.relpath(self._check(index))


class ImageFolderDataset(IndexedDataset):
    """Image files with labels: class-folder trees (ImageNet-100, Tiny-ImageNet train,
    ImageNet-Sketch) via `from_class_tree`, or an annotation file (Tiny-ImageNet val)
    via `from_annotations`. `relpath` is an image's path under `tree_root`, no extension.
    """

    def __init__(self, paths: list[Path], labels: list[int], classes: list[str], split: str,
                 name: str, tree_root: Path):
        if not paths:
            raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found for {name}/{split} under '{tree_root}'")
        self.name, self.split, self.classes = name, split, list(classes)
        self.tree_root = Path(tree_root)
        self.paths = list(paths)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._labels.setflags(write=False)

    @classmethod
    def from_class_tree(cls, folder: Path, split: str, name: str = "imagefolder",
                        tree_root: Optional[Path] = None) -> "ImageFolderDataset":
        """Classes are the sorted first-level folders; images are found recursively
        (Tiny-ImageNet keeps them in `<class>/images/`) in torchvision's ImageFolder
        order, so indices are stable and agree with it (hidden files are skipped)."""
        folder = Path(folder)
        class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not class_dirs:
            raise UserInputError(
                f"'{folder}' holds no class folders; an image-folder dataset is laid out as "
                f"<root>/<split>/<class>/<image>.jpg (or <root>/<class>/<image>.jpg)"
            )
        paths, labels = [], []
        for label, d in enumerate(class_dirs):
            for dirpath, _, filenames in sorted(os.walk(d, followlinks=True)):
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                        paths.append(Path(dirpath) / fn)
                        labels.append(label)
        return cls(paths, labels, [d.name for d in class_dirs], split, name, tree_root or folder)

    @classmethod
    def from_annotations(cls, folder: Path, annotations: Path, classes: list[str], split: str,
                         name: str, tree_root: Path) -> "ImageFolderDataset":
        """Tiny-ImageNet's val layout: `images/<file>` plus tab-separated lines `<file> <class> ...`."""
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        for n, line in enumerate(annotations.read_text().splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise UserInputError(
                    f"'{annotations}' line {n} names class '{parts[1]}', which is not among the "
                    f"{len(classes)} classes of the train split; use the matching train folder"
                )
            paths.append(folder / "images" / parts[0])
            labels.append(index[parts[1]])
        order = sorted(range(len(paths)), key=lambda i: paths[i].name)
        return cls([paths[i] for i in order], [labels[i] for i in order], classes, split, name, tree_root)

    def __len__(self) -> int:
        return len(self.paths)

    def labels(self) -> np.ndarray:
        return self._labels

    def path(self, index: int) -> Path:
        return self.paths[self._check(index)]

    def relpath(self, index: int) -> str:
        rel = self.path(index).relative_to(self.tree_root)
        return rel.with_suffix("").as_posix()

    def _load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.load()  # decode now: a truncated file fails here, not later
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            err = CorruptImageError(
                f"image '{path}' (index {index}) cannot be decoded: {exc}. Replace or delete the "
                f"file, or keep data.strict=false to skip unreadable images."
            )
            err.path = str(path)  # for callers that count or list skipped files
            raise err from exc


# ----------------------------------------------------------------------------- loaders
def _require(folder: Path, files: Iterable[str], what: str, hint: str) -> None:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserInputError(
            f"{what}: expected {', '.join(missing)} in '{folder}' but they are missing. {hint} "
            f"Nothing is downloaded: put the dataset's own files there and set data.root."
        )


def _dataset_dir(root: Path, subdir: str) -> Path:
    """Accept either the parent folder (as torchvision's `root`) or the format folder itself."""
    return root / subdir if (root / subdir).is_dir() else root


def _check_split(name: str, split: str, valid: Iterable[str]) -> None:
    valid = list(valid)
    if split not in valid:
        raise UserInputError(f"{name} has no split '{split}'; use data.split = one of {', '.join(valid)}")


FASHION_MNIST_HOLDOUT = 400  # the embedded train split's last images, the `holdout` split


def load_fashion_mnist(split: str, root: Optional[str] = None) -> ArrayDataset:
    """The embedded subset's `train` (2,000) or `test` (500) images; `holdout`: the last 400
    train images (train on data.limit <= 1600 to keep them unseen); or `test_full`: the
    official 10,000-image test split (never seen by the embedded subset's models or runs),
    read from `root` (default: where `apt-get install dataset-fashion-mnist` puts it)."""
    _check_split("fashion_mnist", split, ("train", "test", "test_full", "holdout"))
    if split == "test_full":
        from sasi_online.data.idx import DEFAULT_DATA, load_split

        images, labels = load_split(root or DEFAULT_DATA, "test")
        return ArrayDataset("fashion_mnist", split, images, labels, FASHION_MNIST_CLASSES)
    ref = resources.files("sasi_online") / "assets" / "fashion_mnist" / "subset.npz"
    stored = "train" if split == "holdout" else split
    with resources.as_file(ref) as path, np.load(path) as npz:
        images, labels = npz[f"{stored}_images"], npz[f"{stored}_labels"]
    if split == "holdout":  # for choosing recipes without the test split: train with data.limit <= 1600
        images, labels = images[-FASHION_MNIST_HOLDOUT:], labels[-FASHION_MNIST_HOLDOUT:]
    return ArrayDataset("fashion_mnist", split, images, labels, FASHION_MNIST_CLASSES)


def load_cifar10(root: Path, split: str) -> ArrayDataset:
    _check_split("cifar10", split, CIFAR10_FILES)
    folder = _dataset_dir(root, "cifar-10-batches-py")
    files = CIFAR10_FILES[split]
    _require(folder, files + ["batches.meta"], "CIFAR-10",
             "Extract cifar-10-python.tar.gz so that cifar-10-batches-py/ is under data.root.")
    images, labels = formats.read_cifar_batches([folder / f for f in files], "labels")
    classes = formats.read_cifar_meta(folder / "batches.meta", "label_names")
    return ArrayDataset("cifar10", split, images, labels, classes)


def load_cifar100(root: Path, split: str) -> ArrayDataset:
    _check_split("cifar100", split, ("train", "test"))
    folder = _dataset_dir(root, "cifar-100-python")
    _require(folder, [split, "meta"], "CIFAR-100",
             "Extract cifar-100-python.tar.gz so that cifar-100-python/ is under data.root.")
    images, labels = formats.read_cifar_batches([folder / split], "fine_labels")
    classes = formats.read_cifar_meta(folder / "meta", "fine_label_names")
    return ArrayDataset("cifar100", split, images, labels, classes)


def load_stl10(root: Path, split: str) -> ArrayDataset:
    _check_split("stl10", split, ("train", "test", "unlabeled"))
    folder = _dataset_dir(root, "stl10_binary")
    files = [f"{split}_X.bin"] + ([] if split == "unlabeled" else [f"{split}_y.bin"])
    _require(folder, files, "STL-10", "Extract stl10_binary.tar.gz so that stl10_binary/ is under data.root.")
    images = formats.open_stl10_images(folder / f"{split}_X.bin")
    if split == "unlabeled":
        labels = np.full(len(images), -1, dtype=np.int64)
    else:
        labels = formats.read_stl10_labels(folder / f"{split}_y.bin")
    classes = STL10_CLASSES
    names_file = folder / "class_names.txt"
    if names_file.is_file():
        classes = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()] or classes
    return ArrayDataset("stl10", split, images, labels, classes, to_hwc=formats.stl10_to_hwc)


_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def load_imagefolder(root: Path, split: str, name: str = "imagefolder") -> ImageFolderDataset:
    if not root.is_dir():
        raise UserInputError(
            f"image folder '{root}' does not exist; expected <root>/<split>/<class>/<image> "
            f"(e.g. {root}/{split}/n01440764/x.JPEG) or <root>/<class>/<image>"
        )
    split_dir = root / split
    if split_dir.is_dir() and (split_dir / "val_annotations.txt").is_file():
        # Tiny-ImageNet val: one images/ folder; labels use the train split's class order
        if (root / "train").is_dir():
            classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
        elif (root / "wnids.txt").is_file():
            classes = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
        else:
            raise UserInputError(
                f"'{split_dir}' is labelled by val_annotations.txt, but neither '{root / 'train'}' nor "
                f"'{root / 'wnids.txt'}' exists to give the class order; extract the whole dataset"
            )
        return ImageFolderDataset.from_annotations(split_dir, split_dir / "val_annotations.txt", classes,
                                                   split, name, root)
    if split_dir.is_dir():
        return ImageFolderDataset.from_class_tree(split_dir, split, name=name, tree_root=root)
    present = [s for s in _SPLIT_NAMES if (root / s).is_dir()]
    if present:
        raise UserInputError(
            f"'{root}' has split folders {', '.join(present)} but no '{split}'; set data.split to one of them"
        )
    return ImageFolderDataset.from_class_tree(root, split, name=name, tree_root=root)


_LOADERS = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "stl10": load_stl10,
    "imagefolder": load_imagefolder,
    "imagenet100": load_imagefolder,
    "tiny_imagenet": load_imagefolder,
    "imagenet_sketch": load_imagefolder,
}
DATASET_NAMES = ("fashion_mnist", *_LOADERS)


def build_dataset(cfg: DataConfig, split: str | None = None) -> IndexedDataset:
    """The dataset `cfg` names, at `split` (default `cfg.split`), cut to `cfg.limit`."""
    split = split or cfg.split
    name = cfg.name.lower()
    if name == "fashion_mnist":
        ds: IndexedDataset = load_fashion_mnist(split, cfg.root)
    elif name in _LOADERS:
        if not cfg.root:
            raise UserInputError(
                f"data.name={cfg.name} reads from disk: set data.root to the folder holding it "
                f"(only fashion_mnist is embedded)"
            )
        loader = _LOADERS[name]
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise UserInputError(f"data.root '{root}' does not exist; point it at the folder holding {cfg.name}")
        ds = loader(root, split, name) if loader is load_imagefolder else loader(root, split)
    else:
        close = difflib.get_close_matches(name, DATASET_NAMES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserInputError(f"unknown dataset data.name='{cfg.name}'.{hint} Known: {', '.join(DATASET_NAMES)}")
    if cfg.limit is not None:
        ds = LimitedDataset(ds, cfg.limit)
    return ds


# ----------------------------------------------------------------------------- iteration
@dataclass
class IterStats:
    """What `iter_samples` saw: images yielded and corrupt files skipped."""

    yielded: int = 0
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)


def iter_samples(ds: IndexedDataset, indices: Iterable[int], strict: bool = False,
                 stats: Optional[IterStats] = None) -> Iterator[Sample]:
    """Yield `ds[i]` for each index; a corrupt image is skipped with a warning naming the
    file and counted in `stats`, or raised when `strict`."""
    for i in indices:
        try:
            sample = ds[i]
        except CorruptImageError as exc:
            if strict:
                raise
            if stats is not None:
                stats.skipped += 1
                stats.skipped_files.append(getattr(exc, "path", f"index {i}"))
            log.warning("skipping corrupt image: %s", exc)
            warnings.warn(f"skipping corrupt image: {exc}", stacklevel=2)
            continue
        if stats is not None:
            stats.yielded += 1
        yield sample
