"""The paper's experiments as runs: which shipped config and override make each table cell.

Every SASI run is a config under `configs/paper/` (it includes a method recipe and a
dataset preset and adds the store and generation settings it needs); its base run is
the same config with `train.pair_mode=base`. A run is named by its config, so tables
that share a setting share the run (Table 1's MoCo-v2 w/ SASI is also Table 9's
"detail" row, Table 10's "Real Image", Table 11's first row, Table 12's (a), ...).
The paper's numbers come from `numbers.yaml`, cited per table.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from sasi_online.errors import UserInputError

NUMBERS_FILE = Path(__file__).with_name("numbers.yaml")
METRICS = {"Linear": "linear", "KNN": "knn"}  # paper label -> eval.json section (top-1)


@dataclass(frozen=True)
class Run:
    config: str  # shipped config name, e.g. "paper/imagenet100/mocov2"
    base: bool = False  # the same config with train.pair_mode=base

    @property
    def id(self) -> str:
        return self.config.removeprefix("paper/") + ("_base" if self.base else "")

    def overrides(self, runs_root: str) -> list[str]:
        return (["train.pair_mode=base"] if self.base else []) + [f"train.out={runs_root}/{self.id}"]


def sasi(name: str) -> Run:
    return Run(f"paper/{name}")


def base(name: str) -> Run:
    return Run(f"paper/{name}", base=True)


IN100 = "imagenet100/mocov2"
SKETCH = "imagenet_sketch/mocov2"

# Table -> columns (or rows) -> run, in the paper's order.
_BY_COLUMN = {  # rows are "<metric> Base" / "<metric> w/ SASI"
    "1": {"MoCo-v2": IN100, "MoCo-v2* (R101)": "imagenet100/mocov2_r101", "SimSiam": "imagenet100/simsiam",
          "SwAV": "imagenet100/swav", "AdCo": "imagenet100/adco", "MoCo-v3": "imagenet100/mocov3"},
    "2": {"Cifar10": "cifar10/mocov2", "Cifar100": "cifar100/mocov2", "ImageNet-1k": "imagenet1k/mocov2",
          "Tiny-ImageNet": "tiny_imagenet/mocov2", "Sketch-1k": SKETCH},
    "3": {"DINO": "imagenet_sketch/dino"},
}
FIG8 = {  # Table 12: Fig. 8's ways of using SASI -> pair modes (README: "Reproducing the paper")
    "(a)": sasi(IN100),  # A(x), A(s)
    "(b)": sasi("imagenet100/mocov2_fig8_real_aug"),  # augmentation on the real view only
    "(c)": sasi("imagenet100/mocov2_fig8_no_aug"),  # no augmentation
    "(d)": sasi("imagenet100/mocov2_fig8_three_flow"),  # A(x), A(x), A(s)
    "(e)": base(IN100),  # A(x), A(x)
    "(f)": sasi("imagenet100/mocov2_fig8_synthetic_only"),  # (e) with SASI for the real images
    "(g)": base(IN100),  # not described in the text: the closest mode, real images only, is base
    "(h)": sasi("imagenet100/mocov2_fig8_synthetic_only"),  # (g) with SASI for the real images
}
_BY_ROW = {  # columns are the metrics
    "4": {"w/ SASI": sasi(SKETCH), "Mix": sasi("imagenet_sketch/mocov2_mix")},
    "8": {"Direct gen. (Tian et al., 2024)": sasi("imagenet_sketch/mocov2_direct"), "Controlled gen": sasi(SKETCH)},
    "9": {"— (base)": base(IN100),
          "Question: What does this picture describe? Answer": sasi("imagenet100/mocov2_sep_question"),
          "Please describe the picture in detail": sasi(IN100),
          "What objects are included in this picture?": sasi("imagenet100/mocov2_sep_objects")},
    "10": {"— (base)": base(IN100), "Real Image": sasi(IN100), "Mask Map": sasi("imagenet100/mocov2_vp_mask"),
           "Mask-Image Mixing": sasi("imagenet100/mocov2_vp_mix"),
           "Random Noise": sasi("imagenet100/mocov2_vp_noise")},
    "11": {"Semantic – / VP –": sasi(IN100), "Semantic ×1 / VP –": sasi("imagenet100/mocov2_sem1"),
           "Semantic – / VP ×1": sasi("imagenet100/mocov2_vp1"),
           "Semantic ×1 / VP ×1": sasi("imagenet100/mocov2_sem1_vp1"),
           "Semantic ×2 / VP ×2": sasi("imagenet100/mocov2_sem2_vp2")},
    "14": {"w/ SASI": sasi(IN100), "No examples": sasi("imagenet100/mocov2_srp_none"),
           "Expansion examples": sasi("imagenet100/mocov2_srp_expansion"),
           # semantic augmentation x1 with the rewriting SRP: Table 11's second row, the same run
           "Rewriting examples": sasi("imagenet100/mocov2_sem1")},
}
NOTES = {
    "12": "(g) is not described in the text; its closest pair mode is base, so (g) and (e) are one run, "
          "and (h), '(g) with SASI in place of real images', is (f)'s run.",
    "14": "Each SRP row is semantic augmentation x1 (two SASI per image) with that SRP; 'Rewriting "
          "examples' is Table 11's 'Semantic x1' run.",
}


@dataclass(frozen=True)
class Table:
    number: str
    caption: str
    columns: list
    rows: dict  # row label -> paper values, one per column
    cells: dict  # (row, column) -> (Run, eval.json section)
    note: str = ""

    @property
    def runs(self) -> list[Run]:
        """Distinct runs in the order the table first meets them."""
        seen: dict = {}
        for run, _ in self.cells.values():
            seen.setdefault(run.id, run)
        return list(seen.values())


@lru_cache(maxsize=1)
def _numbers() -> dict:
    return yaml.safe_load(NUMBERS_FILE.read_text(encoding="utf-8"))


def table_numbers() -> list[str]:
    return list(_numbers())


def _cells(number: str, columns: list, rows: dict) -> dict:
    cells = {}
    for row in rows:
        for col in columns:
            if number in _BY_COLUMN:
                metric, _, kind = row.partition(" ")
                name = _BY_COLUMN[number][col]
                cells[(row, col)] = (base(name) if kind == "Base" else sasi(name), METRICS[metric])
            elif number == "12":
                cells[(row, col)] = (FIG8[col], METRICS[row])
            else:
                cells[(row, col)] = (_BY_ROW[number][row], METRICS[col])
    return cells


def get_table(number: str | int) -> Table:
    key = str(number).strip().lower().removeprefix("table").strip()
    entry = _numbers().get(key)
    if entry is None:
        raise UserInputError(f"the paper has no reproducible Table {number}; choose one of "
                             f"{', '.join(table_numbers())} (Tables 5-7 are downstream tasks, 13 is GPU hours)")
    return Table(key, entry["caption"], list(entry["columns"]), dict(entry["rows"]),
                 _cells(key, list(entry["columns"]), dict(entry["rows"])), NOTES.get(key, ""))
