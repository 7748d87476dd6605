"""Process groups on a world that, like NCCL, has no backend for CPU tensors.

Two ranks start the world as `init_process_group("cuda:gloo")` (gloo registered for CUDA
only): every CPU tensor sent to a world collective fails exactly as it would under NCCL on
GPUs ("No backend type associated with device type cpu"). On that world they train
through `train()` offline (replicas must agree), then co-located online with checkpoints
(accounting checked), and show that DeepSpeed's save, left unrouted, fails there while the
project's save (its barriers on the gloo control group) succeeds. Run as a script, this
file is the per-rank worker (`python -m torch.distributed.run --nproc_per_node 2 ...`).
"""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(Path(__file__).resolve().parent) not in sys.path:  # run as a worker script: tests/ for _multirank
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _multirank import free_port, run_ranks  # noqa: E402

BATCH = 8
COLOCATED = ["online.mode=colocated", "online.producers=0", "online.colocated_every=1", "online.lookahead=6",
             "online.start_sasi=8", "online.max_age=50", "generation.text=class_name", "generation.steps=2",
             "generation.batch_size=8", f"train.batch_size={BATCH}", "train.log_every=2", "train.knn_every=1000",
             "train.knn_bank=100", "train.knn_test=100", "train.zero_stage=1", "online.plots=false"]


def colocated_cfg(zoo, out, *more):
    from sasi_online.config import load_config

    return load_config(REPO / "configs/online_tiny.yaml",
                       [f"models.root={zoo}", f"train.out={out}", *COLOCATED, *more])


def check_colocated_accounting(out, step, trainers):
    """At a checkpoint: every SASI made reached its trainer's ring (nothing in flight),
    every sample counted in exactly one pairing outcome, no (index, variant) twice in a ring."""
    folder = Path(out) / "checkpoints" / f"global_step{step}"
    hits = 0
    for r in range(trainers):
        ring = torch.load(folder / f"ring_rank{r}.pt", weights_only=True)
        prod = torch.load(folder / f"colocated_rank{r}.pt", weights_only=True)
        assert prod["counts"]["generated"] == ring["counts"]["received"] > 0
        assert sum(ring["source_counts"].values()) == step * BATCH
        keys = [(int(i), int(v)) for i, v in zip(ring["ring"]["index"], ring["ring"]["variant"]) if i >= 0]
        assert len(keys) == len(set(keys))
        hits += ring["source_counts"].get("ring_hit", 0)
        assert_no_pixels(folder / f"ring_rank{r}.pt", folder / f"colocated_rank{r}.pt")
    assert hits > 0


def assert_no_pixels(*paths):
    """Ring, backlog and producer states hold metadata and counters: no uint8 images, and a
    size set by the dataset (per-image counters) and the counters, not slots x image bytes."""
    def walk(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v)

    for path in paths:
        tensors = list(walk(torch.load(path, weights_only=True)))
        assert not [t for t in tensors if t.dtype == torch.uint8], path
        assert Path(path).stat().st_size < 64 * 1024 + sum(t.numel() * t.element_size() for t in tensors), path


# ----------------------------------------------------------------------------- in one process
def test_group_for_refuses_a_tensor_its_backend_cannot_carry():
    from sasi_online.online.groups import CONTROL, MODEL, GroupMismatchError, Groups, group_for

    gpu = Groups(trainer="model-group", control="control-group", world_control="world", device=torch.device("cuda", 0))
    with pytest.raises(GroupMismatchError, match="control plane"):
        group_for(torch.zeros(1), MODEL, gpu)  # a CPU tensor to NCCL
    assert group_for(torch.zeros(1), CONTROL, gpu) == "control-group"
    with pytest.raises(GroupMismatchError, match="host"):
        group_for(torch.zeros(1, device="meta"), CONTROL, gpu)  # a device tensor to gloo bookkeeping
    cpu = Groups(trainer="model-group", control="control-group", world_control="world", device=torch.device("cpu"))
    assert group_for(torch.zeros(1), MODEL, cpu) == "model-group"


def test_two_ranks_on_one_gpu_name_the_colocated_mode():
    from sasi_online.errors import UserInputError
    from sasi_online.online.roles import check_devices

    with pytest.raises(UserInputError, match="online.mode=colocated"):
        check_devices("launched", local_ranks=2, gpus=1)
    check_devices("colocated", local_ranks=1, gpus=1)
    check_devices("launched", local_ranks=8, gpus=8)


