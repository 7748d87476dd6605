"""DeepSpeed's conventions: a user's --deepspeed_config JSON merged over the generated one
(project-owned keys refused), global_stepN tags (old step_NNNNNNN checkpoints still
resume), DeepSpeed's own zero_to_fp32 on ZeRO-1/2 checkpoints, and `sasi export` from a
checkpoint folder, a tag, or the consolidated state dict. No device sync inside a step:
no timers, no FP16_UnfusedOptimizer for bf16 (stage 0 runs at stage 1; its old
checkpoints resume exactly)."""
import contextlib
import json
import shutil

import pytest
import torch

from test_train import _train, tiny_cfg


def test_user_json_is_merged_and_owned_keys_are_refused(tmp_path, capsys):
    from sasi_online.cli import main
    from sasi_online.training.engine import OWNED_KEYS, deepspeed_config

    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "steps_per_print": 7}))
    cfg = tiny_cfg(tmp_path / "run", train={"zero_stage": 1})
    cfg.train.deepspeed = json.loads(good.read_text())
    conf = deepspeed_config(cfg, 32, 2)
    assert conf["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 12345}  # merged key by key
    assert conf["steps_per_print"] == 7 and conf["train_batch_size"] == 64
    assert conf["timers"]["throughput"]["enabled"] is False  # no device sync per step

    # the trainer's own parser (deepspeed.add_config_arguments), through `sasi train`
    assert main(["train", "--config", "tiny_cpu", "--print-config", "--deepspeed_config", str(good)]) == 0
    assert "reduce_bucket_size: 12345" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 2, "fp16": {"enabled": True},
                               "data_types": {}, "optimizer": {"type": "Adam"}, "scheduler": {},
                               "timers": {}, "zero_optimization": {"stage": 2},
                               "checkpoint": {"tag_validation": "Warn"}}))
    assert main(["train", "--config", "tiny_cpu", "--print-config", "--deepspeed_config", str(bad)]) == 2
    err = capsys.readouterr().err
    for key in ("train_batch_size", "gradient_accumulation_steps", "fp16", "data_types", "optimizer",
                "scheduler", "timers", "zero_optimization.stage", "checkpoint.tag_validation"):
        assert f"'{key}'" in err and OWNED_KEYS[key].split(" ")[0] in err, key
    assert "train.precision" in err and "train.zero_stage" in err and "train.grad_accum" in err
    (tmp_path / "broken.json").write_text("{nope")
    assert main(["train", "--config", "tiny_cpu", "--deepspeed_config", str(tmp_path / "broken.json")]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_tags_are_global_step_and_old_names_resume(tmp_path):
    over = dict(train={"zero_stage": 1, "batch_size": 16})
    full = _train(tiny_cfg(tmp_path / "full", **over))
    cut = tiny_cfg(tmp_path / "cut", **over)
    _train(cut, stop_at=2)
    ckpt = tmp_path / "cut/checkpoints"
    assert (ckpt / "global_step2/meta.json").is_file() and (ckpt / "latest").read_text().strip() == "global_step2"
    # as an earlier version wrote it: step_0000002/, latest-files naming that
    (ckpt / "global_step2").rename(ckpt / "step_0000002")
    (ckpt / "latest.json").write_text(json.dumps({"tag": "step_0000002", "step": 2}))
    (ckpt / "latest").write_text("step_0000002")
    resumed = _train(cut)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["global_step2", "global_step4"]
    assert json.loads((ckpt / "latest.json").read_text())["tag"] == "global_step4"


def _resnet_run(tmp_path, zero):
    from sasi_online.train import train

    cfg = tiny_cfg(tmp_path / f"z{zero}", method={"backbone": "resnet18", "small_stem": False},
                   train={"zero_stage": zero, "batch_size": 8, "steps": 2, "ckpt_every": 2})
    train(cfg)
    return tmp_path / f"z{zero}"


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_to_fp32_output_exports_to_timm(tmp_path, zero):
    timm = pytest.importorskip("timm")
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    from sasi_online.cli import main

    run = _resnet_run(tmp_path, zero)
    consolidated = tmp_path / "consolidated"
    convert_zero_checkpoint_to_fp32_state_dict(str(run / "checkpoints"), str(consolidated), tag="global_step2")
    flat = consolidated / "pytorch_model.bin"
    assert flat.is_file()
    # the config is not beside the consolidated file: --config names it, else the error says so
    assert main(["export", str(flat), "--format", "timm", "--out", str(tmp_path / "x.pth")]) == 2
    assert main(["export", str(flat), "--config", str(run / "config.yaml"), "--format", "timm",
                 "--out", str(tmp_path / "from_fp32.pth")]) == 0
    assert main(["export", str(run / "checkpoints"), "--tag", "global_step2", "--format", "timm",
                 "--out", str(tmp_path / "from_tag.pth")]) == 0
    a = torch.load(tmp_path / "from_fp32.pth", weights_only=True)
    b = torch.load(tmp_path / "from_tag.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(a, strict=True)
    init = timm.create_model("resnet18", num_classes=0).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if k.endswith("weight"))  # trained weights


def test_zero0_checkpoint_exports_without_conversion(tmp_path):
    """ZeRO-0 has no partitioned optimizer files (zero_to_fp32 has nothing to merge): the
    model-states file already holds the full weights, and `sasi export` reads it."""
    from sasi_online.cli import main

    run = _resnet_run(tmp_path, 0)
    assert main(["export", str(run / "checkpoints"), "--tag", "global_step2", "--format", "torchvision",
                 "--out", str(tmp_path / "tv.pth")]) == 0
    assert main(["export", str(run / "checkpoints"), "--tag", "global_step9", "--format", "torchvision",
                 "--out", str(tmp_path / "no.pth")]) == 2
    state = torch.load(tmp_path / "tv.pth", weights_only=True)
    assert "conv1.weight" in state and "fc.weight" not in state


# ----------------------------------------------------------------------------- no syncs in a step
def _engine(tmp_path, **train):
    from test_train import tiny_method

    from sasi_online.online.roles import setup_roles
    from sasi_online.training.loop import _model_and_engine

    cfg = tiny_cfg(tmp_path / "run", train={"batch_size": 8, **train})
    engine, _, memory_format = _model_and_engine(cfg, setup_roles(0), tiny_method, lambda m: None, 64)
    return engine, memory_format


def _steps(engine, n, dtype):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        views = [torch.rand(8, 3, 16, 16, generator=g).to(dtype) for _ in range(2)]
        res = engine(views, 0, 10)
        engine.backward(res["loss"])
        engine.step()


@pytest.fixture
def one_rank():
    from sasi_online.training.engine import destroy_process_group, init_process_group

    created = init_process_group()
    yield
    if created:
        destroy_process_group()


@pytest.mark.parametrize("precision,zero,runs_at", [("bf16", 0, 1), ("bf16", 2, 2), ("fp32", 0, 0)])
def test_engine_step_has_no_timers_no_unfused_optimizer_no_sync(tmp_path, monkeypatch, capsys, one_rank,
                                                                 precision, zero, runs_at):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from test_online_device_views import HostSyncGuard

    from sasi_online.training.engine import ZERO0_BF16_NOTE

    engine, memory_format = _engine(tmp_path, precision=precision, zero_stage=zero)
    assert not isinstance(engine.optimizer, FP16_UnfusedOptimizer)
    assert engine.zero_optimization_stage() == runs_at
    assert type(engine.optimizer).__name__ == ("DeepSpeedZeroOptimizer" if runs_at else "SGD")
    assert (ZERO0_BF16_NOTE in capsys.readouterr().out) == (runs_at != zero)  # one line, when mapped
    timer = engine.tput_timer.config
    assert not timer.enabled and not timer.synchronized and not engine.wall_clock_breakdown()
    assert memory_format == torch.preserve_format and not torch.backends.cudnn.benchmark  # a CPU: as it was
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    guard = HostSyncGuard(monkeypatch, armed_at=-1)
    _steps(engine, 2, dtype)  # DeepSpeed's timers start counting at its global step 2
    with guard.arm():
        _steps(engine, 2, dtype)
    assert guard.calls == []


def test_sync_count_sees_deepspeeds_throughput_timer(monkeypatch, one_rank):
    """The control for the test above: with DeepSpeed's default timer the count is not 0."""
    from test_online_device_views import HostSyncGuard
    from test_train import tiny_backbone

    from sasi_online.online.roles import setup_roles
    from sasi_online.training.engine import build_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(tiny_backbone()[0], torch.nn.Linear(64, 1))
    engine = build_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                          {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4, "steps_per_print": 10 ** 9},
                          setup_roles(0).mpu)
    guard = HostSyncGuard(monkeypatch, armed_at=-1)
    for step in range(4):
        with guard.arm() if step >= 2 else contextlib.nullcontext():
            engine.backward(engine(torch.rand(4, 3, 16, 16)).pow(2).mean())
            engine.step()
    assert guard.calls.count("synchronize") >= 2 and set(guard.calls) == {"synchronize"}


