"""Evaluation suite: kNN, linear probe, semi-supervised splits, t-SNE, report, checkpoints."""
import json
import math

import numpy as np
import pytest
import torch

from _tiny_checkpoint import save_untrained_mocov2
from sasi_online.errors import UserInputError
from sasi_online.eval.knn import knn_evaluate, knn_predict
from sasi_online.eval.linear import fit_logistic, linear_probe
from sasi_online.eval.metrics import topk_accuracy
from sasi_online.eval.semi import (balanced_subset, fraction_label, match_split, read_split_file,
                                   split_file_label)


def _clusters(n, num_classes=10, dim=32, spread=1.0, seed=0):
    """Linearly separable features: one Gaussian blob per class, far apart."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


# ----------------------------------------------------------------------------- kNN
def test_knn_matches_a_brute_force_loop():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 4, size=60)
    test = rng.normal(size=(15, 8)).astype(np.float32)
    k, t = 7, 0.1
    expected = np.zeros((15, 4))
    for i, q in enumerate(test):
        sims = [float(np.dot(q, x) / (np.linalg.norm(q) * np.linalg.norm(x))) for x in train]
        for j in sorted(range(60), key=lambda j: -sims[j])[:k]:
            expected[i, labels[j]] += math.exp(sims[j] / t)
    for chunk in (4, 1024):  # chunking over test rows must not change the result
        got = knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(test),
                          k=k, t=t, num_classes=4, chunk=chunk)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_topk_accuracy_counts_hits_and_clips_k_to_the_classes():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc["top1"] == 25.0 and acc["top2"] == 50.0 and acc["top5"] == 100.0


def test_knn_and_linear_probe_high_on_separable_features_chance_on_random_labels():
    x, y = _clusters(600)
    xt, yt = _clusters(400, seed=1)
    knn = knn_evaluate(x, y, xt, yt, k=50, t=0.07)
    lin = linear_probe(x, y, xt, yt, 10, weight_decays=[1e-3, 1e-2])
    assert knn["top1"] > 95 and lin["top1"] > 95
    # Random labels carry no signal: both fall to chance (10 %, 400 test points: σ ≈ 1.5 %).
    g = torch.Generator().manual_seed(5)
    yr, ytr = torch.randint(0, 10, (600,), generator=g), torch.randint(0, 10, (400,), generator=g)
    knn_r = knn_evaluate(x, yr, xt, ytr, k=50, t=0.07)
    lin_r = linear_probe(x, yr, xt, ytr, 10, weight_decays=[1e-3, 1e-2])
    assert knn_r["top1"] < 20 and lin_r["top1"] < 20
    assert 30 < lin_r["top5"] < 70  # top-5 of 10 classes at chance ≈ 50 %


def test_linear_probe_is_deterministic_and_regularisation_shrinks_weights():
    x, y = _clusters(300, num_classes=5, dim=16, spread=3.0)
    xt, yt = _clusters(100, num_classes=5, dim=16, spread=3.0, seed=2)
    a = linear_probe(x, y, xt, yt, 5, weight_decays=[1e-4, 1e-2, 1e-1], seed=3)
    b = linear_probe(x, y, xt, yt, 5, weight_decays=[1e-4, 1e-2, 1e-1], seed=3)
    assert a == b
    assert a["weight_decay"] in (1e-4, 1e-2, 1e-1) and set(a["holdout_top1"]) == {"0.0001", "0.01", "0.1"}
    weak = fit_logistic(x, y, 5, weight_decay=1e-4)
    strong = fit_logistic(x, y, 5, weight_decay=1.0)
    assert strong.weight.norm() < 0.5 * weak.weight.norm()


# ----------------------------------------------------------------------------- semi-supervised
def test_balanced_subsets_are_class_balanced_deterministic_and_nested():
    labels = np.repeat([0, 1, 2, 3], [300, 150, 7, 1])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    one = balanced_subset(labels, 0.01, seed=0)
    ten = balanced_subset(labels, 0.10, seed=0)
    # round(1 % of 300, 150, 7, 1) = 3, 2, 0→1, 0→1: every class keeps at least one image.
    assert np.bincount(labels[one], minlength=4).tolist() == [3, 2, 1, 1]
    assert np.bincount(labels[ten], minlength=4).tolist() == [30, 15, 1, 1]
    assert np.array_equal(one, balanced_subset(labels, 0.01, seed=0))
    assert not np.array_equal(ten, balanced_subset(labels, 0.10, seed=1))
    assert set(one) <= set(ten)  # nested for one seed
    assert len(set(ten)) == len(ten)
    assert fraction_label(0.01) == "1%" and fraction_label(0.1) == "10%" and fraction_label(0.005) == "0.5%"
    with pytest.raises(UserInputError, match="semi_fractions"):
        balanced_subset(labels, 0.0, seed=0)


def test_simclr_split_file_is_parsed_and_matched_against_relative_paths(tmp_path):
    relpaths = ["train/n01/n01_1", "train/n01/n01_2", "train/n02/n02_5", "train/n02/n02_6",
                "train/n03/dup", "train/n04/dup"]
    split = tmp_path / "1percent.txt"
    split.write_text("# SimCLR 1 % split\nn01_2.JPEG\n\n  n02/n02_5.JPEG  \nn99_1.JPEG\nn03/dup.JPEG\n")
    names = read_split_file(split)
    assert names == ["n01_2.JPEG", "n02/n02_5.JPEG", "n99_1.JPEG", "n03/dup.JPEG"]
    with pytest.warns(UserWarning, match="1 of 4 names"):
        idx, missing = match_split(names, relpaths)
    assert idx.tolist() == [1, 2, 4] and missing == 1
    assert split_file_label(split) == "1%" and split_file_label("10percent.txt") == "10%"
    assert split_file_label("my_subset.txt") == "my_subset"
    with pytest.raises(UserInputError, match="matches 2 images"):
        match_split(["dup.JPEG"], relpaths)
    with pytest.raises(UserInputError, match="none of its 1 names"):
        match_split(["zzz.JPEG"], relpaths)
    with pytest.raises(UserInputError, match="not found"):
        read_split_file(tmp_path / "absent.txt")


# ----------------------------------------------------------------------------- t-SNE
def test_tsne_writes_a_png_that_keeps_clusters_apart(tmp_path):
    from PIL import Image

    from sasi_online.eval.tsne import choose_classes, plot_embedding, tsne_embed

    x, y = _clusters(240, num_classes=12, dim=16, spread=0.5)
    chosen = choose_classes(y.numpy(), 10, seed=0)
    assert len(chosen) == 10 and np.array_equal(chosen, choose_classes(y.numpy(), 10, seed=0))
    coords, lab = tsne_embed(x, y, num_classes=3, per_class=15, seed=0)
    assert coords.shape == (len(lab), 2) and len(np.unique(lab)) == 3
    # Well-separated blobs stay separated in 2-D: 1-NN in the embedding recovers the class.
    d = ((coords[:, None] - coords[None]) ** 2).sum(-1) + np.eye(len(lab)) * 1e9
    assert (lab[d.argmin(1)] == lab).mean() > 0.95
    path = plot_embedding(coords, lab, tmp_path / "tsne.png", [f"class {i}" for i in range(12)])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


# ----------------------------------------------------------------------------- report
def _eval_json(path, run, linear, knn, semi, transfer):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema": 1, "run": run, "method": "mocov2", "backbone": "resnet18", "pair_mode": run,
        "dataset": "fashion_mnist", "checkpoint": f"runs/{run}/ckpt.pt", "complete": True,
        "results": {"linear": {"top1": linear, "top5": 99.0}, "knn": {"top1": knn, "top5": 98.0, "k": 200, "t": 0.07},
                    "semi": {k: {"top1": v[0], "top5": v[1]} for k, v in semi.items()},
                    "transfer": {k: {"top1": v} for k, v in transfer.items()}}}))
    return path


def test_report_puts_the_right_numbers_and_differences_side_by_side(tmp_path):
    from sasi_online.eval.report import table_rows, write_report

    base = _eval_json(tmp_path / "base" / "eval.json", "base", 73.1, 67.8,
                      {"10%": (67.6, 87.6), "1%": (53.6, 79.2)}, {"cifar10": 73.5, "stl10": 80.4})
    sasi = _eval_json(tmp_path / "sasi" / "eval.json", "sasi", 78.4, 76.1,
                      {"1%": (67.6, 87.3), "10%": (77.8, 93.3)}, {"cifar10": 77.4})
    report = write_report([base, sasi], tmp_path / "cmp")
    text = report.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["Metric (%)"] == ["base", "sasi", "Δ sasi − base"]
    assert rows["Linear"] == ["73.1", "78.4", "+5.3↑"]
    assert rows["KNN"] == ["67.8", "76.1", "+8.3↑"]
    assert rows["Semi 1% top-1"] == ["53.6", "67.6", "+14.0↑"]
    assert rows["Semi 10% top-5"] == ["87.6", "93.3", "+5.7↑"]
    assert rows["Transfer stl10"] == ["80.4", "—", "—"]
    assert rows["Transfer avg"] == ["77.0", "—", "—"]  # sasi lacks stl10: no average for it
    names = [name for name, _ in table_rows([json.loads(base.read_text())])]
    assert names.index("Semi 1% top-1") < names.index("Semi 10% top-1")  # numeric, not string order
    assert (tmp_path / "cmp" / "report.png").stat().st_size > 0


def test_report_refuses_missing_or_foreign_eval_files(tmp_path):
    from sasi_online.eval.report import load_eval

    with pytest.raises(UserInputError, match="not found"):
        load_eval(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_eval(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(UserInputError, match="no 'results'"):
        load_eval(tmp_path / "other.json")


# ----------------------------------------------------------------------------- checkpoints
def test_bad_checkpoints_fail_with_a_message_naming_the_file(tmp_path):
    from sasi_online.eval.checkpoint_loader import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError, match="missing.pt' not found"):
        read_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="corrupt.pt' cannot be read"):
        read_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    torch.save({"config": {}, "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated.pt' cannot be read"):
        read_checkpoint(truncated)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="tensor.pt' holds a Tensor"):
        read_checkpoint(tensor_only)
    no_model = tmp_path / "nomodel.pt"
    torch.save({"config": {}}, no_model)
    with pytest.raises(CheckpointError, match="nomodel.pt' holds no model state dict"):
        read_checkpoint(no_model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"config": {"method": {"nam": "mocov2"}}, "model": {}}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign.pt' carries a config.*method.nam"):
        read_checkpoint(foreign)
    no_cfg = tmp_path / "deep" / "er" / "noconfig.pt"
    no_cfg.parent.mkdir(parents=True)
    torch.save({"model": {}}, no_cfg)
    with pytest.raises(CheckpointError, match="noconfig.pt' carries no 'config'"):
        read_checkpoint(no_cfg)
    with pytest.raises(CheckpointError, match="neither"):
        read_checkpoint(tmp_path / "deep")
    good = tmp_path / "good.pt"
    torch.save({"config": {"eval": {"knn_k": 20}}, "model": {"w": torch.ones(2)}}, good)
    state, cfg, file = read_checkpoint(good)
    assert cfg.eval.knn_k == 20 and torch.equal(state["w"], torch.ones(2)) and file == good


def test_deepspeed_layout_is_resolved_and_a_config_mismatch_is_refused(tmp_path):
    from sasi_online.config import Config, save_config
    from sasi_online.eval.checkpoint_loader import CheckpointError, read_checkpoint, run_folder

    training = pytest.importorskip("sasi_online.training.checkpoint")
    cfg = Config()
    cfg.method.name = "simsiam"
    run, tag = tmp_path / "run", "global_step10"
    (run / "checkpoints" / tag).mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.save({"module": {"w": torch.ones(3)}, "global_steps": 10},
               run / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"tag": tag, "step": 10}))
    meta = run / "checkpoints" / tag / "meta.json"
    meta.write_text(json.dumps({"step": 10, "config_hash": training.config_hash(cfg)}))
    state, loaded, file = read_checkpoint(run / "checkpoints")
    assert file.name == "mp_rank_00_model_states.pt" and loaded.method.name == "simsiam"
    assert run_folder(file) == run  # names the run and holds its default eval/ folder
    assert torch.equal(state["w"], torch.ones(3))
    meta.write_text(json.dumps({"step": 10, "config_hash": "0123456789abcdef"}))
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt' was written with another config"):
        read_checkpoint(run / "checkpoints" / tag)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A real (untrained) MoCo-v2 ResNet-18 on 16 px embedded images, saved as `sasi eval` reads it."""
    path = tmp_path_factory.mktemp("run") / "base" / "ckpt.pt"
    cfg, _ = save_untrained_mocov2(path)
    return path, cfg


