"""The trainer: exact resume, non-finite stop, refusals, and a few dozen steps of every
method on the embedded data. (Two DeepSpeed ranks: tests/test_groups.py, on a world that
refuses CPU tensors as NCCL does.)

Methods run on a tiny real CNN backbone (passed through `method_factory`) so each run
takes seconds; everything else (DeepSpeed engine, pairs, augmentation, checkpoints) is
the production path.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent

from sasi_online.config import config_from_dict  # noqa: E402
from sasi_online.errors import UserInputError  # noqa: E402


def tiny_backbone(width: int = 16) -> tuple[nn.Module, int]:
    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

    net = nn.Sequential(*block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 4 * width


def tiny_method(mcfg, global_batch):
    from sasi_online.ssl.methods import METHODS

    torch.manual_seed(0)
    backbone, dim = tiny_backbone()
    method = METHODS[mcfg.name](mcfg, backbone, dim)
    method.check_global_batch(global_batch)
    return method


def tiny_cfg(out, **sections):
    base = {
        "data": {"name": "fashion_mnist", "image_size": 16},
        "augment": {"recipe": "mocov2", "backend": "torchvision"},
        "method": {"name": "mocov2", "proj_dim": 32, "proj_hidden": 64, "pred_hidden": 64,
                   "queue_size": 256, "num_prototypes": 32},
        "optim": {"name": "sgd", "lr": 0.3, "warmup_steps": 2},
        "train": {"pair_mode": "base", "batch_size": 32, "steps": 4, "log_every": 1,
                  "ckpt_every": 2, "knn_every": 1000, "knn_bank": 400, "knn_test": 200,
                  "out": str(out)},
        "eval": {"knn_k": 20},
    }
    for sec, values in sections.items():
        base.setdefault(sec, {}).update(values)
    return config_from_dict(base)


def _train(cfg, **kw):
    from sasi_online.train import train

    return train(cfg, method_factory=tiny_method, **kw)


@pytest.mark.parametrize("optim,zero,accum", [("sgd", 0, 1), ("lars", 1, 2)])
def test_resume_is_exact(tmp_path, optim, zero, accum):
    over = dict(optim={"name": optim}, train={"zero_stage": zero, "grad_accum": accum, "batch_size": 16})
    full = _train(tiny_cfg(tmp_path / "full", **over))
    cut = tiny_cfg(tmp_path / "cut", **over)
    first = _train(cut, stop_at=2)
    assert first.step == 2 and (tmp_path / "cut/checkpoints/global_step2/meta.json").is_file()
    with open(tmp_path / "cut/metrics.jsonl", "a") as fh:  # logged after the checkpoint, then a crash
        fh.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    resumed = _train(cut)
    rows = [json.loads(x) for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # step 3 logged once, by the resume
    assert sorted(resumed.losses) == [3, 4]  # continued from the checkpoint, not from scratch
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6)
    assert full.losses[3] != full.losses[4]  # the comparison is not trivially constant


def test_each_trainer_resumes_its_own_sasi_counters(tmp_path):
    """DeepSpeed keeps the first trainer's client state only; each trainer's own counters
    travel in its own file (saved here as trainer 0, then as trainer 1, of one engine)."""
    from sasi_online.training import checkpoint as ckpt
    from sasi_online.training.engine import build_engine, destroy_process_group, init_process_group

    cfg = tiny_cfg(tmp_path / "run")
    from sasi_online.online.roles import setup_roles

    created = init_process_group()
    try:
        roles = setup_roles(0)
        model = nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = build_engine(model, opt, None, {"train_micro_batch_size_per_gpu": 1,
                                                 "train_batch_size": 1, "steps_per_print": 10 ** 9}, roles.mpu)
        ckpt_dir = tmp_path / "run/checkpoints"
        for rank, hits in ((0, 5), (1, 7)):
            own = {"sasi_outcomes": {"hit": hits}, "source": {"counts": {"hit": hits}}}
            ckpt.save(engine, ckpt_dir, 2, cfg, {"step": 2, **own}, rank, roles.trainer_group, rank_state=own)
        assert ckpt.load(engine, ckpt_dir, cfg, 0)["sasi_outcomes"] == {"hit": 5}
        client = ckpt.load(engine, ckpt_dir, cfg, 1)
        assert client["sasi_outcomes"] == {"hit": 7} and client["source"] == {"counts": {"hit": 7}}
        assert client["step"] == 2
    finally:
        if created:
            destroy_process_group()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from sasi_online.train import NonFiniteLossError

    def poison(step, method):
        if step == 3:  # a weight blows up after the checkpoint at step 2
            with torch.no_grad():
                next(method.backbone.parameters()).fill_(float("nan"))

    # log_every=5: the loss stays on the device until the checkpoint at step 4 checks it
    cfg = tiny_cfg(tmp_path / "run", train={"steps": 6, "log_every": 5})
    with pytest.raises(NonFiniteLossError, match="global_step2"):
        _train(cfg, step_callback=poison)
    latest = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert latest["step"] == 2
    assert not (tmp_path / "run/checkpoints/global_step4").exists()


def test_bf16_zero2_trains(tmp_path):
    result = _train(tiny_cfg(tmp_path / "bf16", train={"steps": 2, "precision": "bf16", "zero_stage": 2}))
    assert result.step == 2 and all(v == v and abs(v) < 1e3 for v in result.losses.values())
    assert (tmp_path / "bf16/checkpoints/global_step2/meta.json").is_file()


def test_loader_workers_give_the_same_batches(tmp_path):
    # every micro-batch is a pure function of (seed, rank, step): workers change nothing
    serial = _train(tiny_cfg(tmp_path / "w0", train={"steps": 2}))
    parallel = _train(tiny_cfg(tmp_path / "w2", train={"steps": 2, "num_workers": 2}))
    assert parallel.losses == pytest.approx(serial.losses, rel=1e-6)


def test_refusals_before_any_work(tmp_path):
    with pytest.raises(UserInputError, match="queue_size"):
        _train(tiny_cfg(tmp_path / "a", method={"queue_size": 100}))
    with pytest.raises(UserInputError, match="store.path"):
        _train(tiny_cfg(tmp_path / "b", train={"pair_mode": "sasi"}))
    with pytest.raises(UserInputError, match="leaves no trainer"):  # one process, one producer
        _train(tiny_cfg(tmp_path / "c", online={"producers": 1}))
    with pytest.raises(UserInputError, match="train.precision"):
        _train(tiny_cfg(tmp_path / "d", train={"precision": "fp16"}))
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_checkpoint_from_another_config_is_refused(tmp_path):
    from sasi_online.training.checkpoint import CheckpointMismatchError

    _train(tiny_cfg(tmp_path / "run", train={"steps": 2}))
    with pytest.raises(CheckpointMismatchError, match="another config"):
        _train(tiny_cfg(tmp_path / "run", train={"steps": 4}, optim={"lr": 0.1}))
    # the same config with a longer run (train.steps is not part of the hash) resumes
    assert _train(tiny_cfg(tmp_path / "run", train={"steps": 3})).step == 3


def test_unknown_config_key_refused_by_the_command(tmp_path, capsys):
    from sasi_online.train import main

    assert main(["--config", str(REPO / "configs/tiny_cpu.yaml"), "train.stepz=3"]) == 2
    assert "Did you mean 'train.steps'" in capsys.readouterr().err


# method -> (extra method/augment settings) for a few dozen steps without collapse
METHOD_SETTINGS = {
    "mocov2": {},
    "simclr": {"augment": {"recipe": "simclr"}},
    "byol": {"augment": {"recipe": "simclr"}},
    "simsiam": {},
    "mocov3": {},
    "barlow_twins": {},
    "vicreg": {},
    "adco": {},
    "swav": {"augment": {"recipe": "dino"}, "method": {"local_crops": 2}},
    "dino": {"augment": {"recipe": "dino"}, "method": {"local_crops": 2}},
}
KNN_FLOOR = 0.30  # chance is 0.10 on the 10 classes
STD_FLOOR = 0.02  # normalised 64-d features: collapse gives ~0, healthy ~0.05-0.12


@pytest.mark.parametrize("name", sorted(METHOD_SETTINGS))
def test_each_method_trains_without_collapse(tmp_path, name):
    from sasi_online.ssl.methods import METHODS

    if name not in METHODS:
        pytest.skip(f"method {name} not provided by sasi_online.ssl")
    extra = METHOD_SETTINGS[name]
    cfg = tiny_cfg(tmp_path / name, method={"name": name, **extra.get("method", {})},
                   augment=extra.get("augment", {}),
                   train={"steps": 24, "log_every": 8, "ckpt_every": 24, "knn_every": 24})
    result = _train(cfg)
    assert result.step == 24
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert result.last_eval["feature_std"] > STD_FLOOR, result.last_eval
    assert result.last_eval["knn_acc"] > KNN_FLOOR, result.last_eval


def _make_store(root, dataset, fishy_every=6):
    """A real SASI store: inverted images for the even indices, every 6th flagged fishy."""
    import numpy as np

    from sasi_online.data.store import SasiStore

    store = SasiStore.create(root, dataset={"name": dataset.name, "split": dataset.split, "size": len(dataset)},
                             models={"tiny": "test"}, settings={"kind": "inverted"})
    for i in range(0, len(dataset), 2):
        s = dataset[i]
        store.add(255 - np.asarray(s.image), index=i, variant=0, relpath=s.relpath, vp_kind="image")
        if i % fishy_every == 0:
            store.update(i, 0, fishy=True)
    store.close()


@pytest.mark.parametrize("mode", ["sasi", "three_flow"])
def test_sasi_pairs_from_a_store_are_counted(tmp_path, mode):
    from sasi_online.config import DataConfig
    from sasi_online.data.datasets import build_dataset

    ds = build_dataset(DataConfig(name="fashion_mnist", limit=128), "train")
    _make_store(tmp_path / "store", ds)
    cfg = tiny_cfg(tmp_path / "run", data={"limit": 128}, store={"path": str(tmp_path / "store")},
                   train={"pair_mode": mode, "steps": 3})
    result = _train(cfg)
    got = result.sasi_outcomes
    assert sum(got.values()) == 3 * 32 and got["hit"] > 0 and got["missing"] > 0 and got["fishy"] > 0
    # about half the images have SASI, a third of those are fishy
    assert 0.25 < got["hit"] / 96 < 0.5 and 0.3 < got["missing"] / 96 < 0.7
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "loss" in r][-1]["sasi_hit"] == got["hit"]


def test_store_of_another_dataset_is_refused(tmp_path):
    from sasi_online.config import DataConfig
    from sasi_online.data.datasets import build_dataset

    other = build_dataset(DataConfig(name="fashion_mnist", limit=16), "test")  # the test split
    _make_store(tmp_path / "store", other)
    cfg = tiny_cfg(tmp_path / "run", store={"path": str(tmp_path / "store")}, train={"pair_mode": "sasi"})
    with pytest.raises(UserInputError, match="does not match the training data"):
        _train(cfg)


def test_cuda_speed_settings_are_chosen_by_device(monkeypatch):
    """channels_last and cuDNN's autotuner for a CNN on CUDA, fused SGD/AdamW on CUDA; a CPU
    run and a ViT-like backbone (one patch convolution) keep their defaults. The choice is
    made from the device, so it is checked here on CPU-resident modules."""
    from sasi_online.config import OptimConfig
    from sasi_online.training.optim import build_optimizer
    from sasi_online.training.speed import apply_backbone_settings

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def method(backbone):
        m = nn.Module()
        m.backbone, m.head = backbone, nn.Linear(4, 4)
        return m

    cnn = method(tiny_backbone()[0])
    assert apply_backbone_settings(cnn, cpu) == torch.preserve_format and not torch.backends.cudnn.benchmark
    assert all(p.is_contiguous() for p in cnn.parameters())
    vit_like = method(nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(), nn.Linear(8 * 16, 4)))
    assert apply_backbone_settings(vit_like, cuda) == torch.preserve_format and not torch.backends.cudnn.benchmark
    assert apply_backbone_settings(cnn, cuda) == torch.channels_last and torch.backends.cudnn.benchmark
    convs = [m.weight for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)

    groups = [{"params": list(cnn.parameters())}]
    for name in ("sgd", "adamw"):
        cfg = OptimConfig(name=name, lr=0.1, momentum=0.9, weight_decay=0.0)
        assert build_optimizer(cfg, groups, 256, cuda).defaults["fused"] is True
        assert not build_optimizer(cfg, groups, 256, cpu).defaults.get("fused")
