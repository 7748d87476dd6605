"""Online views on the device: real views from loader workers (uint8), ring SASI augmented
on the trainer's device in one batched call, no host sync inside a non-log step."""
import contextlib

import pytest
import torch

from sasi_online.config import Config
from sasi_online.data.augment import build_augmenter, normalize_on_device
from sasi_online.data.datasets import build_dataset
from sasi_online.data.pairs import PairBuilder
from sasi_online.data.sampler import StepSampler
from sasi_online.online.device_views import DeviceViewBatches, RealViews
from sasi_online.online.ring import RingPool
from sasi_online.online.ring_source import POOL_DRAW, RING_HIT, RingSource

SHAPE = (2, 8, 8, 3)


def _slot(sasi, real):
    slot = torch.full(SHAPE, sasi, dtype=torch.uint8)
    slot[1] = real
    return slot


@pytest.mark.parametrize("mode", ["sasi_no_aug", "sasi"])
def test_ring_views_come_from_the_slots_and_real_views_from_the_workers(mode):
    cfg = Config()
    cfg.data.image_size, cfg.augment.recipe = 16, "mocov2"
    ds = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(ds), 4, seed=0)
    own = sampler.indices(0, 0)
    other = next(i for i in range(len(ds)) if i not in own)
    ring = RingPool(2, SHAPE, max_reuse=4, max_age=100, dataset_size=len(ds))
    ring.put(own[0], 0, _slot(200, 10), step=0)
    ring.put(other, 0, _slot(100, 50), step=0)
    augmenter = build_augmenter(cfg.augment, 16)
    source = RingSource(ring, on_device=True)
    builder = PairBuilder(mode, augmenter, source)
    worker = RealViews(ds, sampler, builder, seed=0, trainer_rank=0)
    assert worker.builder.source is None  # the workers never hold the ring
    raw = worker(0).views
    assert all(v.dtype == torch.uint8 for v in raw)  # what travels (pinned on a GPU)
    make = DeviceViewBatches(sampler, builder, source, 0, 0, torch.device("cpu"), 16)
    views, outcomes = make(0, raw)
    assert source.counts[RING_HIT] == 1 and source.counts[POOL_DRAW] == 1 and make.calls == 1
    assert outcomes["hit"] == 2
    mean = torch.tensor(augmenter.recipe.mean)[:, None, None]
    std = torch.tensor(augmenter.recipe.std)[:, None, None]

    def flat(value):
        return ((value / 255.0 - mean) / std).expand(3, 16, 16)

    # samples 2, 3 have no SASI: both of their views are the workers' (fallback: a second real view)
    for v in range(2):
        torch.testing.assert_close(views[v][2:], normalize_on_device(raw[v], augmenter.recipe, "cpu")[2:])
    torch.testing.assert_close(views[0][0], normalize_on_device(raw[0], augmenter.recipe, "cpu")[0])
    if mode == "sasi_no_aug":  # plain views: exactly the slots' constant images
        torch.testing.assert_close(views[1][0], flat(200))  # own hit: its SASI
        torch.testing.assert_close(views[0][1], flat(50))  # the draw's real image, from its slot
        torch.testing.assert_close(views[1][1], flat(100))  # and its SASI
    else:  # augmented on the device: colour jitter moves the level, never the flatness
        for v, r in ((1, 0), (0, 1), (1, 1)):
            assert float(views[v][r].std(dim=(1, 2)).max()) < 1e-4


class HostSyncGuard:
    """Fault injection over one training step (`train_step` of the step that ends at
    `done == armed_at`, the views, forward, backward and DeepSpeed's step included):
    Tensor.item() and Tensor.cpu() raise there, and DeepSpeed's accelerator synchronize()
    is counted (the CPU accelerator's does nothing, so only a count sees its timers' syncs).
    `calls`: what was called while armed; `armed_steps`: steps guarded (1 when it ran)."""

    def __init__(self, monkeypatch, armed_at: int):
        from deepspeed.accelerator import get_accelerator

        from sasi_online.training import loop

        self.armed, self.armed_at, self.calls, self.armed_steps = False, armed_at, [], 0
        for name in ("item", "cpu"):
            monkeypatch.setattr(torch.Tensor, name, self._raising(name, getattr(torch.Tensor, name)))
        accelerator = get_accelerator()
        monkeypatch.setattr(accelerator, "synchronize", self._counting(accelerator.synchronize))
        monkeypatch.setattr(loop, "train_step", self._guarded(loop.train_step))

    def _raising(self, name, real):
        def wrapped(tensor, *a, **k):
            if self.armed:
                self.calls.append(name)
                raise RuntimeError(f"host sync: Tensor.{name}() inside a non-log step")
            return real(tensor, *a, **k)
        return wrapped

    def _counting(self, real):
        def wrapped(*a, **k):
            if self.armed:
                self.calls.append("synchronize")
            return real(*a, **k)
        return wrapped

    def _guarded(self, real):
        def wrapped(run, step):
            self.armed = step + 1 == self.armed_at
            self.armed_steps += int(self.armed)
            try:
                return real(run, step)
            finally:
                self.armed = False
        return wrapped

    @contextlib.contextmanager
    def arm(self):
        """Guard a block by hand (an engine step outside the loop)."""
        self.armed, self.armed_steps = True, self.armed_steps + 1
        try:
            yield
        finally:
            self.armed = False