def test_sasi_eval_end_to_end_resumes_and_reports(tiny_checkpoint, tmp_path, capsys):
    from sasi_online.cli import main

    ckpt, _ = tiny_checkpoint
    out = tmp_path / "eval"
    args = ["eval", str(ckpt), "--out", str(out), "--transfer", "fashion_mnist", "eval.knn_k=20",
            "eval.tsne_per_class=8", "eval.linear_weight_decays=[1e-2]", "eval.semi_fractions=[0.1, 0.5]"]
    assert main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    res = result["results"]
    assert result["complete"] and result["train_size"] == 120 and result["test_size"] == 120
    assert set(res) == {"knn", "linear", "semi", "transfer"} and set(res["semi"]) == {"10%", "50%"}
    assert res["semi"]["10%"]["labelled"] < res["semi"]["50%"]["labelled"] < 120
    # Even random ResNet features separate Fashion-MNIST classes well above chance (10 %):
    # a feature/label misalignment anywhere in the pipeline would fall to chance.
    assert res["knn"]["top1"] > 30 and res["linear"]["top1"] > 30
    assert res["transfer"]["fashion_mnist"]["top1"] == pytest.approx(res["linear"]["top1"])
    assert (out / "tsne.png").is_file() and "| Linear |" in (out / "report.md").read_text()
    assert "| Linear |" in capsys.readouterr().out

    # Interrupted after the linear probe: the re-run reuses the cached features and redoes the rest.
    caches = {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()}
    partial = dict(result, complete=False, results={"knn": res["knn"], "linear": res["linear"]})
    (out / "eval.json").write_text(json.dumps(partial))
    assert main(args) == 0
    again = json.loads((out / "eval.json").read_text())
    assert again["complete"] and again["results"]["semi"] == res["semi"]
    assert {p: p.stat().st_mtime_ns for p in (out / "features").iterdir()} == caches

    # --compare: a report from finished runs only, one column per run.
    cmp = tmp_path / "cmp"
    assert main(["eval", "--compare", str(out / "eval.json"), str(out), "--names", "a", "b",
                 "--out", str(cmp)]) == 0
    linear_row = next(l for l in (cmp / "report.md").read_text().splitlines() if l.startswith("| Linear |"))
    top1 = f"{res['linear']['top1']:.1f}"
    assert linear_row.replace(" ", "") == f"|Linear|{top1}|{top1}|+0.0|"
    assert (cmp / "report_tsne.png").is_file()


