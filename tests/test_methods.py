"""The method contract on tiny real networks: losses, gradients, momentum updates,
queues in state_dict, start-up checks, parameter groups, multi-crop, backbones."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sasi_online.config import MethodConfig
from sasi_online.errors import UserInputError
from sasi_online.ssl import METHODS, build_backbone, build_method
from sasi_online.ssl.methods.base import cosine_momentum
from sasi_online.ssl.monitor import feature_std, knn_predict

MULTI_CROP = [n for n, c in METHODS.items() if c.multi_crop]
WITH_TARGET = ["mocov2", "mocov3", "adco", "dino", "byol"]


def tiny_backbone():
    """A real 2-layer conv net with BatchNorm: fast enough for every method on 16 px."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return net, 16


def tiny_cfg(name, **kw):
    base = dict(name=name, proj_dim=8, proj_hidden=16, pred_hidden=16, queue_size=32, num_prototypes=10)
    base.update(kw)
    return MethodConfig(**base)


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    backbone, dim = tiny_backbone()
    return METHODS[name](tiny_cfg(name, **kw), backbone, dim)


def views(n=2, batch=8, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def sgd_step(method, lr=0.1):
    with torch.no_grad():
        for p in method.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def test_registry_names_every_method():
    assert set(METHODS) == {"mocov2", "mocov3", "simsiam", "swav", "adco", "dino", "byol",
                            "simclr", "barlow_twins", "vicreg"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_forward_gives_finite_loss_with_gradients_in_the_backbone(name):
    method = make(name)
    out = method(views(), step=0, total_steps=10)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    for key, value in out.items():
        if key != "loss":
            assert value.ndim == 0 and not value.requires_grad and torch.isfinite(value), key
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # Target networks never receive gradients.
    for _online, target in method.momentum_pairs():
        assert all(p.grad is None for p in target.parameters())


@pytest.mark.parametrize("name", WITH_TARGET)
def test_on_step_end_moves_targets_by_the_momentum_schedule(name):
    method = make(name, momentum=0.9, momentum_final=1.0)
    pairs = method.momentum_pairs()
    assert pairs, "methods with a teacher/key encoder expose momentum pairs"
    method(views())["loss"].backward()
    sgd_step(method, lr=0.5)
    before = [[p.clone() for p in t.parameters()] for _, t in pairs]
    method.on_step_end(step=3, total_steps=10)
    m = cosine_momentum(0.9, 1.0, 3, 10)
    assert 0.9 < m < 1.0 and method.last_momentum == pytest.approx(m)
    moved = 0.0
    for (online, target), old in zip(pairs, before):
        for p_t, p_o, p_old in zip(target.parameters(), online.parameters(), old):
            torch.testing.assert_close(p_t, m * p_old + (1 - m) * p_o)
            moved += float((p_t - p_old).abs().sum())
    assert moved > 0


def test_cosine_momentum_schedule_endpoints():
    assert cosine_momentum(0.99, 1.0, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0, 100, 100) == pytest.approx(1.0)


def test_mocov2_queue_receives_keys_and_travels_in_state_dict():
    method = make("mocov2", queue_size=32)
    assert "queue" in method.state_dict() and "queue_ptr" in method.state_dict()
    old = method.queue.clone()
    v = views(batch=8)
    method(v)["loss"].backward()
    method.on_step_end(0, 10)
    # The 8 newest keys sit at the old pointer; the rest is untouched.
    assert int(method.queue_ptr) == 8
    assert not torch.equal(method.queue[:8], old[:8])
    torch.testing.assert_close(method.queue[8:], old[8:])
    torch.testing.assert_close(method.queue[:8].norm(dim=1), torch.ones(8))
    # Four steps wrap the pointer around.
    for step in range(1, 4):
        method(v)["loss"].backward()
        method.on_step_end(step, 10)
    assert int(method.queue_ptr) == 0
    # The queue survives a state_dict round trip into a fresh model.
    fresh = make("mocov2", seed=5, queue_size=32)
    assert not torch.equal(fresh.queue, method.queue)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.queue, method.queue)


def test_mocov2_keys_are_the_momentum_encoder_outputs_of_the_second_view():
    method = make("mocov2", queue_size=16, shuffle_bn=False)  # shuffle-BN (the default) splits the batch
    v = views(batch=8)
    method(v)["loss"].backward()
    with torch.no_grad():
        expected = F.normalize(method.target_projector(method.target_backbone(v[1])), dim=1)
    method.on_step_end(0, 10)
    # BatchNorm in train mode is deterministic for the same batch: same keys.
    torch.testing.assert_close(method.queue[:8], expected)


def test_mocov2_queue_batch_divisibility_is_checked_at_start_up():
    cfg = tiny_cfg("mocov2", queue_size=100, backbone="resnet18")
    with pytest.raises(ValueError, match=r"method\.queue_size=100.*global batch 24"):
        build_method(cfg, global_batch=24)
    method = make("mocov2", queue_size=32)
    with pytest.raises(ValueError, match=r"method\.queue_size=32.*global batch 12"):
        method(views(batch=12))
    # 0 divides by every batch: refused as a user error (a clear message, no traceback).
    from sasi_online.errors import UserInputError
    with pytest.raises(UserInputError, match=r"method\.queue_size must be >= 1"):
        build_method(tiny_cfg("mocov2", queue_size=0, backbone="resnet18"), global_batch=24)


def test_mocov2_shuffle_bn_unshuffles_exactly_and_changes_batch_statistics():
    method = make("mocov2", shuffle_bn=True, extra={"bn_splits": 2})
    x = views(batch=8)[0]
    method.eval()  # running statistics: splitting cannot matter, so keys must match
    with torch.no_grad():
        plain = method._key_net(x)
    torch.testing.assert_close(method.keys(x), plain)
    method.train()  # batch statistics per split: keys differ from one full batch
    with torch.no_grad():
        full = method._key_net(x)
    assert not torch.allclose(method.keys(x), full, atol=1e-4)


def test_swav_queue_fills_and_is_used_for_codes():
    method = make("swav", extra={"queue_length": 16, "queue_start_epochs": 0})
    assert method.state_dict()["queue"].shape == (2, 16, 8)
    v = views(batch=8)
    for step in range(3):
        method(v, step)["loss"].backward()
        sgd_step(method)
        method.on_step_end(step, 10)
    assert int(method.queue_count) == 24
    assert (method.queue.norm(dim=2) > 0.99).all()  # every row holds a unit embedding
    # Prototypes are renormalised after each step.
    torch.testing.assert_close(method.prototypes.layer.weight.norm(dim=1), torch.ones(10))
    # With the queue in use the codes differ from the batch-only codes.
    with torch.no_grad():
        scores = method.prototypes(F.normalize(method.projector(method.backbone(v[0])), dim=1))
        assert not torch.allclose(method._codes(scores, 0, True), method._codes(scores, 0, False))


def test_swav_queue_starts_at_its_epoch_and_joins_the_codes_once_full():
    method = make("swav", extra={"queue_length": 16, "queue_start_epochs": 2})  # 1 step per epoch here
    v = views(batch=8)
    used, codes = [], method._codes
    method._codes = lambda s, view, use: (used.append(use), codes(s, view, use))[1]
    for step in range(5):
        method(v, step)["loss"].backward()
        sgd_step(method)
        method.on_step_end(step, 10)
    assert int(method.queue_count) == 24  # filled at steps 2, 3 and 4 only
    assert used[::2] == [False, False, False, False, True]  # full (16 rows) from step 4 on


def test_swav_frozen_prototypes_get_no_gradient():
    method = make("swav", extra={"freeze_prototypes_epochs": 5})  # steps_per_epoch is 1 here
    method(views(), step=0)["loss"].backward()
    assert method.prototypes.layer.weight.grad is None
    method.zero_grad()
    method(views(), step=5)["loss"].backward()
    assert method.prototypes.layer.weight.grad.abs().sum() > 0


def test_dino_centre_moves_towards_teacher_mean_and_is_checkpointed():
    method = make("dino", extra={"center_momentum": 0.5})
    assert "center" in method.state_dict()
    v = views()
    method(v)["loss"].backward()
    with torch.no_grad():
        # The teacher saw both global views as one batch (same BatchNorm statistics).
        t = method.target_head(method.target_backbone(torch.cat(v)))
    method.on_step_end(0, 10)
    torch.testing.assert_close(method.center, 0.5 * t.mean(0, keepdim=True))


def test_dino_teacher_temperature_warms_up_linearly():
    method = make("dino", extra={"warmup_teacher_temp": 0.02, "teacher_temp": 0.06,
                                 "teacher_temp_warmup_epochs": 10})
    assert method.teacher_temperature(0) == pytest.approx(0.02)
    assert method.teacher_temperature(5) == pytest.approx(0.04)
    assert method.teacher_temperature(50) == pytest.approx(0.06)


def test_dino_frozen_last_layer_gets_no_gradient():
    method = make("dino", extra={"freeze_last_layer_epochs": 3})
    method(views(), step=0)["loss"].backward()
    assert all(p.grad is None for p in method.head.last_layer.parameters())
    method.zero_grad()
    method(views(), step=3)["loss"].backward()
    assert method.head.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MULTI_CROP)
