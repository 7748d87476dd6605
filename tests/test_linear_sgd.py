"""The standard linear protocol (`eval.linear=sgd`): SGD on a frozen backbone, resumable."""
import json

import pytest
import torch

from sasi_online.errors import UserInputError

from _tiny_checkpoint import save_untrained_mocov2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real (untrained) MoCo-v2 ResNet-18 on 16 px embedded images, saved as `sasi eval` reads it."""
    path = tmp_path_factory.mktemp("run") / "ckpt.pt"
    cfg, method = save_untrained_mocov2(path)
    return path, cfg, method.eval()


SGD = ["eval.linear=sgd", "eval.linear_epochs=10", "eval.linear_lr=0.01", "eval.linear_batch_size=16",
       "eval.semi_fractions=[]", "eval.tsne_classes=0", "eval.knn_k=20"]


def test_sgd_protocol_through_sasi_eval(tiny_run, tmp_path):
    from sasi_online.cli import main

    ckpt, _, _ = tiny_run
    assert main(["eval", str(ckpt), *SGD, "--out", str(tmp_path)]) == 0
    lin = json.loads((tmp_path / "eval.json").read_text())["results"]["linear"]
    assert lin["protocol"] == "sgd" and lin["epochs"] == 10 and lin["batch_size"] == 16
    assert lin["train_size"] == 120 and len(lin["train_losses"]) == 10
    # The layer learns: the loss falls and random-ResNet features of Fashion-MNIST beat
    # chance (10 %) by far; a label/feature misalignment would sit at chance.
    assert lin["train_losses"][-1] < lin["train_losses"][0]
    assert lin["top1"] > 20
    state = torch.load(tmp_path / "linear_sgd_state.pt", weights_only=True)
    assert state["epoch"] == 10 and state["scheduler"]["last_epoch"] == 10 * 8  # cosine over every step


class _FailsAfter(torch.utils.data.Dataset):
    """Fault injection: the dataset raises OSError after `n` reads (a disk gone away)."""

    def __init__(self, ds, n):
        self.ds, self.n, self.reads = ds, n, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.n:
            raise OSError(5, "Input/output error (injected)")
        return self.ds[i]


def test_sgd_protocol_resumes_exactly_after_an_interruption(tiny_run, tmp_path):
    from sasi_online.data.datasets import build_dataset
    from sasi_online.eval.features import extract_features
    from sasi_online.eval.linear import SgdProtocol, sgd_linear_probe

    _, cfg, method = tiny_run
    train_ds, test_ds = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
    mean, std = (0.5,) * 3, (0.25,) * 3
    test = extract_features(method, test_ds, 16, mean, std)
    proto = SgdProtocol(epochs=3, lr=0.01, batch_size=32, seed=1)
    args = (test.feats, test.labels, 10, 16, mean, std, proto)
    whole = sgd_linear_probe(method, train_ds, *args, state_path=tmp_path / "a.pt", key="k")
    with pytest.raises(OSError, match="injected"):  # dies in the second epoch
        sgd_linear_probe(method, _FailsAfter(train_ds, 180), *args, state_path=tmp_path / "b.pt", key="k")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 1
    resumed = sgd_linear_probe(method, train_ds, *args, state_path=tmp_path / "b.pt", key="k")
    assert resumed["train_losses"] == whole["train_losses"] and resumed["top1"] == whole["top1"]
    # Another key (other settings) starts afresh instead of trusting a foreign state.
    other = sgd_linear_probe(method, train_ds, *args[:-1], SgdProtocol(epochs=3, lr=0.01, batch_size=32, seed=2),
                             state_path=tmp_path / "b.pt", key="other")
    assert other["train_losses"] != whole["train_losses"]


def test_bad_linear_settings_are_refused_with_the_fix():
    from sasi_online.config import Config
    from sasi_online.eval.suite import check_eval_config

    ev = Config().eval
    assert ev.linear == "lbfgs"  # the fast probe stays the default
    ev.linear = "adam"
    with pytest.raises(UserInputError, match="eval.linear must be lbfgs"):
        check_eval_config(ev)
    ev.linear, ev.linear_epochs = "sgd", 0
    with pytest.raises(UserInputError, match="linear_epochs >= 1"):
        check_eval_config(ev)