def test_sasi_eval_refuses_a_checkpoint_from_another_config(tiny_checkpoint, tmp_path, capsys):
    from sasi_online.cli import main
    from sasi_online.eval.checkpoint_loader import CheckpointError, load_encoder

    ckpt, cfg = tiny_checkpoint
    blob = torch.load(ckpt, weights_only=True)
    blob["config"]["method"]["name"] = "simsiam"  # weights are MoCo-v2's
    other = tmp_path / "other.pt"
    torch.save(blob, other)
    with pytest.raises(CheckpointError, match="other.pt' does not match the model"):
        load_encoder(other)
    blob["config"]["method"]["name"], blob["config"]["method"]["proj_dim"] = "mocov2", 64
    torch.save(blob, other)
    with pytest.raises(CheckpointError, match="other.pt' does not match the model"):
        load_encoder(other)
    assert main(["eval", str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt' not found" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "method.name=simclr"]) == 2
    assert "only eval.*, data.* can be overridden" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "eval.knn_k=0", "eval.semi_fractions=[2]"]) == 2
    err = capsys.readouterr().err
    assert "eval.knn_k must be >= 1" in err and "eval.semi_fractions entries must be in (0, 1]" in err
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "t"), "--transfer", "cifar10"]) == 2
    assert "transfer dataset 'cifar10:'" in capsys.readouterr().err


