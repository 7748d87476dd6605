"""`sasi export`: the trained backbone for downstream tools.

    sasi export runs/in100/checkpoints --format torchvision --out r50.pth
    sasi export runs/in100/checkpoints --format timm --out r50_timm.pth
    sasi export runs/in100/checkpoints --format detectron2 --out r50_d2.pkl

- torchvision: the ResNet state dict without `fc` (the classifier is the new task's):
  `net = torchvision.models.resnet50(); net.load_state_dict(sd, strict=False)` reports
  only fc.weight / fc.bias missing.
- timm: `{"state_dict": ..., "arch": ...}`, loaded by
  `timm.create_model("resnet50", num_classes=0, checkpoint_path=FILE)`.
- detectron2: the pickle MoCo's detection conversion writes (`{"model": {name: numpy
  array}, "__author__", "matching_heuristics": True}`) with detectron2's ResNet names
  (stem.conv1, res2..res5, convK.norm, shortcut), for `MODEL.WEIGHTS FILE` in an R50-C4
  or R50-FPN config (the paper's Table 5: Faster R-CNN R50-C4 on VOC).

The online (query / student) backbone is exported: the one `sasi eval` measures.
Only ResNets export; a small-stem ResNet (3x3 conv1, no max-pool) exports to torchvision
and timm (rebuild the stem the same way before loading) but not to detectron2.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from sasi_online.errors import UserInputError

FORMATS = ("torchvision", "timm", "detectron2")


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint `sasi train` wrote: the file, its checkpoint folder or a tag folder")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="torchvision: ResNet state dict (no fc); timm: timm checkpoint; "
                             "detectron2: MoCo-style .pkl for detection fine-tuning")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write (atomically)")


def backbone_state(checkpoint: str | Path) -> tuple[dict, object]:
    """(the online backbone's state dict on the CPU, the run's Config)."""
    from sasi_online.eval.checkpoint_loader import load_encoder

    method, cfg = load_encoder(checkpoint)
    if not cfg.method.backbone.startswith("resnet"):
        raise UserInputError(f"checkpoint '{checkpoint}' has a {cfg.method.backbone} backbone; "
                             "`sasi export` writes ResNets (method.backbone=resnet18|resnet50|resnet101)")
    state = {k: v.detach().cpu().clone() for k, v in method.backbone.state_dict().items()}
    return state, cfg


def to_torchvision(state: dict) -> dict:
    """Our backbone is torchvision's ResNet with fc = Identity: the keys are torchvision's already."""
    return dict(state)


def to_timm(state: dict, arch: str, small_stem: bool) -> dict:
    """timm's ResNets name their weights as torchvision does; the checkpoint says which arch."""
    return {"state_dict": dict(state), "arch": arch, "num_classes": 0, "small_stem": small_stem}


_STAGE = re.compile(r"^layer([1-4])\.")
_NORM = re.compile(r"\.bn([1-3])\.")


def detectron2_name(key: str) -> str:
    """One torchvision ResNet key → detectron2's name, as MoCo's conversion maps it:
    stem weights get `stem.`, layerN → res(N+1), bnK → convK.norm, downsample.0/1 →
    shortcut / shortcut.norm."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = _STAGE.sub(lambda m: f"res{int(m.group(1)) + 1}.", key)
    key = _NORM.sub(lambda m: f".conv{m.group(1)}.norm.", "." + key)[1:]
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state: dict, small_stem: bool) -> dict:
    if small_stem:
        raise UserInputError("this backbone has the small stem (3x3 conv1, no max-pool, method.small_stem=true); "
                             "detectron2's ResNet stem is 7x7 stride 2 with max-pool, so the weights would not "
                             "fit. Export a run trained with method.small_stem=false, or use --format torchvision")
    model = {detectron2_name(k): v.numpy().copy() for k, v in state.items()}
    if len(model) != len(state):
        raise AssertionError("two backbone keys map to one detectron2 name")  # pragma: no cover
    return {"model": model, "__author__": "sasi_online", "matching_heuristics": True}


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> dict:
    """Write the backbone of `checkpoint` as `fmt` to `out`; returns a summary."""
    from sasi_online.utils import atomic_write_bytes

    if fmt not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    state, cfg = backbone_state(checkpoint)
    small_stem = bool(cfg.method.small_stem)
    if fmt == "detectron2":
        data = pickle.dumps(to_detectron2(state, small_stem), protocol=4)  # numpy arrays as MoCo writes them
    else:
        blob = to_torchvision(state) if fmt == "torchvision" else to_timm(state, cfg.method.backbone, small_stem)
        buf = io.BytesIO()
        torch.save(blob, buf)
        data = buf.getvalue()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return {"out": str(out), "format": fmt, "backbone": cfg.method.backbone, "keys": len(state),
            "small_stem": small_stem, "bytes": len(data)}


_HOW = {
    "torchvision": "net = torchvision.models.{arch}(); net.load_state_dict(torch.load('{out}'), strict=False)"
                   "  # only fc.* missing",
    "timm": "timm.create_model('{arch}', num_classes=0, checkpoint_path='{out}')",
    "detectron2": "train_net.py --config-file <R50-C4 config> MODEL.WEIGHTS {out}",
}


def run(args) -> int:
    info = export(args.checkpoint, args.format, args.out)
    print(f"wrote {info['out']}: {info['backbone']} backbone, {info['keys']} tensors, "
          f"{info['bytes'] / 2 ** 20:.1f} MiB, {info['format']} format")
    print("load with: " + _HOW[info["format"]].format(arch=info["backbone"], out=info["out"]))
    if info["small_stem"]:
        print("note: small stem: set net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and "
              "net.maxpool = nn.Identity() before loading")
    return 0
