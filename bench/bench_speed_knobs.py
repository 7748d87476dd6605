"""Every speed knob of the generator, measured for speed AND drift from a reference.

The reference is the slow, careful setting: one sampler at full steps, full img2img
strength, full resolution, batch 1, eager UNet (default: DPM-Solver++ 25 steps,
strength 1.0). Each knob changes one thing and makes the same images (same prompts,
visual prompts and seeds):

  solver      DPM-Solver++ / UniPC vs DDIM / DDPM at 10, 15, 20 steps
  strength    img2img strength below 1 (0.5, 0.8): fewer steps run
  resolution  generate smaller (0.75x, 0.5x), upsample to the reference size to compare
  batch       4 and 8 images per forward (the reference is batch 1)
  deepcache   DeepCache intervals 2 and 3
  fused       DDIM / DDPM at the reference step count, fused CFG + step off and on

Speed is SASI/s and the ratio to the reference, all measured side by side in one run
(the reference is timed again at the end to show how steady the machine was); seconds
are wall time on a GPU and the process's CPU time on a CPU (`--clock`), so other jobs
on shared cores do not skew the ratios. Drift is
the mean absolute pixel difference / 255 to the reference image and the CLIP image
cosine to it (the model set's `clip/`). Writes speed_knobs.json after every row, then
speed_knobs.md (table) and speed_knobs.png (speed-up vs drift).

    python bench/bench_speed_knobs.py                      # tiny model set, 64 px, ~2 min on a CPU
    python bench/bench_speed_knobs.py --models /models/sd --resolution 512 --device cuda

Speed is measured, not asserted: compare ratios on one machine, not absolute numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

GROUPS = ("solver", "strength", "resolution", "batch", "deepcache", "fused")
PROMPTS = ("a red car parked on a quiet street", "a bowl of fruit on a wooden table",
           "a temple roof under a blue sky", "a pink flower in a garden",
           "a dog running on the beach", "a city skyline at dusk",
           "a mountain lake with trees", "a cup of coffee beside a book")


# --------------------------------------------------------------------------- drift
def resize_to(images: np.ndarray, size: int) -> np.ndarray:
    """N x h x w x 3 uint8 → N x size x size x 3 (bicubic, as a viewer would upsample)."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
                     for im in images])


