"""`sasi export`: the trained backbone loads into torchvision, timm and detectron2's naming."""
import pickle

import numpy as np
import pytest
import torch

from sasi_online.errors import UserInputError


def _checkpoint(tmp_path, backbone, small_stem):
    """A real MoCo-v2 of this backbone, saved in the layout `sasi eval` / `sasi export` read."""
    ssl = pytest.importorskip("sasi_online.ssl")
    from sasi_online.config import Config

    cfg = Config()
    cfg.method.backbone, cfg.method.small_stem, cfg.method.queue_size = backbone, small_stem, 256
    torch.manual_seed(0)
    method = ssl.build_method(cfg.method)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show
        for name, buf in method.backbone.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    path = tmp_path / f"{backbone}_ckpt.pt"
    torch.save({"config": cfg.to_dict(), "model": method.state_dict()}, path)
    return path, method.eval()


def test_torchvision_and_timm_exports_load_into_their_classes(tmp_path):
    import torchvision
    timm = pytest.importorskip("timm")
    from sasi_online.cli import main

    ckpt, method = _checkpoint(tmp_path, "resnet18", small_stem=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = method.encode(x)

    assert main(["export", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "tv.pth")]) == 0
    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), want)

    assert main(["export", str(ckpt), "--format", "timm", "--out", str(tmp_path / "timm.pth")]) == 0
    model = timm.create_model("resnet18", num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)  # a plain state dict
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want)


def _detectron2_resnet50_names():
    """detectron2's ResNet-50 parameter and buffer names, enumerated from its layout
    (stem; res2..res5 with 3, 4, 6, 3 bottlenecks; a projection shortcut in each first block)."""
    norm = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"stem.conv1.weight": "conv1.weight", **{f"stem.conv1.norm.{p}": f"bn1.{p}" for p in norm}}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            d2, tv = f"res{stage}.{b}", f"layer{stage - 1}.{b}"
            for k in (1, 2, 3):
                names[f"{d2}.conv{k}.weight"] = f"{tv}.conv{k}.weight"
                names.update({f"{d2}.conv{k}.norm.{p}": f"{tv}.bn{k}.{p}" for p in norm})
            if b == 0:
                names[f"{d2}.shortcut.weight"] = f"{tv}.downsample.0.weight"
                names.update({f"{d2}.shortcut.norm.{p}": f"{tv}.downsample.1.{p}" for p in norm})
    return names


class _ArraysOnly(pickle.Unpickler):
    """Refuses anything but numpy arrays: the export must hold no code objects."""

    def find_class(self, module, name):
        if module.startswith("numpy") and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def test_detectron2_export_maps_every_resnet50_key(tmp_path):
    from sasi_online.commands.export import export

    ckpt, method = _checkpoint(tmp_path, "resnet50", small_stem=False)
    export(ckpt, "detectron2", tmp_path / "r50.pkl")
    with open(tmp_path / "r50.pkl", "rb") as fh:
        blob = _ArraysOnly(fh).load()
    assert blob["matching_heuristics"] is True and set(blob) == {"model", "__author__", "matching_heuristics"}
    expected = _detectron2_resnet50_names()
    source = method.backbone.state_dict()
    assert len(source) == len(expected) == 53 + 53 * 5  # 53 convs and their norms, nothing else
    assert set(blob["model"]) == set(expected)
    for d2_name, tv_name in expected.items():
        arr = blob["model"][d2_name]
        assert isinstance(arr, np.ndarray) and np.array_equal(arr, source[tv_name].numpy()), d2_name


def test_export_refuses_what_cannot_fit(tmp_path):
    from sasi_online.commands.export import export

    ckpt, _ = _checkpoint(tmp_path, "resnet18", small_stem=True)
    with pytest.raises(UserInputError, match="small stem"):
        export(ckpt, "detectron2", tmp_path / "x.pkl")
    with pytest.raises(UserInputError, match="--format must be one of"):
        export(ckpt, "onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.pkl").exists()