def test_multi_crop_methods_take_local_views(name):
    method = make(name)
    v = views(2, size=16) + views(3, size=8, seed=7)
    out = method(v)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert method.backbone[0].weight.grad.abs().sum() > 0


def test_two_view_methods_refuse_extra_views():
    with pytest.raises(ValueError, match="exactly 2 views"):
        make("byol")(views(3))
    with pytest.raises(ValueError, match=r"view 1 must be \[B=8"):
        make("simclr")([views()[0], torch.randn(4, 3, 16, 16)])


def test_adco_bank_fills_from_keys_then_ascends_at_a_constant_rate():
    from sasi_online.ssl.losses import adco_loss

    method = make("adco", extra={"bank_size": 16, "mem_temperature": 0.1, "init_epochs": 0, "mem_lr": 0.5},
                  shuffle_bn=False)
    v = views()  # 8 keys per step: the 16-row bank is filled by the first two steps
    keys = []
    for step in range(2):
        out = method(v, step)
        assert float(out["loss"].detach()) != pytest.approx(float(out["bank_loss"]))
        keys.append(method._pending_keys[-1].clone())
        out["loss"].backward()
        method.on_step_end(step, 10)
        method.zero_grad()
    torch.testing.assert_close(method.memory_bank, torch.cat(keys))  # rows = keys, not moved yet
    assert int(method.bank_filled) == 16
    # Full: the bank now ascends on its own loss (its velocity follows minus the gradient).
    with torch.no_grad():
        q = F.normalize(method.projector(method.backbone(v[0])), dim=1)
        k = method._key_net(v[1])
        before = adco_loss(q, k, method.memory_bank, 0.1)
    bank_before = method.memory_bank.clone()
    method(v, 2)["loss"].backward()
    method.on_step_end(2, 10)
    assert not torch.equal(method.memory_bank, bank_before)
    with torch.no_grad():
        after = adco_loss(q, k, method.memory_bank, 0.1)
    assert after > before
    # The bank is no optimizer parameter (its rate never follows the schedule); its state is saved.
    assert all(g["name"] != "memory_bank" for g in method.param_groups())
    assert {"memory_bank", "bank_velocity", "bank_filled"} <= set(method.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_param_groups_cover_trainable_parameters_once(name):
    method = make(name)
    groups = method.param_groups()
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert set(seen) == trainable
    for g in groups:
        for p in g["params"]:
            if p.ndim <= 1 and g["name"] in ("decay", "no_decay"):
                assert g["name"] == "no_decay" and g["weight_decay"] == 0.0 and g["lars_exclude"]


def test_simsiam_predictor_has_a_fixed_learning_rate_group():
    groups = {g["name"]: g for g in make("simsiam").param_groups()}
    assert groups["predictor"]["fixed_lr"] is True
    no_fix = {g["name"] for g in make("simsiam", extra={"fix_pred_lr": False}).param_groups()}
    assert "predictor" not in no_fix


def test_bad_names_are_refused_with_the_key_and_a_suggestion():
    with pytest.raises(UserInputError, match=r"method\.name 'moco_v2'.*mocov2"):
        build_method(MethodConfig(name="moco_v2"))
    with pytest.raises(UserInputError, match=r"method\.extra\.lamda.*method\.extra\.lambd"):
        make("barlow_twins", extra={"lamda": 0.01})
    with pytest.raises(UserInputError, match=r"method\.backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19", True)


def test_checkpoint_extra_state_refuses_another_method():
    state = make("byol").extra_state_for_checkpoint()
    make("byol").load_extra_state_from_checkpoint(state)
    with pytest.raises(UserInputError, match="method.name=byol"):
        make("simsiam").load_extra_state_from_checkpoint(state)


def test_method_temperature_and_momentum_defaults_are_per_method():
    assert make("simclr").temperature == 0.1 and make("swav").temperature == 0.1
    assert make("simclr", temperature=0.3).temperature == 0.3
    assert make("byol").base_momentum == 0.996 and make("mocov2", momentum=0.9).base_momentum == 0.9


def test_resnet18_small_stem_and_encode():
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="simsiam", backbone="resnet18", small_stem=True,
                                       proj_hidden=32, pred_hidden=16, proj_dim=16))
    assert method.backbone.conv1.stride == (1, 1) and isinstance(method.backbone.maxpool, nn.Identity)
    x = torch.randn(4, 3, 32, 32)
    out = method([x, x.flip(3)])
    out["loss"].backward()
    assert method.backbone.conv1.weight.grad.abs().sum() > 0
    method.eval()
    with torch.no_grad():
        assert method.encode(x).shape == (4, 512)


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("resnet101", 2048)])
def test_large_resnets_report_their_feature_size(name, dim):
    with torch.device("meta"):  # shapes only
        net, feat_dim = build_backbone(name, small_stem=False)
    assert feat_dim == dim and isinstance(net.fc, nn.Identity)
    assert net.conv1.kernel_size == (7, 7)


