"""PNG plots of an online run from its metrics.jsonl: ring fill and hit rate over time,
and a throughput timeline (trainer images/s beside producer SASI/s)."""
from __future__ import annotations

from pathlib import Path

from sasi_online.utils import save_figure

RING_PLOT, THROUGHPUT_PLOT = "online_ring.png", "online_throughput.png"


def plot_online_run(out_dir: str | Path) -> list[Path]:
    """Write the two plots into `out_dir`; returns their paths (none without online records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sasi_online.training.metrics import read_metrics

    out = Path(out_dir)
    rows = read_metrics(out / "metrics.jsonl", "online/ring_fill")
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("online/ring_fill", "ring fill"), ("online/hit_rate", "hit rate (own image)"),
                       ("online/draw_rate", "pool draws"), ("online/fallback_rate", "classic fallback")):
        ax.plot(steps, [r.get(key, 0.0) for r in rows], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("ring fill and pairing outcomes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / RING_PLOT)
    written.append(out / RING_PLOT)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r.get("images_per_s", 0.0) for r in rows], label="trainer images/s", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("trainer images/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r.get("online/producer_sasi_per_s", 0.0) for r in rows], label="producer SASI/s",
             color="tab:orange")
    ax2.set_ylabel("producer SASI/s", color="tab:orange")
    ax.set_title("throughput")
    fig.tight_layout()
    save_figure(fig, out / THROUGHPUT_PLOT)
    written.append(out / THROUGHPUT_PLOT)
    return written