def pixel_drift(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image: mean |image - reference| / 255 (0 = identical, 1 = inverted).

    Images of another size are upsampled to the reference's first."""
    images, reference = np.asarray(images), np.asarray(reference)
    if images.ndim != 4 or reference.ndim != 4 or len(images) != len(reference):
        raise ValueError(f"pixel_drift needs two N x H x W x 3 stacks of equal N; got "
                         f"{images.shape} and {reference.shape}")
    images = resize_to(images, reference.shape[1])
    diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    return diff.reshape(len(images), -1).mean(1) / 255.0


# --------------------------------------------------------------------------- knobs
@dataclass
class Knob:
    """One row: a name, its group, and the generation settings it changes."""

    name: str
    group: str
    settings: dict = field(default_factory=dict)


def plan_knobs(groups: Sequence[str], ref_steps: int, solver_steps: Sequence[int],
               strengths: Sequence[float], resolutions: Sequence[int], batch_sizes: Sequence[int],
               deep_cache: Sequence[int], fused_schedulers: Sequence[str]) -> list[Knob]:
    """The rows to measure, in table order (the reference row is added by the runner)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        from sasi_online.errors import UserInputError

        raise UserInputError(f"--knobs: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    knobs: list[Knob] = []
    if "solver" in groups:
        for steps in solver_steps:
            for sched in ("dpmsolver++", "unipc", "ddim", "ddpm"):
                knobs.append(Knob(f"{sched} {steps} steps", "solver",
                                  {"scheduler": sched, "steps": steps}))
    if "strength" in groups:
        knobs += [Knob(f"strength {s:g}", "strength", {"strength": s}) for s in strengths]
    if "resolution" in groups:
        knobs += [Knob(f"{r} px, upsampled", "resolution", {"resolution": r}) for r in resolutions]
    if "batch" in groups:
        knobs += [Knob(f"batch {b}", "batch", {"batch_size": b}) for b in batch_sizes]
    if "deepcache" in groups:
        knobs += [Knob(f"DeepCache interval {k}", "deepcache", {"deep_cache_interval": k})
                  for k in deep_cache]
    if "fused" in groups:
        for sched in fused_schedulers:
            for fused in (False, True):
                knobs.append(Knob(f"{sched} {ref_steps} steps, fused step {'on' if fused else 'off'}",
                                  "fused", {"scheduler": sched, "steps": ref_steps, "fused_step": fused}))
    return knobs


def smaller_resolutions(resolution: int, fractions: Sequence[float], multiple: int) -> list[int]:
    """Each fraction of `resolution`, rounded down to what the models accept, deduplicated."""
    out = []
    for f in fractions:
        r = max(multiple, int(resolution * f) // multiple * multiple)
        if r < resolution and r not in out:
            out.append(r)
    return out


# --------------------------------------------------------------------------- inputs
def sample_photos(n: int, size: int, seed: int = 0) -> list:
    """n square crops of scikit-learn's two bundled photos (real content, no download)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        out.append(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC))
    return out


def make_inputs(kind: str, n: int, resolution: int, models_cfg: Any) -> tuple[list, list, list]:
    """(prompts, visual prompts, seeds) for n SASI of VP `kind`; masks come from the segmenter."""
    from sasi_online.visual.prompts import make_visual_prompt

    photos = sample_photos(n, resolution)
    masks: list = [None] * n
    if kind in ("mask", "mix"):
        from sasi_online.visual.segmenter import Segmenter

        masks = Segmenter(models_cfg.path("segmenter")).segment(photos)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    vps = [make_visual_prompt(kind, photos[i], masks[i], resolution=resolution, seed=i)
           for i in range(n)]
    return prompts, vps, [1000 + i for i in range(n)]


# --------------------------------------------------------------------------- measuring
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def pick_clock(choice: str, device_type: str) -> str:
    """'auto': wall time on a GPU; on a CPU the process's own CPU time, which other jobs
    sharing the cores do not inflate (one torch thread: CPU seconds = compute seconds)."""
    if choice == "auto":
        return "wall" if device_type == "cuda" else "process"
    if choice not in CLOCKS:
        from sasi_online.errors import UserInputError

        raise UserInputError(f"--clock {choice!r}: choose auto, wall or process")
    return choice


def _timed(gen: Any, prompts, vps, seeds, repeats: int, warmup: bool,
           clock: str = "wall") -> tuple[Any, float]:
    """Images and best seconds on `clock` over `repeats` calls (after one warm-up batch)."""
    now = CLOCKS[clock]
    if warmup:
        k = max(1, min(len(prompts), gen.cfg.batch_size))
        gen.generate(prompts[:k], vps[:k], seeds[:k])
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = now()
        result = gen.generate(prompts, vps, seeds)
        best = min(best, now() - t0)
    return result, best


def _row(knob: Knob, gen: Any, result: Any, seconds: float, ref: Optional[dict],
         ref_images: np.ndarray, clip: Any) -> dict:
    from PIL import Image

    n = len(result.images)
    drift = pixel_drift(result.images, ref_images)
    row = {"name": knob.name, "group": knob.group,
           "scheduler": gen.cfg.scheduler, "steps": gen.cfg.steps, "strength": gen.cfg.strength,
           "resolution": gen.cfg.resolution, "batch_size": gen.cfg.batch_size,
           "deep_cache_interval": gen.cfg.deep_cache_interval,
           "fused_step": bool(getattr(gen.cfg, "fused_step", True)),
           "images": n, "all_finite": bool(result.finite.all()), "seconds": round(seconds, 4),
           "sasi_per_s": round(n / seconds, 4),
           "denoise_share": round(result.seconds.get("denoise", 0.0) / max(seconds, 1e-9), 3),
           "pixel_drift": round(float(drift.mean()), 5), "pixel_drift_max": round(float(drift.max()), 5)}
    row["speedup"] = round(row["sasi_per_s"] / ref["sasi_per_s"], 3) if ref else 1.0
    if clip is not None:
        size = ref_images.shape[1]
        mine = [Image.fromarray(im) for im in resize_to(result.images, size)]
        cos = clip.cosine(mine, [Image.fromarray(im) for im in ref_images])
        row["clip_cosine"] = round(float(cos.mean()), 5)
        row["clip_cosine_min"] = round(float(cos.min()), 5)
    return row


def run_bench(models: str | Path, out: str | Path, *, kind: str = "image", images: int = 8,
              resolution: int = 64, ref_scheduler: str = "dpmsolver++", ref_steps: int = 25,
              ref_strength: float = 1.0, knobs: Sequence[str] = GROUPS,
              solver_steps: Sequence[int] = (10, 15, 20), strengths: Sequence[float] = (0.5, 0.8),
              resolution_fractions: Sequence[float] = (0.75, 0.5), batch_sizes: Sequence[int] = (4, 8),
              deep_cache: Sequence[int] = (2, 3), fused_schedulers: Sequence[str] = ("ddim", "ddpm"),
              device: str = "auto", dtype: str = "auto", repeats: int = 1, warmup: bool = True,
              clock: str = "auto", use_clip: bool = True, progress: bool = True) -> dict:
    """Measure every knob against the reference; write JSON (after each row), Markdown, PNG."""
    import torch
    from tqdm.auto import tqdm

    from sasi_online.config import Config
    from sasi_online.errors import UserInputError
    from sasi_online.generation import SASIGenerator
    from sasi_online.utils import atomic_write_json, atomic_write_text

    if images < 1:
        raise UserInputError(f"--images must be >= 1, got {images}")
    plan_knobs(knobs, ref_steps, (), (), (), (), (), ())  # unknown groups fail before models load
    cfg = Config()
    cfg.models.root = str(models)
    g = cfg.generation
    g.scheduler, g.steps, g.strength, g.resolution = ref_scheduler, ref_steps, ref_strength, resolution
    g.batch_size, g.deep_cache_interval, g.backend, g.device, g.dtype = 1, 1, "eager", device, dtype
    base = SASIGenerator.from_config(cfg.models, g)
    clock = pick_clock(clock, base.device.type)
    fam = base.family(base.family_for(kind))  # load once; every row shares these modules
    multiple = fam.vae_scale_factor * 2 ** (len(fam.unet.config.block_out_channels) - 1)
    plan = plan_knobs(knobs, ref_steps, solver_steps, strengths,
                      smaller_resolutions(resolution, resolution_fractions, multiple),
                      batch_sizes, deep_cache, fused_schedulers)
    prompts, vps, seeds = make_inputs(kind, images, resolution, cfg.models)
    clip = None
    if use_clip:
        from sasi_online.eval.similarity import ClipSimilarity

        clip = ClipSimilarity(cfg.models.path("clip"), device=str(base.device))

    out = Path(out)
    report: dict = {
        "reference": {"kind": kind, "scheduler": ref_scheduler, "steps": ref_steps,
                      "strength": ref_strength, "resolution": resolution, "batch_size": 1,
                      "backend": "eager", "images": images},
        "environment": {"device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
                        "torch": torch.__version__, "threads": torch.get_num_threads(), "clock": clock,
                        "python": platform.python_version(), "models": str(models)},
        "rows": []}

    ref_result, ref_seconds = _timed(base, prompts, vps, seeds, repeats, warmup, clock)
    ref_images = ref_result.images
    ref_row = _row(Knob("reference", "reference"), base, ref_result, ref_seconds, None, ref_images, clip)
    report["rows"].append(ref_row)
    atomic_write_json(out / "speed_knobs.json", report)
    for knob in tqdm(plan, desc="speed knobs", unit="knob", disable=not progress):
        gen = base.with_settings(**knob.settings)
        result, seconds = _timed(gen, prompts, vps, seeds, repeats, warmup, clock)
        report["rows"].append(_row(knob, gen, result, seconds, ref_row, ref_images, clip))
        atomic_write_json(out / "speed_knobs.json", report)  # a run cut short keeps what finished
    if plan:  # the reference once more: how much the machine's speed moved during the run
        _, again = _timed(base, prompts, vps, seeds, repeats, False, clock)
        report["reference_again_sasi_per_s"] = round(images / again, 4)
    atomic_write_json(out / "speed_knobs.json", report)
    atomic_write_text(out / "speed_knobs.md", markdown_table(report))
    write_scatter(report, out / "speed_knobs.png")
    return report


# --------------------------------------------------------------------------- reporting
def markdown_table(report: dict) -> str:
    ref, env = report["reference"], report["environment"]
    has_clip = any("clip_cosine" in r for r in report["rows"])
    head = "| knob | group | SASI/s | speed-up | pixel drift (/255) | max | " + \
        ("CLIP cosine | " if has_clip else "") + "finite |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["rows"]:
        cells = [r["name"], r["group"], f"{r['sasi_per_s']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['pixel_drift']:.4f}", f"{r['pixel_drift_max']:.4f}"]
        if has_clip:
            cells.append(f"{r.get('clip_cosine', float('nan')):.4f}")
        cells.append("yes" if r["all_finite"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    again = report.get("reference_again_sasi_per_s")
    note = [
        "",
        f"Reference: VP kind {ref['kind']}, {ref['scheduler']} {ref['steps']} steps, strength "
        f"{ref['strength']:g}, {ref['resolution']} px, batch 1, eager; {ref['images']} SASI per row, "
        f"same prompts, visual prompts and seeds in every row.",
        f"Machine: {env['device']} {env['dtype']}, torch {env['torch']}, {env['threads']} thread(s); "
        f"models {env['models']}. Seconds on the {env['clock']} clock"
        + (" (the process's CPU time: other jobs on shared cores do not count)."
           if env["clock"] == "process" else "."),
        "Drift: mean |pixel - reference pixel| / 255 (smaller images upsampled bicubic first) and "
        "the CLIP image cosine to the reference image. Rows that change the noise a seed draws "
        "(DDPM's per-step noise, a smaller latent) measure the distance between two samples, "
        "not an approximation error: compare those rows with each other.",
    ]
    if again:
        note.append(f"Reference timed again at the end: {again:.3f} SASI/s (start "
                    f"{report['rows'][0]['sasi_per_s']:.3f}): speed-ups are good to about that spread.")
    return "\n".join(lines + note) + "\n"


def write_scatter(report: dict, path: str | Path) -> Path:
    """Speed-up (y) against pixel drift (x), one labelled point per row, PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sasi_online.utils import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = list(dict.fromkeys(r["group"] for r in report["rows"]))
    for i, group in enumerate(groups):
        rows = [r for r in report["rows"] if r["group"] == group]
        ax.scatter([r["pixel_drift"] for r in rows], [r["speedup"] for r in rows],
                   label=group, color=plt.cm.tab10(i % 10), s=28)
        for r in rows:
            ax.annotate(r["name"], (r["pixel_drift"], r["speedup"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlabel("drift from the reference: mean |pixel difference| / 255")
    ax.set_ylabel("speed-up over the reference (SASI/s ratio)")
    ref = report["reference"]
    ax.set_title(f"Speed knobs vs {ref['scheduler']} {ref['steps']} steps, {ref['resolution']} px",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# --------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="runs/tiny-zoo",
                        help="model set root (HF layout); the tiny set is built there if missing")
    parser.add_argument("--out", default="runs/bench_speed_knobs", help="folder for JSON, Markdown, PNG")
    parser.add_argument("--kind", default="image", choices=("image", "mix", "mask", "noise"),
                        help="VP kind (the strength knob needs image or mix)")
    parser.add_argument("--images", type=int, default=8, help="SASI per row (same seeds in every row)")
    parser.add_argument("--resolution", type=int, default=64, help="reference size (512 for SD-1.5/2.1)")
    parser.add_argument("--ref-scheduler", default="dpmsolver++")
    parser.add_argument("--ref-steps", type=int, default=25)
    parser.add_argument("--ref-strength", type=float, default=1.0)
    parser.add_argument("--knobs", default=",".join(GROUPS), help="groups to measure")
    parser.add_argument("--solver-steps", default="10,15,20")
    parser.add_argument("--strengths", default="0.5,0.8")
    parser.add_argument("--resolution-fractions", default="0.75,0.5")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--deep-cache", default="2,3", help="DeepCache intervals")
    parser.add_argument("--fused-schedulers", default="ddim,ddpm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per row (best is kept)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up batch")
    parser.add_argument("--clock", default="auto", choices=("auto", "wall", "process"),
                        help="auto: wall on a GPU, the process's CPU time on a CPU")
    parser.add_argument("--no-clip", action="store_true", help="pixel drift only (no clip/ folder)")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from sasi_online.errors import UserInputError
    from sasi_online.utils import limit_threads
    from sasi_online.zoo import build_zoo

    limit_threads()
    models = Path(args.models)
    if not models.exists() and args.models == parser.get_default("models"):
        build_zoo(models, seed=0)
    try:
        report = run_bench(
            models, args.out, kind=args.kind, images=args.images, resolution=args.resolution,
            ref_scheduler=args.ref_scheduler, ref_steps=args.ref_steps, ref_strength=args.ref_strength,
            knobs=[k.strip() for k in args.knobs.split(",") if k.strip()],
            solver_steps=_ints(args.solver_steps), strengths=_floats(args.strengths),
            resolution_fractions=_floats(args.resolution_fractions),
            batch_sizes=_ints(args.batch_sizes), deep_cache=_ints(args.deep_cache),
            fused_schedulers=[s for s in args.fused_schedulers.split(",") if s],
            device=args.device, dtype=args.dtype, repeats=args.repeats, warmup=not args.no_warmup,
            clock=args.clock,
            use_clip=not args.no_clip)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(report))
    print(json.dumps({"out": str(Path(args.out).resolve())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