def test_dino_on_vit_small_takes_global_and_local_crop_sizes():
    from sasi_online.ssl.backbones import ViTBackbone

    with torch.device("meta"):  # shapes only: real initialisation of ViT-S takes seconds
        vit_s, dim = build_backbone("vit_small", small_stem=True)
    assert dim == 384 and len(vit_s.vit.encoder.layers) == 12 and vit_s.patch_size == 4
    # The same class, two layers deep, keeps the DINO step cheap.
    torch.manual_seed(0)
    tiny_vit = ViTBackbone(patch_size=4, base_image_size=32, hidden_dim=32, num_layers=2,
                           num_heads=2, mlp_dim=64)
    method = METHODS["dino"](MethodConfig(name="dino", backbone="vit_small", proj_hidden=32,
                                          proj_dim=16, num_prototypes=20), tiny_vit, 32)
    v = views(2, batch=2, size=32) + views(2, batch=2, size=16, seed=3)
    out = method(v)
    out["loss"].backward()
    # Position embeddings are interpolated for the 16 px crops and still learn.
    assert method.backbone.vit.encoder.pos_embedding.grad.abs().sum() > 0
    groups = {g["name"]: g for g in method.param_groups()}
    assert any(p is method.backbone.vit.class_token for p in groups["no_decay"]["params"])
    with pytest.raises(ValueError, match="patch size 4"):
        method.encode(torch.randn(1, 3, 30, 30))