def _launcher_env(launcher: str, rank: int, nodes: int = 2, per_node: int = 8) -> dict:
    """A rank's environment as each launcher sets it (deepspeed/launcher/launch.py;
    torch.distributed.run's elastic agent), ranks numbered node by node."""
    node, local = divmod(rank, per_node)
    env = {"RANK": str(rank), "WORLD_SIZE": str(nodes * per_node), "LOCAL_RANK": str(local),
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    if launcher == "deepspeed":
        return {**env, "LOCAL_SIZE": str(per_node), "CROSS_RANK": str(node), "CROSS_SIZE": str(nodes)}
    return {**env, "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": str(nodes),
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nodes * per_node)}


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_role_map_of_two_nodes_of_eight_gpus_from_each_launcher(launcher):
    from sasi_online.errors import UserInputError
    from sasi_online.online.roles import check_devices, local_layout, producer_ranks_for

    maps = set()
    for rank in range(16):
        layout = local_layout(_launcher_env(launcher, rank), world=16)
        assert (layout.local_rank, layout.local_size, layout.nodes) == (rank % 8, 8, 2)
        check_devices("launched", layout.local_size, gpus=8)  # 8 ranks on each node's 8 GPUs
        maps.add((tuple(producer_ranks_for(16, 4, 2, layout, rank)),  # online.producers_per_node=2
                  tuple(producer_ranks_for(16, 4, 0, layout, rank))))  # default: the last ranks overall
    assert maps == {((6, 7, 14, 15), (12, 13, 14, 15))}  # every rank draws the same map; rank 0 trains
    layout = local_layout(_launcher_env(launcher, 9), world=16)
    with pytest.raises(UserInputError, match="online.producers=4"):
        producer_ranks_for(16, 3, 2, layout, 9)
    with pytest.raises(UserInputError, match="between 0 and 7"):
        producer_ranks_for(16, 16, 8, layout, 9)
    uneven = local_layout(_launcher_env(launcher, 9, nodes=3), world=20)  # 8 + 8 + 4 ranks
    with pytest.raises(UserInputError, match="same number of ranks on every node"):
        producer_ranks_for(20, 6, 2, uneven, 9)
    with pytest.raises(UserInputError, match="at most 8 ranks per machine"):
        check_devices("launched", local_layout(_launcher_env(launcher, 0, per_node=9), 18).local_size, gpus=8)
    assert local_layout({}, world=3) == type(layout)(local_rank=0, local_size=3, nodes=None)  # no launcher


def test_producers_per_node_is_a_launched_mode_option():
    from sasi_online.config import Config
    from sasi_online.errors import UserInputError
    from sasi_online.online.settings import check_online_config

    cfg = Config()
    cfg.online.mode, cfg.online.producers_per_node = "colocated", 1
    with pytest.raises(UserInputError, match="online.producers_per_node=0"):
        check_online_config(cfg)


def test_colocated_one_trainer_trains_checkpoints_and_resumes(tiny_zoo, tmp_path, monkeypatch):
    """One process, no launcher: the trainer makes its own SASI (one GPU's case). Real views
    come from a loader worker; the first step after the resume (step 3: no log, no producer
    batch there, colocated_every=3) raises on any Tensor.item() / Tensor.cpu() and counts
    DeepSpeed's accelerator syncs: nothing in the data path, the device views, forward,
    backward or DeepSpeed's step reads back from the device or waits for it."""
    from test_online_device_views import HostSyncGuard
    from test_train import tiny_method

    from sasi_online.train import train

    out = tmp_path / "run"
    more = ["train.steps=4", "train.ckpt_every=2", "online.fault_batch=1", f"store.path={tmp_path / 'store'}",
            "store.write_online=true", "online.colocated_every=3", "train.num_workers=1"]
    first = train(colocated_cfg(tiny_zoo, out, *more), stop_at=2, method_factory=tiny_method)
    assert first.step == 2
    check_colocated_accounting(out, 2, 1)
    held = int((torch.load(out / "checkpoints/global_step2/ring_rank0.pt", weights_only=True)["ring"]["index"] >= 0).sum())
    guard = HostSyncGuard(monkeypatch, armed_at=3)
    resumed = train(colocated_cfg(tiny_zoo, out, *more), method_factory=tiny_method)
    assert guard.armed_steps == 1 and not guard.calls and resumed.step == 4
    assert sorted(resumed.losses) == [4]  # continued from step 2
    check_colocated_accounting(out, 4, 1)  # counts continued across the resume
    # the checkpoint held no pixels: what the ring held was dropped, then refilled from the store
    ring = torch.load(out / "checkpoints/global_step4/ring_rank0.pt", weights_only=True)["ring"]["counts"]
    assert held > 0 and ring["dropped_at_resume"] == held and 0 < ring["refilled_at_resume"] <= held
    summary = json.loads((out / "online_summary.json").read_text())
    assert summary["mode"] == "colocated" and sum(summary["outcomes"].values()) == 4 * BATCH
    # batch 1 of the first run failed and was skipped, training went on; the resumed ring
    # started from the store's refill (start_sasi reached), so its run made batch 0 only
    # (micro-step 3) and the restored counter stays at 1
    assert summary["producers"][0]["failed_batches"] == 1


