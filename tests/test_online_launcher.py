"""Generation in the loop through the deepspeed launcher on the CPU.

One module-scoped run, 1 producer + 2 trainers (ZeRO-1, a producer batch that fails on
purpose, then the producer loop dies mid-run), then its resume. Then 2 producers + 1
trainer with the process groups' timeout at 10 s: one producer sleeps 30 s before its
first SASI, the other fails at once. Checked from what the runs leave on disk:
online_summary.json, metrics.jsonl, the per-rank ring and producer states of each checkpoint.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from _multirank import free_port, run_ranks

BATCH = 8  # per trainer
COMMON = ["train.batch_size=8", "train.log_every=2", "train.knn_every=1000", "train.knn_bank=100",
          "train.knn_test=100", "train.zero_stage=1", "generation.text=class_name", "generation.steps=2",
          "generation.batch_size=8", "online.lookahead=6", "online.start_sasi=8", "online.max_age=50"]


def _launch(zoo, out, *overrides, timeout=240):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "3", "--master_port", str(free_port()),
           "sasi_online/train.py", "--config", "configs/online_tiny.yaml", f"models.root={zoo}", f"train.out={out}",
           *COMMON, *overrides]
    code, log = run_ranks(cmd, timeout)
    assert code == 0, log[-4000:]
    return log


def _ckpt(out, step, name):
    return torch.load(Path(out) / "checkpoints" / f"global_step{step}" / name, weights_only=True)


def _check_accounting(out, step, micro_steps, trainers=(0, 1), producers=(2,)):
    """A checkpoint is a quiet point: SASI made = SASI received by trainers + producer outbox
    + dropped at a resume (a checkpoint holds no pixels), every sample counted in exactly
    one pairing outcome, no (index, variant) twice."""
    from test_groups import assert_no_pixels

    folder = Path(out) / "checkpoints" / f"global_step{step}"
    assert_no_pixels(*[folder / f"producer_rank{p}.pt" for p in producers],
                     *[folder / f"ring_rank{r}.pt" for r in trainers])
    states = [_ckpt(out, step, f"producer_rank{p}.pt") for p in producers]
    producer = states[0]
    rings = [_ckpt(out, step, f"ring_rank{r}.pt") for r in trainers]
    outbox = sum(len(m["indices"]) for st in states for msgs in st["outbox"].values() for m in msgs)
    dropped = sum(st["counts"].get("dropped_at_resume", 0) for st in states)
    received = sum(r["counts"].get("received", 0) for r in rings)
    assert sum(st["counts"].get("generated", 0) for st in states) == received + outbox + dropped
    for r in rings:
        assert sum(r["source_counts"].values()) == micro_steps * BATCH
    keys = [(int(i), int(v)) for r in rings for i, v in zip(r["ring"]["index"], r["ring"]["variant"]) if i >= 0]
    assert len(keys) == len(set(keys))
    return producer, rings


# Producer batch 0 fails (caught, skipped); after 10 batches the producer loop itself raises:
# the producer stops mid-run, and, as a drill (online.allow_fallback_only: no producer left
# would otherwise stop the run), the trainers finish, checkpoint and end on pool draws and
# classic views. The resumed launch runs the same config (same faults) from step 8.
FAULTS = ["online.fault_batch=0", "online.fault_loop_after=10", "online.allow_fallback_only=true"]


@pytest.fixture(scope="module")
def first_run(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "run"
    log = _launch(tiny_zoo, out, "train.steps=8", "train.ckpt_every=4", *FAULTS)
    return out, log


def test_three_rank_run_hits_the_ring_and_trainers_agree(first_run):
    out, _ = first_run
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["outcomes"]["ring_hit"] > 0
    assert sum(summary["outcomes"].values()) == 8 * 2 * BATCH
    assert summary["replica_max_abs_diff"] <= 1e-6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "online/ring_fill" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8]
    assert max(r["online/ring_fill"] for r in logged) > 0 and logged[-1]["online/sasi_received"] > 0
    for png in ("online_ring.png", "online_throughput.png"):
        assert (out / png).stat().st_size > 1000
    for step in (4, 8):
        _check_accounting(out, step, step)


def test_producer_faults_are_survived(first_run):
    out, log = first_run
    producer = json.loads((out / "online_summary.json").read_text())["producers"][0]
    assert producer["failed_batches"] == 1  # batch 0 raised inside generation: skipped
    assert producer["generated"] == 9 * 8  # the nine batches after it made their SASI
    assert producer["stopped"] == 1 and "fault_loop_after" in producer["error"]
    assert "STOPPED producing" in log
    assert (out / "checkpoints" / "global_step8" / "meta.json").is_file()  # saved after the producer died


def test_resume_continues_ring_and_accounting(tiny_zoo, first_run):
    out, _ = first_run
    before, rings = _check_accounting(out, 8, 8)
    held = [int((r["ring"]["index"] >= 0).sum()) + len(r["backlog"]["index"]) for r in rings]
    _launch(tiny_zoo, out, "train.steps=12", "train.ckpt_every=4", *FAULTS)
    after, rings = _check_accounting(out, 12, 12)  # outcome counts continued from step 8
    # no pixels in the checkpoint: what ring and backlog held at step 8 was dropped at resume
    assert [r["ring"]["counts"]["dropped_at_resume"] for r in rings] == held and sum(held) > 0
    assert after["counts"]["generated"] > before["counts"]["generated"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "online/ring_fill" in r] == [2, 4, 6, 8, 10, 12]  # nothing redone


def test_slow_and_failed_producers_cannot_time_out_the_job(tiny_zoo, tmp_path):
    """Every wait of ours polls; none is a collective or store read a slow peer can run into
    its timeout. Producer 0 (rank 1) sleeps 30 s, three group timeouts, before its first SASI
    (a long model load) while the trainer waits at its first quiet point (step 2); producer 1
    (rank 2) fails at once and sends STOP. The job finishes, checkpoints and exits 0."""
    out = tmp_path / "run"
    _launch(tiny_zoo, out, "train.steps=8", "train.ckpt_every=2", "train.dist_timeout_s=10", "online.producers=2",
            "online.start_sasi=0", "online.fault_delay_s=30", "online.fault_delay_producer=0",
            "online.fault_loop_after=0", "online.fault_producer=1", timeout=200)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 8
    summary = json.loads((out / "online_summary.json").read_text())
    slow, failed = summary["producers"]
    assert failed["stopped"] == 1 and failed["generated"] == 0 and "fault_loop_after" in failed["error"]
    assert slow["stopped"] == 0 and slow["generated"] > 0 and slow["wall_s"] > 30
    assert sum(summary["outcomes"].values()) == 8 * BATCH and summary["outcomes"]["ring_hit"] > 0
    _check_accounting(out, 8, 8, trainers=(0,), producers=(1, 2))