def test_feature_std_detects_collapse():
    healthy = torch.randn(256, 64)
    collapsed = torch.ones(256, 64) + 1e-6 * torch.randn(256, 64)
    assert feature_std(healthy).mean() == pytest.approx(64 ** -0.5, rel=0.1)
    assert feature_std(collapsed).mean() < 1e-4


def test_knn_predict_recovers_clustered_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(20)
    train = centres[labels] + torch.randn(60, 16, generator=g)
    test_labels = torch.tensor([2, 0, 1, 1])
    test = centres[test_labels] + torch.randn(4, 16, generator=g)
    scores = knn_predict(train, labels, test, k=10, t=0.07, num_classes=3)
    assert torch.equal(scores.argmax(1), test_labels)


def _two_trainer_worker(rank, init_file, world):
    """One of two gloo trainers in a group: gathers, shuffle-BN, Sinkhorn and MoCo's queue
    must behave as one process over the concatenated batch."""
    import torch.distributed as dist

    from sasi_online.ssl import distributed as D
    from sasi_online.ssl.losses import nt_xent, sinkhorn_knopp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        D.set_group(dist.new_group(list(range(world))))
        assert D.world_size() == world and D.rank() == rank
        mine = slice(rank * 4, rank * 4 + 4)
        g = torch.Generator().manual_seed(0)
        a_all = torch.randn(4 * world, 5, generator=g, dtype=torch.float64)
        b_all = torch.randn(4 * world, 5, generator=g, dtype=torch.float64)
        assert torch.equal(D.gather(a_all[mine].clone()), a_all)

        # SimCLR across trainers: local rows against gathered columns, gradients through
        # the gather; averaged over ranks (as the engine does) = one process's gradient.
        a, b = a_all[mine].clone().requires_grad_(True), b_all[mine].clone().requires_grad_(True)
        loss = nt_xent(a, b, 0.2, D.gather_with_grad(a), D.gather_with_grad(b), offset=D.rank() * 4)
        loss.backward()
        ra, rb = a_all.clone().requires_grad_(True), b_all.clone().requires_grad_(True)
        nt_xent(ra, rb, 0.2).backward()
        torch.testing.assert_close(a.grad / world, ra.grad[mine])
        torch.testing.assert_close(b.grad / world, rb.grad[mine])

        # Shuffle-BN: every rank gets a slice of one global permutation and gets its own back.
        x = torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32)[:, None]
        shuffled, undo = D.shuffle_batch(x)
        assert torch.equal(D.gather(shuffled).flatten().sort().values, torch.arange(4.0 * world))
        assert torch.equal(D.unshuffle_batch(shuffled, undo), x)

        # Distributed Sinkhorn = Sinkhorn over the whole batch.
        scores = F.normalize(torch.randn(4 * world, 3, generator=g, dtype=torch.float64), dim=1)
        codes = sinkhorn_knopp(scores[mine], 0.05, 3, world_size=D.world_size(), all_reduce=D.all_reduce_sum)
        torch.testing.assert_close(codes, sinkhorn_knopp(scores, 0.05, 3)[mine])

        # MoCo-v2 with shuffle-BN: the queue receives the GLOBAL batch of keys, same on all ranks.
        method = make("mocov2", seed=0, queue_size=16, shuffle_bn=True)
        method(views(batch=4, seed=10 + rank))["loss"].backward()
        method.on_step_end(0, 10)
        assert int(method.queue_ptr) == 4 * world
        other = D.gather(method.queue[None].contiguous())
        assert torch.equal(other[0], other[1])
    finally:
        D.set_group(None)
        dist.destroy_process_group()