def test_imagefolder_with_val_split_and_a_simclr_split_file(tiny_checkpoint, tmp_path):
    from PIL import Image

    from sasi_online.eval.suite import evaluate_checkpoint

    ckpt, _ = tiny_checkpoint
    root = tmp_path / "imagenet"
    for split in ("train", "val"):  # ImageNet layout: no "test" folder
        for c, colour in (("n01", (250, 10, 10)), ("n02", (10, 10, 250))):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 12), tuple(v + 2 * i for v in colour)).save(root / split / c / f"{c}_{i}.JPEG")
    (tmp_path / "1percent.txt").write_text("n01_0.JPEG\nn02_2.JPEG\nn77_1.JPEG\n")
    with pytest.warns(UserWarning, match="1 of 3 names"):
        result = evaluate_checkpoint(ckpt, tmp_path / "out", [
            "data.name=imagefolder", f"data.root={root}", "eval.tsne_classes=0",
            "eval.linear_weight_decays=[1e-2]", f"eval.semi_split_files=[{tmp_path / '1percent.txt'}]"])
    assert result["splits"] == ["train", "val"] and result["train_size"] == 6
    semi = result["results"]["semi"]["1%"]
    assert semi["labelled"] == 2 and semi["unmatched_names"] == 1
    # Red and blue squares: any encoder separates them.
    assert result["results"]["linear"]["top1"] == 100.0 and semi["top1"] == 100.0


