"""The same training four ways: no SASI, an offline store, online producers, co-located.

    python bench/bench_offline_online.py --zoo tiny-zoo --out bench_results/offline_online \
        [--config configs/online_tiny.yaml] [--steps 60] [--limit 512] [--variants 1] [--gpus N]

Same config, steps, seeds and dataset (`data.limit` images) in every way:
  none     pair_mode=base, one trainer rank;
  offline  `--variants` SASI per image generated into a store first (timed), then one
           trainer rank with pair_mode from the config reading the store;
  online   `online.producers` producer ranks beside one trainer rank (deepspeed launcher);
  colocated  the trainer ranks only, each making its own SASI between steps
           (online.mode=colocated, one batch every `--colocated-every` micro-steps: the
           one-GPU way).
Reported per way: trainer images/s (mean over logged intervals), trainer wait per step
(data_wait_s), total wall-clock including generation, and distinct SASI per image seen by
the run. The online/offline and colocated/none trainer-throughput ratios are stated, not
asserted (a co-located trainer spends part of its time generating, by design).
Writes offline_online.json, offline_online.md and offline_online.png into --out after
each way, so an interrupted run keeps what finished.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: int, config: str, overrides: list[str]) -> float:
    from sasi_online.utils import child_env

    env = child_env()  # the ranks import the installed package, never the checkout's top folder
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    # the `deepspeed` command, run through this interpreter so that PATH does not matter
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), "sasi_online/train.py", "--config", config, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_figures(out: Path) -> dict:
    from sasi_online.training.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl", "images_per_s")
    steps = rows[-1]["step"] if rows else 0
    return {"trainer_images_per_s": sum(r["images_per_s"] for r in rows) / max(len(rows), 1),
            "trainer_wait_s_per_step": sum(r.get("data_wait_s", 0.0) for r in rows) / max(steps, 1),
            "steps": steps, "last": rows[-1] if rows else {}}


def _write(out: Path, results: dict) -> None:
    from sasi_online.utils import atomic_write_json, atomic_write_text

    atomic_write_json(out / "offline_online.json", results)
    ways = results["ways"]
    lines = ["| way | trainer img/s | trainer wait s/step | wall-clock s (incl. generation) | distinct SASI / image |",
             "|---|---|---|---|---|"]
    for name, w in ways.items():
        lines.append(f"| {name} | {w['trainer_images_per_s']:.1f} | {w['trainer_wait_s_per_step']:.4f} | "
                     f"{w['wall_s']:.1f} | {w['sasi_per_image']:.2f} |")
    if "online_over_offline_throughput" in results:
        lines.append("")
        lines.append(f"Online / offline trainer throughput: {results['online_over_offline_throughput']:.2f}x "
                     f"(stated, not asserted; {results['note']})")
    if "colocated_over_none_throughput" in results:
        lines.append("")
        lines.append(f"Co-located / no-SASI trainer throughput: {results['colocated_over_none_throughput']:.2f}x "
                     f"(stated, not asserted: the trainer also generates, one batch every "
                     f"{results['colocated_every']} micro-steps)")
    atomic_write_text(out / "offline_online.md", "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sasi_online.utils import save_figure

    names = list(ways)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, key, title in zip(axes, ("trainer_images_per_s", "wall_s", "sasi_per_image"),
                              ("trainer images/s", "wall-clock s (incl. generation)", "distinct SASI / image")):
        ax.bar(names, [ways[n][key] for n in names], color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][:len(names)])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "offline_online.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/online_tiny.yaml")
    ap.add_argument("--zoo", required=True, help="model set root (models.root)")
    ap.add_argument("--out", default="bench_results/offline_online")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=512, help="dataset images used by every way")
    ap.add_argument("--variants", type=int, default=1, help="offline SASI per image (the paper: 1-3)")
    ap.add_argument("--trainers", type=int, default=1)
    ap.add_argument("--colocated-every", type=int, default=1, help="co-located way: online.colocated_every")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)

    from sasi_online.config import load_config
    from sasi_online.data.store import SasiStore
    from sasi_online.generation.offline import generate_store
    from sasi_online.utils import limit_threads

    limit_threads()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"models.root={Path(args.zoo).resolve()}", f"train.steps={args.steps}", f"data.limit={args.limit}",
              "train.knn_every=100000", "train.knn_bank=100", "train.knn_test=100",
              f"train.ckpt_every={args.steps}", *args.overrides]
    cfg = load_config(REPO / args.config, common)
    producers = max(cfg.online.producers, 1)
    results: dict = {"config": args.config, "steps": args.steps, "limit": args.limit, "trainers": args.trainers,
                     "producers": producers, "offline_variants": args.variants, "ways": {}}

    # 1. no SASI
    run = out / "none"
    wall = _launch(args.trainers, args.config, common + [f"train.out={run}", "online.producers=0",
                                                       "train.pair_mode=base", "train.resume=false"])
    results["ways"]["none"] = {**_train_figures(run), "wall_s": wall, "sasi_per_image": 0.0}
    _write(out, results)

    # 2. offline: generate a store first (timed), then train from it
    store = out / "store"
    t0 = time.perf_counter()
    generate_store(cfg, store, variants=args.variants, limit=args.limit, progress=True)
    gen_wall = time.perf_counter() - t0
    run = out / "offline"
    wall = _launch(args.trainers, args.config, common + [f"train.out={run}", "online.producers=0",
                                                       f"store.path={store}", "train.resume=false"])
    with SasiStore.open(store) as st:
        per_image = sum(len(st.usable_variants(i)) for i in range(args.limit)) / args.limit
    results["ways"]["offline"] = {**_train_figures(run), "wall_s": gen_wall + wall, "generation_s": gen_wall,
                                  "sasi_per_image": per_image}
    _write(out, results)

    # 3. online: producers beside the trainers, one launch
    run = out / "online"
    wall = _launch(args.trainers + producers, args.config,
                   common + [f"train.out={run}", f"online.producers={producers}", "train.resume=false"])
    fig = _train_figures(run)
    results["ways"]["online"] = {**fig, "wall_s": wall,
                                 "sasi_per_image": float(fig["last"].get("online/sasi_per_image_mean", 0.0)),
                                 "hit_rate_total": float(fig["last"].get("online/hit_rate_total", 0.0))}
    off = results["ways"]["offline"]["trainer_images_per_s"]
    results["online_over_offline_throughput"] = results["ways"]["online"]["trainer_images_per_s"] / max(off, 1e-9)
    results["note"] = ("on a shared CPU producers and trainers compete for the same cores; on GPUs each "
                       "role has its own device")
    _write(out, results)

    # 4. co-located: no producer ranks; each trainer makes its own SASI between steps
    run = out / "colocated"
    wall = _launch(args.trainers, args.config,
                   common + [f"train.out={run}", "online.mode=colocated", "online.producers=0",
                             f"online.colocated_every={args.colocated_every}", "train.resume=false"])
    fig = _train_figures(run)
    results["ways"]["colocated"] = {**fig, "wall_s": wall,
                                    "sasi_per_image": float(fig["last"].get("online/sasi_per_image_mean", 0.0)),
                                    "hit_rate_total": float(fig["last"].get("online/hit_rate_total", 0.0))}
    none = results["ways"]["none"]["trainer_images_per_s"]
    results["colocated_every"] = args.colocated_every
    results["colocated_over_none_throughput"] = fig["trainer_images_per_s"] / max(none, 1e-9)
    _write(out, results)
    print((out / "offline_online.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