def test_two_trainers_gather_shuffle_and_queue_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    # spawn, not fork: a child forked after earlier tests started gloo or OpenMP threads can
    # deadlock (seen when this file ran after the trainer tests).
    mp.start_processes(_two_trainer_worker, args=(str(tmp_path / "init"), 2), nprocs=2, join=True,
                       start_method="spawn")


def test_mocov3_heads_follow_the_published_layout_per_backbone():
    import torch.nn as nn

    # ResNet: 2-layer projector ending in BN (no affine), predictor ending in a Linear.
    res = make("mocov3", backbone="resnet18")
    assert sum(isinstance(m, nn.Linear) for m in res.projector) == 2
    assert isinstance(res.projector[-1], nn.BatchNorm1d) and not res.projector[-1].affine
    assert isinstance(res.predictor[-1], nn.Linear)
    # ViT: 3-layer projector, predictor ending in BN.
    vit = make("mocov3", backbone="vit_small")
    assert sum(isinstance(m, nn.Linear) for m in vit.projector) == 3
    assert isinstance(vit.predictor[-1], nn.BatchNorm1d)
    # Published temperatures: 1.0 for ResNets, 0.2 for ViTs; a configured value wins.
    assert make("mocov3", backbone="resnet18", temperature=None).temperature == 1.0
    assert make("mocov3", backbone="vit_small", temperature=None).temperature == 0.2
    assert make("mocov3", backbone="resnet18", temperature=0.5).temperature == 0.5


def test_momentum_schedules_follow_each_methods_published_default():
    # MoCo-v2 and AdCo keep a fixed momentum; BYOL-style methods rise to 1 along a cosine.
    for name in ("mocov2", "adco"):
        m = make(name)
        assert m.momentum_at(0, 100) == m.momentum_at(99, 100) == m.base_momentum
    byol = make("byol")
    assert byol.momentum_at(0, 100) == byol.base_momentum < byol.momentum_at(50, 100) < 1.0
    assert make("mocov2", momentum_final=1.0).momentum_at(50, 100) > 0.999  # configured wins


def test_convnet_backbone_is_small_and_sized_for_32_px():
    from sasi_online.ssl.backbones import build_backbone

    net, dim = build_backbone("convnet", small_stem=True)
    assert dim == 256 and net(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 256)  # global pool: any size
    assert sum(p.numel() for p in net.parameters()) < 500_000  # a ResNet-18 has 11M
