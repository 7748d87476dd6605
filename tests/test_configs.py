"""Composed configs: `include:` (order, relative paths, shipped names, cycles), every shipped
config loads and validates, configs ship as package data, and `sasi train --config
tiny_cpu` works from any folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasi_online.config import ConfigError, find_config, load_config, shipped_config_dir, shipped_configs

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                 for p in (REPO / "configs").rglob("*.yaml"))
METHODS = ["mocov2", "mocov3", "simsiam", "swav", "adco", "dino", "byol", "simclr", "barlow_twins", "vicreg"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_includes_apply_in_order_before_the_files_own_keys(tmp_path):
    write(tmp_path / "parts" / "a.yaml", "train: {steps: 11, batch_size: 8}\nmethod: {extra: {symmetric: true}}\n")
    write(tmp_path / "parts" / "b.yaml", "train: {steps: 22}\nmethod: {extra: {bn_splits: 4}}\n")
    top = write(tmp_path / "top.yaml", "include: [parts/a.yaml, parts/b]\ntrain: {log_every: 3}\n")
    cfg = load_config(top)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.log_every) == (22, 8, 3)  # b after a, own last
    assert cfg.method.extra == {"symmetric": True, "bn_splits": 4}  # mappings merge across files
    write(tmp_path / "own.yaml", "include: parts/b.yaml\ntrain: {steps: 5}\n")
    assert load_config(tmp_path / "own.yaml").train.steps == 5
    assert load_config(top, ["train.steps=7"]).train.steps == 7  # overrides come last


def test_includes_resolve_relative_to_the_including_file_then_shipped_names(tmp_path):
    write(tmp_path / "deep" / "sub" / "x.yaml", "include: ../y.yaml\n")
    write(tmp_path / "deep" / "y.yaml", "include: methods/byol\ntrain: {steps: 3}\n")  # a shipped name
    cfg = load_config(tmp_path / "deep" / "sub" / "x.yaml")
    assert cfg.method.name == "byol" and cfg.train.steps == 3
    assert cfg.optim.name == "lars"  # BYOL's recipe filled the rest


def test_include_cycles_and_missing_files_are_refused_clearly(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "include: self.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "self.yaml")
    write(tmp_path / "m.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"'nowhere.yaml' not found \(included from"):
        load_config(tmp_path / "m.yaml")
    write(tmp_path / "n.yaml", "include: {a: 1}\n")
    with pytest.raises(ConfigError, match="'include' must be a config name or a list"):
        load_config(tmp_path / "n.yaml")
    with pytest.raises(ConfigError, match="Did you mean 'imagenet100/byol'"):
        find_config("imagenet100/boyl")
    write(tmp_path / "bad.yaml", "include: parts.yaml\n")
    write(tmp_path / "parts.yaml", "trian: {steps: 1}\n")
    with pytest.raises(ConfigError, match=r"parts\.yaml: unknown config key 'trian'"):
        load_config(tmp_path / "bad.yaml")


def test_shipped_names_and_legacy_paths_find_the_same_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    assert find_config("tiny_cpu") == shipped_config_dir() / "tiny_cpu.yaml"
    assert find_config("configs/tiny_cpu.yaml") == shipped_config_dir() / "tiny_cpu.yaml"
    assert find_config("imagenet100/byol.yaml") == shipped_config_dir() / "imagenet100" / "byol.yaml"
    write(tmp_path / "tiny_cpu.yaml", "train: {steps: 9}\n")  # a path given wins over a shipped name
    assert load_config("tiny_cpu.yaml").train.steps == 9
    assert set(SHIPPED) <= set(shipped_configs())


def test_the_issue_layout_exists_for_every_method():
    for m in METHODS:
        for folder in ("methods", "imagenet100", "cifar10", "cifar100"):
            assert f"{folder}/{m}" in SHIPPED, f"configs/{folder}/{m}.yaml"
    for name in ("imagenet1k/mocov2", "tiny_imagenet/mocov2", "imagenet_sketch/mocov2", "imagenet_sketch/dino"):
        assert name in SHIPPED
    for ds in ("cifar10", "cifar100", "imagenet100", "imagenet1k", "tiny_imagenet", "imagenet_sketch"):
        assert f"datasets/{ds}" in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_validates(name):
    from sasi_online.train import validate

    # methods/ are fragments to include: they name no data or SASI store of their own
    cfg = load_config(name, ["train.pair_mode=base"] if name.startswith("methods/") else [])
    trainers = 8 - cfg.online.producers if "8gpu" in name else 1  # the other ranks produce
    validate(cfg, num_trainers=trainers)
    for section in ("method", "optim", "augment"):
        values = vars(getattr(cfg, section))
        assert all(v is not None for k, v in values.items()
                   if k not in ("temperature", "momentum", "momentum_final", "warmup_steps", "weight_decay_end")), \
            (name, section, values)


@pytest.mark.parametrize("folder", ["imagenet100", "cifar10", "cifar100", "imagenet_sketch"])
def test_per_dataset_configs_train_base_or_sasi_by_one_override(folder):
    for m in METHODS:
        if f"{folder}/{m}" not in SHIPPED:
            continue
        cfg = load_config(f"{folder}/{m}")
        assert cfg.method.name == m and cfg.train.pair_mode == "sasi" and cfg.store.path
        assert load_config(f"{folder}/{m}", ["train.pair_mode=base"]).train.pair_mode == "base"
        small = folder.startswith("cifar")
        assert cfg.data.image_size == (32 if small else 224) and cfg.method.small_stem == small


def test_configs_install_as_package_data(tmp_path):
    """What a non-editable `pip install .` gets: build_py output holds every config, and the
    loader finds them there from another folder."""
    build = tmp_path / "lib"
    # setup.py drops its own folder from sys.path (kernels/ would hide the Hugging Face
    # package whose egg_info writer setuptools loads): run as users do, from the checkout.
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)], cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    for name in SHIPPED:
        assert (build / "sasi_online" / "configs" / f"{name}.yaml").is_file(), name
    for recipe in (REPO / "sasi_online" / "data" / "recipes").glob("*.yaml"):  # augmentation recipes too
        assert (build / "sasi_online" / "data" / "recipes" / recipe.name).is_file(), recipe.name
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from sasi_online.config import load_config, shipped_config_dir; "
            "print(shipped_config_dir()); print(load_config('imagenet100/byol').optim.name)")
    out = subprocess.run([sys.executable, "-c", code, str(build)], cwd=tmp_path, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert Path(out[0]) == build / "sasi_online" / "configs" and out[1] == "lars"


def test_sasi_train_with_a_shipped_name_from_another_folder(tmp_path):
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}  # a fresh shell, not this test's world
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "sasi_online.cli", "train", "--config", "tiny_cpu", "train.steps=2",
           "train.out=run", "data.limit=96", "train.knn_bank=64", "train.knn_test=32", "train.log_every=1"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout
    assert (tmp_path / "run" / "config.yaml").is_file()


@pytest.mark.parametrize("name", ["online_1gpu", "online_8gpu"])
def test_ring_size_comments_match_the_rings_slot_layout(name):
    """The GiB a config's `ring_slots` comment states is what the ring allocates (slots x
    the slot the code builds for that config: SASI and real image at the slot side)."""
    import re

    from sasi_online.online.ring import RingPool
    from sasi_online.online.slots import slot_shape

    line = next(x for x in (REPO / "configs" / f"{name}.yaml").read_text().splitlines()
                if x.strip().startswith("ring_slots:"))
    stated = float(re.search(r"= ([0-9.]+) GiB", line).group(1))
    side = re.search(r"2x(\d+)x\d+x3", line).group(1)
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    shape = slot_shape(cfg)
    ring = RingPool(1, shape, max_reuse=1, max_age=1, dataset_size=1)
    assert (shape[0], str(shape[1])) == (2, side)
    assert stated == round(cfg.online.ring_slots * ring.bytes_per_slot / 2 ** 30, 2)