def test_bf16_stage0_checkpoint_resumes_exactly_at_stage1(tmp_path, monkeypatch):
    """A checkpoint written by the stage-0 bf16 path (FP16_UnfusedOptimizer: optimizer in the
    model-states file, no ZeRO files) resumes at stage 1 with its fp32 masters and momentum:
    steps 3-4 match the run that stayed at stage 0 bit for bit, and the resumed step 3
    syncs nothing (real views from a loader worker)."""
    from test_online_device_views import HostSyncGuard

    from sasi_online.training import engine as eng

    over = dict(train={"precision": "bf16", "zero_stage": 0, "batch_size": 16})
    final = {}

    def keep(name):
        def callback(done, module):
            if done == 4:
                final[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return callback

    with monkeypatch.context() as old_path:
        old_path.setattr(eng, "zero_stage_for", lambda t: t.zero_stage)  # the stage-0 path as it was
        stayed = _train(tiny_cfg(tmp_path / "stayed", **over), step_callback=keep("stayed"))
        _train(tiny_cfg(tmp_path / "cut", **over), stop_at=2)
    folder = tmp_path / "cut/checkpoints/global_step2"
    assert not list(folder.glob("*optim_states.pt"))  # written at stage 0
    assert "fp32_groups" in torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
    guard = HostSyncGuard(monkeypatch, armed_at=3)
    resumed = _train(tiny_cfg(tmp_path / "cut", train={**over["train"], "num_workers": 1}),
                     step_callback=keep("resumed"))
    assert guard.armed_steps == 1 and guard.calls == []
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {s: stayed.losses[s] for s in (3, 4)}
    for k, v in final["stayed"].items():
        assert torch.equal(final["resumed"][k], v), k
    assert list((tmp_path / "cut/checkpoints/global_step4").glob("*optim_states.pt"))  # now at stage 1
