"""A producer batch with the tiny models: SASI per (index, variant); faults stay in the batch."""
import numpy as np
import pytest
import torch
from PIL import Image

from sasi_online.config import Config
from sasi_online.data.datasets import ImageFolderDataset
from sasi_online.generation.generator import SASIGenerator
from sasi_online.online.maker import SasiMaker
from sasi_online.visual.variants import variant_seed

RES = 32


@pytest.fixture()
def folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "train" / cls / f"{k}.png")
    (tmp_path / "train" / "dog" / "2.png").write_bytes(b"not a png")  # an unreadable real image
    return ImageFolderDataset.from_class_tree(tmp_path / "train", "train")


def _cfg(zoo):
    cfg = Config()
    cfg.models.root = str(zoo)
    for k, v in dict(text="class_name", family="sd21", steps=2, resolution=RES, batch_size=8, guidance=2.0,
                     device="cpu", max_retries=1).items():
        setattr(cfg.generation, k, v)
    cfg.visual.kind = "image"
    return cfg


class AlwaysNaN:
    """Fault injection through the generator's backend hook: the real UNet runs, its output is NaN."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, sample, t, states, down=None, mid=None):
        return torch.full_like(self.backend(sample, t, states, down, mid), float("nan"))


def test_batch_makes_one_sasi_per_item_and_skips_a_bad_image(tiny_zoo, folder_dataset):
    bad = next(i for i in range(len(folder_dataset)) if folder_dataset.relpath(i).endswith("dog/2"))
    good = [i for i in range(len(folder_dataset)) if i != bad]
    maker = SasiMaker(_cfg(tiny_zoo), folder_dataset)
    items = [(good[0], 0), (bad, 0), (good[1], 0), (good[0], 1)]
    made = maker.make(items)
    assert made.failed == [(bad, 0)] and maker.counts["bad_image"] == 1
    assert list(zip(made.indices, made.variants)) == [(good[0], 0), (good[1], 0), (good[0], 1)]
    assert made.images.shape == (3, RES, RES, 3) and made.images.dtype == np.uint8
    assert made.seeds == [variant_seed(i, v, 0) for i, v in zip(made.indices, made.variants)]
    assert not np.array_equal(made.images[0], made.images[2])  # another variant, another seed
    assert made.captions[0].startswith("a photo of a ")
    # the same (index, variant) alone gives the same SASI: batching does not change an image
    again = maker.make([(good[1], 0)])
    np.testing.assert_allclose(again.images[0].astype(int), made.images[1].astype(int), atol=2)


def test_non_finite_outputs_are_dropped_and_counted(tiny_zoo, folder_dataset):
    cfg = _cfg(tiny_zoo)
    gen = SASIGenerator.from_config(cfg.models, cfg.generation, backend_hook=AlwaysNaN)
    maker = SasiMaker(cfg, folder_dataset, generator=gen)
    made = maker.make([(0, 0), (1, 0)])
    assert len(made) == 0 and made.images.shape == (0, RES, RES, 3)
    assert made.failed == [(0, 0), (1, 0)] and maker.counts["non_finite"] == 2


def test_device_sasi_path_gives_the_same_slots_and_host_copies_only_for_the_store(tiny_zoo, folder_dataset, tmp_path):
    """The CUDA path (forced here on the CPU): SASI kept on the device, resized there into the
    same slots; the full-resolution numpy batch exists only when the store is written."""
    cfg = _cfg(tiny_zoo)
    maker = SasiMaker(cfg, folder_dataset)
    assert maker.on_device is False  # a CPU generator keeps today's numpy path
    items = [(0, 0), (1, 0)]
    host = maker.make(items)
    maker.on_device = True
    dev = maker.make(items)
    assert dev.images is None and torch.equal(dev.slots, host.slots)
    maker.store_images = True  # what store.write_online + store.path set
    stored = maker.make(items)
    assert isinstance(stored.images, np.ndarray) and np.array_equal(stored.images, host.images)
    cfg.store.write_online, cfg.store.path = True, str(tmp_path / "store")
    assert SasiMaker(cfg, folder_dataset, generator=maker.generator, on_device=True).store_images


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_producer_keeps_sasi_on_the_device_and_stages_them(tiny_zoo, folder_dataset):
    from sasi_online.online.transport import HostStager, is_ready

    cfg = _cfg(tiny_zoo)
    cfg.generation.device = "cuda"
    maker = SasiMaker(cfg, folder_dataset)
    made = maker.make([(0, 0), (1, 0)])
    assert maker.on_device and made.slots.is_cuda and made.images is None
    host, event = HostStager(made.slots.device).stage(made.slots[[1, 0]])
    event.synchronize()
    assert is_ready(event) and host.is_pinned() and not host.is_cuda
    assert torch.equal(host, made.slots[[1, 0]].cpu())
