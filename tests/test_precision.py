"""bf16 and LARS done right under DeepSpeed: EMA targets, queues, banks and centres keep fp32
state under bf16 (a target moves as far as in fp32), and LARS trust ratios are per layer under
ZeRO-1/2 and bf16 (2 ranks, against a per-layer reference)."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from _multirank import free_port, run_ranks
from sasi_online.config import Config, resolve_recipe
from sasi_online.ssl import METHODS


def tiny_backbone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 16


@pytest.fixture(scope="module")
def roles():
    """A 1-rank world with the trainer's groups (as train() builds them), torn down after."""
    from sasi_online.online.roles import setup_roles
    from sasi_online.training.engine import destroy_process_group, init_process_group

    created = init_process_group()
    yield setup_roles(0)
    if created:
        destroy_process_group()


def engine_for(roles, name: str, precision: str, steps: int, **method):
    from sasi_online.training.engine import build_engine, deepspeed_config
    from sasi_online.training.optim import build_optimizer
    from sasi_online.training.schedule import build_scheduler

    cfg = Config()
    cfg.method.name, cfg.train.precision = name, precision
    for key, value in dict(proj_hidden=32, proj_dim=16, pred_hidden=32, queue_size=64, **method).items():
        setattr(cfg.method, key, value)
    cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps = "sgd", 0.01, 0
    resolve_recipe(cfg)
    torch.manual_seed(0)
    m = METHODS[name](cfg.method, *tiny_backbone())
    opt = build_optimizer(cfg.optim, m.param_groups(), 256)
    engine = build_engine(m, opt, build_scheduler(opt, cfg.optim, steps), deepspeed_config(cfg, 16, 1), roles.mpu)
    return engine, m


def target_drift(roles, precision: str, steps: int = 50, restore: bool = True) -> float:
    engine, m = engine_for(roles, "byol", precision, steps, momentum=0.999, momentum_final=0.999)
    if not restore:  # what DeepSpeed alone leaves: bf16 targets
        for target in m.fp32_modules():
            target.bfloat16()
    start = torch.cat([p.detach().float().flatten() for p in m.target_backbone.parameters()])
    g = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for step in range(steps):
        views = [torch.randn(16, 3, 16, 16, generator=g).to(dtype) for _ in range(2)]
        out = engine(views, step, steps)
        engine.backward(out["loss"])
        engine.step()
        m.on_step_end(step, steps)
    end = torch.cat([p.detach().float().flatten() for p in m.target_backbone.parameters()])
    return float((end - start).norm() / start.norm())


def test_bf16_targets_drift_like_fp32_over_50_steps(roles):
    fp32, bf16 = target_drift(roles, "fp32"), target_drift(roles, "bf16")
    assert abs(bf16 - fp32) <= 0.10 * fp32, (fp32, bf16)
    swallowed = target_drift(roles, "bf16", restore=False)  # the failure this guards against
    assert swallowed < 0.75 * fp32, (fp32, swallowed)


@pytest.mark.parametrize("name,state", [("mocov2", ["queue"]), ("adco", ["memory_bank", "bank_velocity"]),
                                        ("dino", ["center"]), ("swav", ["queue"])])
def test_bf16_keeps_fp32_state_for_targets_queues_banks_and_centres(roles, name, state):
    extra = {"num_prototypes": 12, "extra": {"queue_length": 32}} if name == "swav" else {"num_prototypes": 12}
    engine, m = engine_for(roles, name, "bf16", 4, **extra)
    assert next(m.backbone.parameters()).dtype == torch.bfloat16  # the online network is bf16
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        views = [torch.randn(16, 3, 16, 16, generator=g).bfloat16() for _ in range(2)]
        out = engine(views, step, 4)
        engine.backward(out["loss"])
        engine.step()
        m.on_step_end(step, 4)
    for target in m.fp32_modules():
        assert all(p.dtype == torch.float32 for p in target.parameters())
        assert all(b.dtype == torch.float32 for b in target.buffers() if b.is_floating_point())
    for buf in state:
        assert getattr(m, buf).dtype == torch.float32, buf


def _reference_lars(zero_bf16: bool, per_layer: bool) -> dict:
    """Two LARS steps on the full batch of both ranks, written from the formula, per layer
    (or, to show the check would catch it, per ZeRO slice of 2 ranks)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import _lars_worker as W

    model = W.make_model()
    if zero_bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16().float())
    params = dict(model.named_parameters())
    bufs: dict = {}
    for step in range(W.STEPS):
        xs, ys = zip(*(W.batch(r, step) for r in range(2)))
        model.zero_grad()
        ((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean().backward()
        with torch.no_grad():
            for name, p in params.items():
                adapt = p.ndim > 1
                wd = W.WD if adapt else 0.0
                g = p.grad + wd * p
                if adapt:
                    pieces = [(p, p.grad)] if per_layer else list(zip(p.flatten().chunk(2), p.grad.flatten().chunk(2)))
                    trust = torch.cat([torch.full((w.numel(),), float(W.ETA * w.norm() / (gr.norm() + wd * w.norm())))
                                       for w, gr in pieces]).view_as(p)
                    g = g * trust
                bufs[name] = g.clone() if name not in bufs else bufs[name] * 0.9 + g
                p -= W.LR * bufs[name]
    return {n: p.detach().clone() for n, p in params.items()}


def test_lars_trust_ratios_are_per_layer_under_zero_and_bf16(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/_lars_worker.py", str(tmp_path)]
    code, log = run_ranks(cmd, timeout=240)
    assert code == 0, log[-3000:]
    import _lars_worker as W

    start = {n: p.detach() for n, p in W.make_model().named_parameters()}
    for zero, precision in W.SETTINGS:
        got = torch.load(tmp_path / f"zero{zero}_{precision}.pt", weights_only=True)
        bf16 = precision == "bf16"
        want = _reference_lars(bf16, per_layer=True)
        sliced = _reference_lars(bf16, per_layer=False)
        for name in ("0.weight", "2.weight"):
            moved, expected = got[name] - start[name], want[name] - start[name]
            err = float((moved - expected).norm() / expected.norm())
            assert err < (0.1 if bf16 else 1e-4), (zero, precision, name, err)
        # per-slice trust ratios (what a flat ZeRO partition gives) would be far off: the two
        # trainers' halves of layer 1 differ tenfold in scale
        wrong = float(((sliced["0.weight"] - start["0.weight"]) - (want["0.weight"] - start["0.weight"])).norm()
                      / (want["0.weight"] - start["0.weight"]).norm())
        assert wrong > 0.3, wrong
