"""Each method's published recipe: it is what `method.name` alone gives, it reaches the
optimizer, the schedule and the views, every method trains from it on the CPU (multi-crop
included), its full-size heads have the published shapes (meta device), and the README
table is the code's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sasi_online.config import Config, load_config
from sasi_online.ssl import METHODS, build_method
from sasi_online.ssl.recipes import RECIPES, TABLE_BEGIN, TABLE_END, recipe_table
from sasi_online.training.optim import LARS, build_optimizer
from sasi_online.training.schedule import build_scheduler

REPO = Path(__file__).resolve().parents[1]
# The only fields the CPU runs shrink: head widths, prototypes, queue/bank rows, crop sizes
# (data.image_size scales every crop of the recipe, local ones included).
SHRINK = ["method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32", "method.num_prototypes=24",
          "method.queue_size=64", "data.image_size=16"]


def recipe_cfg(name: str, *extra: str) -> Config:
    return load_config(f"methods/{name}", [*SHRINK, *extra])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_a_few_steps_from_its_own_recipe(name, tmp_path):
    from sasi_online.train import train

    cfg = recipe_cfg(name, "train.pair_mode=base", "train.batch_size=8", "train.steps=2", "data.limit=64",
                     "train.knn_bank=16", "train.knn_test=8", "train.log_every=1", f"train.out={tmp_path}",
                     "method.backbone=resnet18", "method.small_stem=true")
    assert cfg.augment.recipe == RECIPES[name].values["augment.recipe"]
    seen: dict = {}
    result = train(cfg, step_callback=lambda step, m: seen.setdefault("method", m))
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    method = seen["method"]
    assert method.steps_per_epoch == 64 // 8  # epoch-valued knobs use the run's epoch length
    if METHODS[name].multi_crop:  # DINO 2 + 8, SwAV 2 + 6 local crops, from the recipes
        assert cfg.method.local_crops == {"dino": 8, "swav": 6}[name]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_full_size_heads_have_the_published_shapes(name):
    cfg = load_config(f"methods/{name}", ["method.backbone=resnet50", "method.small_stem=false"]).method
    values = RECIPES[name].values
    with torch.device("meta"):
        method = build_method(cfg)
    linears = [m for m in method.modules() if isinstance(m, torch.nn.Linear)]
    outs = {m.out_features for m in linears}
    assert values["method.proj_dim"] in outs
    if name == "mocov3" or name == "byol" or name == "simsiam":
        pred = method.predictor
        assert pred[0].in_features == values["method.proj_dim"]
        assert pred[0].out_features == values["method.pred_hidden"]
    if name in ("dino", "swav"):
        width = values["method.num_prototypes"]
        head = method.head.last_layer if name == "dino" else method.prototypes.layer
        assert head.weight.shape == (width, values["method.proj_dim"])
    first = method.head.mlp[0] if name == "dino" else method.projector[0]
    assert (first.in_features, first.out_features) == (2048, values["method.proj_hidden"])
    if name in ("mocov2", "adco"):
        bank = method.queue if name == "mocov2" else method.memory_bank
        assert bank.shape == (values["method.queue_size"], values["method.proj_dim"])


def test_the_recipe_reaches_the_optimizer_groups():
    def groups_of(name, *extra):
        cfg = recipe_cfg(name, *extra)
        torch.manual_seed(0)
        method = build_method(cfg.method, 64)  # the shrunk queue holds one batch of 64
        return cfg, build_optimizer(cfg.optim, method.param_groups(), 256)

    cfg, opt = groups_of("byol")  # LARS, eta 0.001, biases/norms neither decayed nor adapted
    assert isinstance(opt, LARS) and all(len(g["params"]) == 1 for g in opt.param_groups)
    bias = [g for g in opt.param_groups if g["params"][0].ndim == 1]
    assert bias and all(g["weight_decay"] == 0.0 and g["lars_exclude"] for g in bias)
    weights = [g for g in opt.param_groups if g["params"][0].ndim > 1]
    assert all(g["weight_decay"] == 1.5e-6 and not g["lars_exclude"] and g["eta"] == 0.001 for g in weights)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    _, opt = groups_of("swav")  # LARC over everything: all decayed and adapted
    assert all(g["weight_decay"] == 1e-6 and not g["lars_exclude"] for g in opt.param_groups)
    _, opt = groups_of("mocov2")  # plain SGD over all parameters, wd 1e-4
    assert [len(g["params"]) for g in opt.param_groups] != [1] * len(opt.param_groups)
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    _, opt = groups_of("simsiam")
    assert any(g.get("fixed_lr") for g in opt.param_groups)
    _, opt = groups_of("barlow_twins")  # biases at 0.0048 / 0.2 of the weights' rate
    rates = {round(g["base_lr"] / 0.2, 4) for g in opt.param_groups}
    assert rates == {1.0, 0.024}
    _, opt = groups_of("adco")  # the bank is stepped by the method at a constant rate
    assert all(g.get("name") != "memory_bank" for g in opt.param_groups)


@pytest.mark.parametrize("trust", ["sum", "update"])
def test_lars_trust_formulas_and_larc_clipping(trust):
    """One LARS step of one layer against the formula: "sum" η‖w‖/(‖g‖+wd‖w‖) (LARC, SwAV,
    solo-learn), "update" η‖w‖/‖g+wd·w‖ (SimCLR, BYOL, MoCo-v3, Barlow Twins, VICReg)."""
    torch.manual_seed(0)
    w0, g = torch.randn(6, 5), torch.randn(6, 5) * 3
    lr, eta, wd = 0.7, 0.02, 0.1
    for clip in (False, True):
        w = w0.clone().requires_grad_(True)
        opt = LARS([{"params": [w]}], lr=lr, weight_decay=wd, eta=eta, clip=clip, trust=trust)
        w.grad = g.clone()
        opt.step()
        denom = (g + wd * w0).norm() if trust == "update" else g.norm() + wd * w0.norm()
        ratio = eta * w0.norm() / denom
        if clip:
            ratio = torch.clamp(ratio / lr, max=1.0)
        torch.testing.assert_close(w.detach(), w0 - lr * ratio * (g + wd * w0), rtol=1e-5, atol=1e-6)
    assert load_config("methods/byol").optim.lars_trust == "update"
    assert load_config("methods/swav").optim.lars_trust == "sum"
    assert load_config("cifar10/byol").optim.lars_trust == "sum"  # solo-learn's LARS


def test_dino_schedules_and_per_layer_clip():
    cfg = recipe_cfg("dino", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "optim.warmup_epochs=2")
    torch.manual_seed(0)
    method = build_method(cfg.method, 256)
    opt = build_optimizer(cfg.optim, method.param_groups(), 256)
    sched = build_scheduler(opt, cfg.optim, total_steps=21, steps_per_epoch=5)  # warm-up: 10 steps
    decayed = [g for g in opt.param_groups if g["base_weight_decay"]]
    assert decayed and all(g["weight_decay"] == pytest.approx(0.04) for g in decayed)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[9] == pytest.approx(0.03) and lrs[0] == pytest.approx(0.003)  # 10 warm-up steps, 0.03 per 256
    assert all(g["weight_decay"] == pytest.approx(0.4) for g in decayed)  # cosine 0.04 -> 0.4 at the end
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if not g["base_weight_decay"])
    # DINO's clip: each layer's gradient norm at most 3.0, small ones untouched
    p_big, p_small = [g["params"][0] for g in opt.param_groups[:2]]
    p_big.grad = torch.full_like(p_big, 10.0)
    p_small.grad = torch.full_like(p_small, 1e-4)
    small = p_small.grad.clone()
    opt._clip_layers()
    assert float(p_big.grad.norm()) == pytest.approx(3.0, rel=1e-4)
    torch.testing.assert_close(p_small.grad, small)
    # the last layer starts frozen for one epoch, the teacher temperature is DINO's 0.04
    method.steps_per_epoch = 4
    assert method.epochs_to_steps(method.extra["freeze_last_layer_epochs"]) == 4
    assert method.teacher_temperature(0) == pytest.approx(0.04)


def test_recipes_follow_their_sources_where_the_issue_names_them():
    byol = METHODS["byol"]
    assert RECIPES["mocov2"].values["method.shuffle_bn"] and RECIPES["adco"].values["method.shuffle_bn"]
    assert METHODS["adco"].default_momentum == 0.999
    assert RECIPES["dino"].values["method.num_prototypes"] == 65536
    assert METHODS["dino"].extra_defaults["freeze_last_layer_epochs"] == 1
    assert METHODS["swav"].extra_defaults["queue_length"] == 3840
    assert METHODS["swav"].extra_defaults["queue_start_epochs"] == 15
    for name in ("mocov2", "simsiam", "swav", "adco"):  # these decay everything
        assert RECIPES[name].values["optim.exclude_bias_norm"] is False
    assert byol.default_momentum == 0.996 and byol.default_momentum_final == 1.0
    assert load_config("methods/dino").augment.recipe == "dino"


def test_byol_sums_its_two_directions():
    from sasi_online.ssl.losses import byol_loss

    cfg = recipe_cfg("byol").method
    torch.manual_seed(0)
    method = build_method(cfg)
    v = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    torch.manual_seed(1)
    loss = method(v)["loss"]
    with torch.no_grad():
        z = [method.projector(method.backbone(x)) for x in v]
        p = [method.predictor(x) for x in z]
        t = [method.target_projector(method.target_backbone(x)) for x in v]
    torch.testing.assert_close(loss.detach(), byol_loss(p[0], t[1]) + byol_loss(p[1], t[0]), rtol=1e-4, atol=1e-5)


def test_readme_table_is_generated_from_the_code():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert TABLE_BEGIN in text and TABLE_END in text, "README lacks the recipe table markers"
    start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
    assert text[start:end] == recipe_table(), \
        "README's recipe table is stale: run `python -m sasi_online.ssl.recipes README.md`"
    for name, published in RECIPES.items():
        assert all("@" in s or "paper" in s.lower() for s in published.sources), name  # repo@commit or paper