def test_multi_crop_and_mix_views_on_the_device():
    """DINO's recipe: global and local crops have different sides, one augment_views call
    each; `mix` makes (s, s) and its local crops from the slot for its synthetic half only."""
    cfg = Config()
    cfg.data.image_size, cfg.augment.recipe = 16, "dino"
    ds = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(ds), 8, seed=0)
    ring = RingPool(16, SHAPE, max_reuse=8, max_age=100, dataset_size=len(ds))
    for i in sampler.indices(0, 0):
        ring.put(i, 0, _slot(255, 0), step=0)
    augmenter = build_augmenter(cfg.augment, 16)
    source = RingSource(ring, on_device=True)
    builder = PairBuilder("mix", augmenter, source, num_global=2, num_local=2)
    raw = RealViews(ds, sampler, builder, seed=0, trainer_rank=0)(0).views
    make = DeviceViewBatches(sampler, builder, source, 0, 0, torch.device("cpu"), 16)
    views, outcomes = make(0, raw)
    local = augmenter.recipe.local_view.side(16)
    assert [tuple(v.shape[-2:]) for v in views] == [(16, 16)] * 2 + [(local, local)] * 2
    synthetic = outcomes["hit"]
    assert 0 < synthetic < 8 and source.counts[RING_HIT] == synthetic and make.calls == 2
    # the synthetic samples' four views are the slot's SASI (all-white, whatever the jitter),
    # the others' are the workers' real views, untouched
    real = [normalize_on_device(v, augmenter.recipe, "cpu") for v in raw]
    from_slot = [r for r in range(8) if not torch.equal(views[0][r], real[0][r])]
    assert len(from_slot) == synthetic
    for v in range(4):
        rest = [r for r in range(8) if r not in from_slot]
        torch.testing.assert_close(views[v][rest], real[v][rest])


@pytest.mark.parametrize("image_size", [32, 224])
def test_device_views_blur_with_the_torchvision_parameters(image_size):
    """BYOL (view 1 always blurred, view 2 rarely): the ring's views draw their sigma in the
    range and blur with the kernel torchvision's GaussianBlur gets for the same view."""
    from sasi_online.data.augment import build_torchvision_transform
    from sasi_online.kernels.ring_augment import blur_kernel_size
    from sasi_online.online.device_views import _cat_params, _params_for

    cfg = Config()
    cfg.augment.recipe = "byol"
    recipe = build_augmenter(cfg.augment, image_size).recipe
    gen = torch.Generator().manual_seed(0)
    parts = []
    for kind in ("global0", "global1"):
        spec = recipe.spec(kind)
        tv = [t for t in build_torchvision_transform(recipe, kind, image_size).transforms
              if type(t).__name__ == "RandomApply"][-1].transforms[0]
        p = _params_for(spec, recipe, image_size, 64, (40, 40), gen)
        side = spec.side(image_size)
        assert blur_kernel_size(p, side) == tv.kernel_size[0] == spec.blur_kernel(image_size)
        drawn = p.blur_sigma[p.blur_sigma > 0]
        assert drawn.numel() and float(drawn.min()) >= tv.sigma[0] - 1e-6 and float(drawn.max()) <= tv.sigma[1] + 1e-6
        parts.append(p)
    assert blur_kernel_size(_cat_params(parts), side) == spec.blur_kernel(image_size)
    assert spec.blur_kernel(image_size) == {32: 3, 224: 13}[image_size]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ring_views_on_a_gpu_use_the_fused_kernel():
    from sasi_online.kernels.dispatch import last_choice

    cfg = Config()
    cfg.data.image_size, cfg.augment.recipe = 16, "byol"  # blur and solarisation included
    ds = build_dataset(cfg.data, "train")
    sampler = StepSampler(len(ds), 4, seed=0)
    device = torch.device("cuda")
    ring = RingPool(4, SHAPE, device, max_reuse=4, max_age=100, dataset_size=len(ds))
    for i in sampler.indices(0, 0):
        ring.put(i, 0, _slot(200, 10).to(device), step=0)
    augmenter = build_augmenter(cfg.augment, 16)
    source = RingSource(ring, on_device=True)
    builder = PairBuilder("sasi", augmenter, source)
    raw = [v.pin_memory() for v in RealViews(ds, sampler, builder, seed=0, trainer_rank=0)(0).views]
    views, outcomes = DeviceViewBatches(sampler, builder, source, 0, 0, device, 16)(0, raw)
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in views) and outcomes["hit"] == 4
    assert bool(torch.isfinite(views[1]).all())
    choice = last_choice("ring_augment")
    from sasi_online.kernels._triton import triton_import_problem

    assert choice is not None and (choice.backend == "triton" or triton_import_problem())


def test_device_views_bench_runs_at_a_small_size():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_device_views import run

    out = run(batch=8, image_size=32, steps=1)
    assert out["slot_side"] == 37 and all(out[k] > 0 for k in ("host_pairs_s", "worker_s", "trainer_host_s"))
