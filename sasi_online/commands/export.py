"""`sasi export`: the trained backbone for downstream tools.

    sasi export runs/in100/checkpoints --format torchvision --out r50.pth
    sasi export runs/in100/checkpoints --tag global_step1000 --format timm --out r50_timm.pth
    sasi export consolidated/pytorch_model.bin --config runs/in100/config.yaml --format detectron2 --out r50_d2.pkl

CHECKPOINT is a checkpoint folder (its latest tag, or --tag), a tag folder, the
`mp_rank_00_model_states.pt` file, or a consolidated fp32 state dict (DeepSpeed's
`zero_to_fp32` output) with the run's config beside it or given by --config.

- torchvision: the ResNet state dict without `fc` (the classifier is the new task's):
  `net = torchvision.models.resnet50(); net.load_state_dict(sd, strict=False)` reports
  only fc.weight / fc.bias missing.
- timm: the plain state dict timm's ResNet of that arch takes with `strict=True`:
  `m = timm.create_model("resnet50", num_classes=0); m.load_state_dict(torch.load(FILE))`
  (or `checkpoint_path=FILE`).
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
                        help="a checkpoint `sasi train` wrote: its checkpoint folder, a tag folder, the "
                             "model-states file, or a consolidated fp32 state dict (zero_to_fp32's "
                             "pytorch_model.bin / model.safetensors)")
    parser.add_argument("--tag", help="the DeepSpeed tag to export from a checkpoint folder, e.g. "
                                      "global_step1000 (default: the latest)")
    parser.add_argument("--config", help="the run's config.yaml, for a consolidated state dict that has "
                                         "none beside it or in the two folders above")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="torchvision: ResNet state dict (no fc); timm: the state dict of timm's "
                             "ResNet (num_classes=0, strict=True); "
                             "detectron2: MoCo-style .pkl for detection fine-tuning")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write (atomically)")


def backbone_state(checkpoint: str | Path, tag: str | None = None,
                   config: str | Path | None = None) -> tuple[dict, object]:
    """(the online backbone's state dict on the CPU, the run's Config)."""
    from sasi_online.eval.checkpoint_loader import load_encoder

    method, cfg = load_encoder(checkpoint, tag=tag, config=config)
    if not cfg.method.backbone.startswith("resnet"):
        raise UserInputError(f"checkpoint '{checkpoint}' has a {cfg.method.backbone} backbone; "
                             "`sasi export` writes ResNets (method.backbone=resnet18|resnet50|resnet101)")
    state = {k: v.detach().cpu().clone() for k, v in method.backbone.state_dict().items()}
    return state, cfg


def to_torchvision(state: dict) -> dict:
    """Our backbone is torchvision's ResNet with fc = Identity: the keys are torchvision's already."""
    return dict(state)


def to_timm(state: dict) -> dict:
    """timm's ResNets name their weights as torchvision does (no fc: num_classes=0)."""
    return dict(state)


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


def export(checkpoint: str | Path, fmt: str, out: str | Path, tag: str | None = None,
           config: str | Path | None = None) -> dict:
    """Write the backbone of `checkpoint` as `fmt` to `out`; returns a summary."""
    from sasi_online.utils import atomic_write_bytes

    if fmt not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    state, cfg = backbone_state(checkpoint, tag, config)
    small_stem = bool(cfg.method.small_stem)
    if fmt == "detectron2":
        data = pickle.dumps(to_detectron2(state, small_stem), protocol=4)  # numpy arrays as MoCo writes them
    else:
        blob = to_torchvision(state) if fmt == "torchvision" else to_timm(state)
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
    "timm": "m = timm.create_model('{arch}', num_classes=0); m.load_state_dict(torch.load('{out}'))  # strict",
    "detectron2": "train_net.py --config-file <R50-C4 config> MODEL.WEIGHTS {out}",
}


def run(args) -> int:
    info = export(args.checkpoint, args.format, args.out, tag=args.tag, config=args.config)
    print(f"wrote {info['out']}: {info['backbone']} backbone, {info['keys']} tensors, "
          f"{info['bytes'] / 2 ** 20:.1f} MiB, {info['format']} format")
    print("load with: " + _HOW[info["format"]].format(arch=info["backbone"], out=info["out"]))
    if info["small_stem"]:
        print("note: small stem: set net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and "
              "net.maxpool = nn.Identity() before loading")
    return 0