# ----------------------------------------------------------------------------- two ranks, cuda:gloo
def _worker(out: str, zoo: str) -> None:
    import torch.distributed as dist

    from test_train import tiny_cfg, tiny_method

    from sasi_online.train import train

    dist.init_process_group("cuda:gloo")  # like NCCL: no backend for CPU tensors
    rank, report = dist.get_rank(), {}
    try:
        dist.all_reduce(torch.zeros(1))
        report["world_refused_cpu"] = False
    except RuntimeError as exc:
        report["world_refused_cpu"] = "No backend type associated with device type cpu" in str(exc)
    offline = Path(out) / "offline"
    cfg = tiny_cfg(offline, train={"zero_stage": 1, "steps": 3, "batch_size": 16, "ckpt_every": 2})
    captured = {}
    train(cfg, method_factory=tiny_method,
          step_callback=lambda step, m: captured.update(params=torch.cat([p.detach().flatten() for p in m.parameters()])))
    torch.save(captured["params"], offline / f"params_rank{rank}.pt")
    online = Path(out) / "colocated"
    train(colocated_cfg(zoo, online, "train.steps=4", "train.ckpt_every=2", f"store.path={Path(out) / 'store'}",
                        "store.write_online=true"), method_factory=tiny_method)
    report["unrouted_save_error"] = _unrouted_save(Path(out) / "unrouted")
    Path(out, f"report{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _unrouted_save(ckpt_dir: Path) -> str:
    """DeepSpeed's save without our routing: its world barriers meet a CPU-less world."""
    from sasi_online.online.groups import set_current
    from sasi_online.online.roles import setup_roles
    from sasi_online.training import checkpoint as ckpt
    from sasi_online.training.engine import build_engine
    from test_train import tiny_cfg

    roles = setup_roles(0)
    model = torch.nn.Linear(2, 2)
    engine = build_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                          {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "steps_per_print": 10 ** 9,
                           "checkpoint": {"tag_validation": "Ignore"}}, roles.mpu)
    error = ""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag="raw")
    except RuntimeError as exc:
        error = str(exc)
    ckpt.save(engine, ckpt_dir, 1, tiny_cfg(ckpt_dir), {"step": 1}, roles.trainer_rank, roles.control_group)
    assert (ckpt_dir / "global_step1" / "meta.json").is_file() or roles.trainer_rank != 0
    set_current(None)
    return error


@pytest.mark.timeout(300)
def test_cuda_only_world_trains_offline_and_colocated(tiny_zoo, tmp_path):
    code, log = run_ranks([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(Path(__file__).resolve()), str(tmp_path),
                           str(tiny_zoo)], timeout=280)
    assert code == 0, log[-4000:]
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_refused_cpu"] for r in reports)
    # offline: both replicas agree, the checkpoint and the log are the first trainer's
    p0, p1 = (torch.load(tmp_path / f"offline/params_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.allclose(p0, p1, rtol=1e-6, atol=1e-6)
    assert (tmp_path / "offline/checkpoints/global_step3/meta.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "offline/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    # co-located, two trainers: accounting at both checkpoints, one writer per (index, variant)
    for step in (2, 4):
        check_colocated_accounting(tmp_path / "colocated", step, 2)
    summary = json.loads((tmp_path / "colocated/online_summary.json").read_text())
    assert sum(summary["outcomes"].values()) == 4 * 2 * BATCH and summary["replica_max_abs_diff"] <= 1e-6
    lines = [json.loads(x) for x in (tmp_path / "store/manifest.jsonl").read_text().splitlines() if x.strip()]
    keys = [(x["index"], x["variant"]) for x in lines]
    assert keys and len(keys) == len(set(keys))
    # DeepSpeed's own save issues world barriers: unrouted they fail like CPU work on NCCL
    assert all("No backend type associated with device type cpu" in r["unrouted_save_error"] for r in reports)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1], sys.argv[2])
