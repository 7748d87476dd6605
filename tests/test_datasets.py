"""Datasets read from native on-disk fixtures written here, and the embedded subset."""
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from sasi_online.config import DataConfig
from sasi_online.data.datasets import IterStats, build_dataset, iter_samples
from sasi_online.data.formats import UnsafePickleError, restricted_load
from sasi_online.errors import CorruptImageError, UserInputError


def _py2_style_cifar_pickle(data: np.ndarray, labels: list[int], label_key: str) -> bytes:
    """A batch pickled the way the published CIFAR files are: Python 2 `str` opcodes and
    the old `numpy.core.multiarray` path (which Python 3's pickler no longer writes)."""
    def s(text: str) -> bytes:  # SHORT_BINSTRING: a Python 2 str
        b = text.encode("latin1")
        return b"U" + bytes([len(b)]) + b
    def i1(v: int) -> bytes:
        return b"K" + bytes([v])
    n, d = data.shape
    raw = data.astype(np.uint8).tobytes()
    out = b"\x80\x02}(" + s("data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i1(0) + b"\x85" + s("b") + b"\x87R"
    out += b"(" + i1(1) + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d) + b"\x86"
    out += b"cnumpy\ndtype\n" + s("u1") + i1(0) + i1(1) + b"\x87R"
    out += b"(" + i1(3) + s("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + i1(0) + b"tb"
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    out += s(label_key) + b"](" + b"".join(i1(v) for v in labels) + b"e"
    out += s("batch_label") + s("training batch 1 of 5") + b"u."
    return out


def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _flat(images):  # HWC → the file's row layout: 1024 R, 1024 G, 1024 B
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


@pytest.fixture
def cifar10_root(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = _cifar_images(rng, 3)
        labels = rng.integers(0, 10, size=3).tolist()
        if name == "data_batch_1":  # one file as the published Python 2 pickles are
            blob = _py2_style_cifar_pickle(_flat(imgs), labels, "labels")
        else:
            blob = pickle.dumps({"data": _flat(imgs), "labels": labels, "batch_label": name}, protocol=2)
        (folder / name).write_bytes(blob)
        split = "test" if name == "test_batch" else "train"
        expected[split][0].append(imgs)
        expected[split][1].extend(labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))
    return tmp_path, {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in expected.items()}


def test_cifar10_round_trip_including_python2_pickle(cifar10_root):
    root, expected = cifar10_root
    for split in ("train", "test"):
        ds = build_dataset(DataConfig(name="cifar10", root=str(root), split=split))
        images, labels = expected[split]
        assert len(ds) == len(images)
        np.testing.assert_array_equal(ds.labels(), labels)
        for i in range(len(ds)):
            s = ds[i]
            assert s.image.mode == "RGB" and s.label == labels[i] and s.index == i
            np.testing.assert_array_equal(np.asarray(s.image), images[i])
    assert ds.classes[1] == "automobile"
    s = ds[2]
    assert s.relpath == f"test/{s.label}_{ds.classes[s.label]}/000002"
    # the format folder itself is accepted as root too
    assert len(build_dataset(DataConfig(name="cifar10", root=str(root / "cifar-10-batches-py")))) == 15


def test_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = _cifar_images(rng, 4)
    fine = [0, 99, 42, 7]
    (folder / "train").write_bytes(pickle.dumps(
        {"data": _flat(imgs), "fine_labels": fine, "coarse_labels": [0, 19, 5, 3]}, protocol=2))
    (folder / "test").write_bytes(_py2_style_cifar_pickle(_flat(imgs[:2]), fine[:2], "fine_labels"))
    names = [f"class_{i}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": []}, protocol=2))
    ds = build_dataset(DataConfig(name="cifar100", root=str(tmp_path), split="train"))
    np.testing.assert_array_equal(ds.labels(), fine)
    np.testing.assert_array_equal(np.asarray(ds[3].image), imgs[3])
    assert ds.relpath(1) == "train/99_class_99/000001"
    test = build_dataset(DataConfig(name="cifar100", root=str(tmp_path), split="test"))
    np.testing.assert_array_equal(np.asarray(test[1].image), imgs[1])


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({"data": _Evil(f"touch {marker}"), "labels": [0]}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        restricted_load(evil)
    assert not marker.exists()
    # builtins beyond plain containers (eval, getattr, __import__) are refused as well
    sneaky = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    (tmp_path / "b").write_bytes(sneaky)
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_load(tmp_path / "b")
    # and through the dataset loader, the error names the file
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]:
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(evil.read_bytes())
    with pytest.raises(UnsafePickleError, match="data_batch_1"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()


def test_stl10_column_major_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    imgs = rng.integers(0, 256, size=(3, 96, 96, 3), dtype=np.uint8)
    imgs[0, 0, :, 0] = 255  # a red top row: catches a row/column swap
    imgs[0, 1:, :, 0] = 0
    # the format stores each channel column by column
    imgs.transpose(0, 3, 2, 1).tofile(folder / "train_X.bin")
    np.array([1, 10, 4], dtype=np.uint8).tofile(folder / "train_y.bin")
    imgs[:2].transpose(0, 3, 2, 1).tofile(folder / "unlabeled_X.bin")
    ds = build_dataset(DataConfig(name="stl10", root=str(tmp_path), split="train"))
    np.testing.assert_array_equal(ds.labels(), [0, 9, 3])  # 1-based on disk
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(ds[i].image), imgs[i])
    top = np.asarray(ds[0].image)[..., 0]
    assert (top[0] == 255).all() and (top[1:] == 0).all()
    assert ds.relpath(1) == "train/9_truck/000001"
    unl = build_dataset(DataConfig(name="stl10", root=str(tmp_path), split="unlabeled"))
    assert len(unl) == 2 and unl[1].label == -1 and unl[1].relpath == "unlabeled/unlabeled/000001"
    (folder / "class_names.txt").write_text("airplane\nbird\n")  # fewer names than labels
    with pytest.raises(UserInputError, match="labels go up to 9 but only 2 class names"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path), split="train"))
    (folder / "class_names.txt").unlink()
    (folder / "test_X.bin").write_bytes(b"\0" * 100)
    (folder / "test_y.bin").write_bytes(b"\1")
    with pytest.raises(UserInputError, match="truncated"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path), split="test"))
    (folder / "test_X.bin").write_bytes(b"")
    with pytest.raises(UserInputError, match="truncated"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path), split="test"))


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "imagenet100"
    arrays = {}
    for cls in ("n02", "n01"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for k in range(2):
            arr = rng.integers(0, 256, size=(10 + k, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{cls}_{k}.png")
            arrays[f"train/{cls}/{cls}_{k}"] = arr
        (d / "notes.txt").write_text("not an image")
    # a grey JPEG nested like Tiny-ImageNet's <class>/images/ and a corrupt file
    (root / "train" / "n01" / "images").mkdir()
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(root / "train" / "n01" / "images" / "a.jpg")
    (root / "train" / "n02" / "n02_9.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root, arrays


def test_imagefolder_layout_labels_and_images(image_tree):
    root, arrays = image_tree
    ds = build_dataset(DataConfig(name="imagenet100", root=str(root), split="train"))
    assert ds.classes == ["n01", "n02"]
    assert len(ds) == 6  # notes.txt ignored, nested image found
    rel = [ds.relpath(i) for i in range(len(ds))]
    assert rel[:3] == ["train/n01/n01_0", "train/n01/n01_1", "train/n01/images/a"]
    from torchvision.datasets import ImageFolder  # same index order as the reference
    ref = ImageFolder(str(root / "train"))
    assert [os.path.splitext(p)[0] for p, _ in ref.samples] == [str(root / r) for r in rel]
    np.testing.assert_array_equal(ds.labels(), [0, 0, 0, 1, 1, 1])
    for i, r in enumerate(rel):
        if r in arrays:
            s = ds[i]
            np.testing.assert_array_equal(np.asarray(s.image), arrays[r])
            assert s.relpath == r and s.label == (0 if "n01" in r else 1)
    grey = ds[2].image
    assert grey.mode == "RGB" and grey.size == (8, 8)
    with pytest.raises(UserInputError, match="no 'val'"):
        build_dataset(DataConfig(name="imagefolder", root=str(root), split="val"))
    # a class tree without split folders is used as it is
    assert len(build_dataset(DataConfig(name="imagefolder", root=str(root / "train")))) == 6


def test_tiny_imagenet_val_annotations_use_train_class_order(image_tree):
    root, _ = image_tree
    val = root / "val"
    (val / "images").mkdir(parents=True)
    colours = {"val_0.png": 10, "val_1.png": 200}
    for fn, v in colours.items():
        Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(val / "images" / fn)
    (val / "val_annotations.txt").write_text("val_1.png\tn01\t0\t0\t5\t5\nval_0.png\tn02\t0\t0\t5\t5\n")
    ds = build_dataset(DataConfig(name="tiny_imagenet", root=str(root), split="val"))
    assert ds.classes == ["n01", "n02"] and len(ds) == 2
    assert [ds.relpath(i) for i in range(2)] == ["val/images/val_0", "val/images/val_1"]
    np.testing.assert_array_equal(ds.labels(), [1, 0])
    assert np.asarray(ds[1].image)[0, 0, 0] == 200
    (val / "val_annotations.txt").write_text("val_0.png\tn99\t0\t0\t5\t5\n")
    with pytest.raises(UserInputError, match="n99"):
        build_dataset(DataConfig(name="tiny_imagenet", root=str(root), split="val"))


def test_corrupt_image_skipped_and_counted_or_strict(image_tree):
    root, _ = image_tree
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root), split="train"))
    bad = [ds.relpath(i) for i in range(len(ds))].index("train/n02/n02_9")
    with pytest.raises(CorruptImageError, match="n02_9.jpg"):
        ds[bad]
    stats = IterStats()
    with pytest.warns(UserWarning, match="n02_9.jpg"):
        got = list(iter_samples(ds, range(len(ds)), strict=False, stats=stats))
    assert [s.index for s in got] == [i for i in range(len(ds)) if i != bad]
    assert stats.skipped == 1 and stats.yielded == 5 and stats.skipped_files[0].endswith("n02_9.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict raises before any warning
        with pytest.raises(CorruptImageError, match="n02_9.jpg"):
            list(iter_samples(ds, range(len(ds)), strict=True))


def test_embedded_fashion_mnist_sizes_labels_and_limit():
    train = build_dataset(DataConfig())
    test = build_dataset(DataConfig(), split="test")
    assert (len(train), len(test)) == (2000, 500)
    assert np.bincount(train.labels()).tolist() == [200] * 10
    assert np.bincount(test.labels()).tolist() == [50] * 10
    from importlib import resources
    with resources.as_file(resources.files("sasi_online") / "assets/fashion_mnist/subset.npz") as p:
        raw = np.load(p)["train_images"][123]
    s = train[123]
    arr = np.asarray(s.image)
    assert s.image.mode == "RGB" and arr.shape == (28, 28, 3)
    for c in range(3):  # grey copied into every channel
        np.testing.assert_array_equal(arr[..., c], raw)
    assert s.relpath == "train/2_pullover/000123"  # a pullover, class 2 of Fashion-MNIST
    assert train.relpath(train.labels().tolist().index(0)).split("/")[1] == "0_t_shirt_top"
    assert test[499].relpath.startswith("test/") and test[499].relpath.endswith("/000499")
    limited = build_dataset(DataConfig(limit=7))
    assert len(limited) == 7 and limited.relpath(6) == train.relpath(6)
    np.testing.assert_array_equal(limited.labels(), train.labels()[:7])
    with pytest.raises(IndexError):
        limited[7]


def test_missing_or_misnamed_datasets_explain_the_fix(tmp_path):
    with pytest.raises(UserInputError, match=r"data_batch_1.*cifar10|data_batch_1"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    with pytest.raises(UserInputError, match="stl10_binary"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)))
    with pytest.raises(UserInputError, match="data.root"):
        build_dataset(DataConfig(name="cifar100"))
    with pytest.raises(UserInputError, match="does not exist"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nope")))
    with pytest.raises(UserInputError, match="cifar10"):
        build_dataset(DataConfig(name="cifar_10"))
    with pytest.raises(UserInputError, match="split"):
        build_dataset(DataConfig(split="validation"))


def test_fashion_mnist_holdout_and_full_test_splits(tmp_path):
    from sasi_online.config import DataConfig
    from sasi_online.data.datasets import FASHION_MNIST_HOLDOUT, build_dataset, load_fashion_mnist

    train, holdout = load_fashion_mnist("train"), load_fashion_mnist("holdout")
    assert len(holdout) == FASHION_MNIST_HOLDOUT
    first = len(train) - FASHION_MNIST_HOLDOUT
    assert np.array_equal(np.asarray(holdout[0].image), np.asarray(train[first].image))
    assert (holdout.labels() == train.labels()[first:]).all()
    # training on data.limit=1600 never sees them; the limit does not cut the holdout split
    assert len(build_dataset(DataConfig(limit=first), "holdout")) == FASHION_MNIST_HOLDOUT
    with pytest.raises(UserInputError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(DataConfig(root=str(tmp_path / "nowhere")), "test_full")
    # the idx layout the Debian package installs, written here for 3 images
    import gzip

    folder = tmp_path / "fmnist"
    folder.mkdir()
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write((2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + images.tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 0, 9]))
    full = build_dataset(DataConfig(root=str(folder)), "test_full")
    assert len(full) == 3 and list(full.labels()) == [7, 0, 9]
    assert np.array_equal(np.asarray(full[1].image)[..., 0], images[1])
