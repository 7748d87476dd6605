"""One rank of the LARS-under-ZeRO check (tests/test_recipes.py): a small MLP whose layers
have very different weight-to-gradient ratios, also within a layer (rows scaled), trained 2
steps by DeepSpeed with our LARS at ZeRO-1/2, fp32 and bf16. Rank 0 saves the final
weights per setting. Run: python -m torch.distributed.run --nproc_per_node 2 THIS OUT_DIR"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

LR, ETA, WD, STEPS, BATCH = 2.5, 0.02, 1e-3, 2, 16
SETTINGS = [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16")]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[:8] *= 10.0  # the first half of layer 1: one trainer's ZeRO slice
        model[2].weight *= 5.0
    return model


def groups_of(model: nn.Sequential) -> list[dict]:
    return [{"name": "decay", "kind": "decay", "params": [model[0].weight, model[2].weight], "lars_exclude": False},
            {"name": "no_decay", "kind": "no_decay", "params": [model[0].bias, model[2].bias],
             "weight_decay": 0.0, "lars_exclude": True}]


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def run(zero: int, precision: str, out: Path, rank: int) -> None:
    from sasi_online.training.engine import build_engine
    from sasi_online.training.optim import build_optimizer

    model = make_model()
    cfg = SimpleNamespace(name="lars", lr=LR, weight_decay=WD, momentum=0.9, exclude_bias_norm=True,
                          lars_eta=ETA, lars_clip=False, clip_grad=0.0)
    optimizer = build_optimizer(cfg, groups_of(model), 256)  # lr per 256 at a batch of 256: LR
    conf = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "train_batch_size": 2 * BATCH,
            "zero_optimization": {"stage": zero}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9, "checkpoint": {"tag_validation": "Ignore"}}
    if precision == "bf16":
        conf["bf16"] = {"enabled": True}
    engine = build_engine(model, optimizer, None, conf, None)
    assert optimizer.partitioned, "ZeRO >= 1 must make LARS's norms global"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for step in range(STEPS):
        x, y = batch(rank, step)
        loss = ((engine(x.to(dtype)).float() - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
    if rank == 0:
        torch.save({n: p.detach().float().clone() for n, p in model.named_parameters()},
                   out / f"zero{zero}_{precision}.pt")


def main() -> None:
    import torch.distributed as dist

    from sasi_online.training.engine import init_process_group

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    init_process_group()
    rank = dist.get_rank()
    for zero, precision in SETTINGS:
        run(zero, precision, out, rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
