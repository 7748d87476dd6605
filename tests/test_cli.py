"""The `sasi` entry point: --version, "did you mean" for commands, --print-config."""
import pytest
import yaml

from sasi_online import __version__
from sasi_online.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"sasi_online {__version__}"


def test_misspelled_command_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        main(["trian", "--config", "tiny_cpu"])
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "Did you mean 'train'?" in err
    with pytest.raises(SystemExit):
        main(["qqqq"])
    assert "Did you mean" not in capsys.readouterr().err


def test_print_config_is_the_config_training_uses(tmp_path, capsys):
    args = ["train", "--config", "tiny_cpu", "train.steps=1", "train.log_every=1", "train.knn_every=100",
            f"train.out={tmp_path / 'run'}", "train.batch_size=8", "method.queue_size=64"]
    assert main(args + ["--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert not (tmp_path / "run").exists()  # printed, nothing trained
    assert printed["train"]["steps"] == 1 and printed["optim"]["lr"] is not None  # override and recipe applied
    assert main(args) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert printed == saved