def test_resumed_results_are_incomplete_until_the_run_ends(tmp_path):
    from sasi_online.eval.suite import SCHEMA, _Results

    path = tmp_path / "eval.json"
    header = {"schema": SCHEMA, "fingerprint": "f"}
    path.write_text(json.dumps({**header, "results": {"knn": {"top1": 50.0}}, "complete": True}))
    res = _Results(path, header)
    # Old sections are kept, but a re-run (e.g. adding a transfer set) that is interrupted
    # must leave a file that says it is unfinished.
    assert res.has("knn") and res.data["complete"] is False
    res.put({"top1": 40.0}, "transfer", "cifar10")
    assert json.loads(path.read_text())["complete"] is False


def test_centred_knn_subtracts_the_bank_mean_and_sharpens_the_vote():
    """Post-ReLU-like features: a large shared offset plus a small class signal. Uncentred,
    every cosine is near 1 and the weighted vote is nearly uniform; centring removes the
    bank's mean (the test rows get the bank's, not their own)."""
    from sasi_online.eval.knn import knn_evaluate, knn_predict

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    signal = torch.nn.functional.one_hot(labels, 4).float() * 0.3 + 0.2 * torch.randn(200, 4, generator=g)
    feats = torch.cat([signal, torch.full((200, 60), 3.0)], 1)
    train, test = feats[:150], feats[150:] + 0.05  # a shifted test set: its own mean would differ
    flat = knn_predict(train, labels[:150], test, k=20, t=0.07)
    centred = knn_predict(train, labels[:150], test, k=20, t=0.07, center=True)
    mean = train.mean(0, keepdim=True)
    assert torch.allclose(centred, knn_predict(train - mean, labels[:150], test - mean, k=20, t=0.07))
    assert not torch.allclose(centred, knn_predict(train - mean, labels[:150], test - test.mean(0), k=20, t=0.07))
    share = lambda s: (s.max(1).values / s.sum(1)).mean()  # noqa: E731  the top class's share of the vote
    assert share(centred) > share(flat) + 0.1
    assert knn_evaluate(train, labels[:150], test, labels[150:], k=20, center=True)["center"] is True
