"""DeepSpeed's conventions: a user's --deepspeed_config JSON merged over the generated one
(project-owned keys refused), global_stepN tags (old step_NNNNNNN checkpoints still
resume), DeepSpeed's own zero_to_fp32 on ZeRO-1/2 checkpoints, and `sasi export` from a
checkpoint folder, a tag, or the consolidated state dict."""
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
