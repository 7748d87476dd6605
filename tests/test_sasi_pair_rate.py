"""A run's SASI pair rate travels with it: checkpoint client state -> eval.json -> report,
so a comparison table can never show "w/ SASI" for a run that got none."""
import json

from sasi_online.data.sasi_source import sasi_pair_rate
from sasi_online.eval.report import render_markdown
from sasi_online.eval.suite import _sasi_pair_rate


def test_pair_rate_counts_every_paired_outcome():
    assert sasi_pair_rate({"ring_hit": 6, "pool_draw": 2, "store": 1, "fallback": 7}) == 9 / 16
    assert sasi_pair_rate({"hit": 3, "fishy": 1, "missing": 4}) == 3 / 8
    assert sasi_pair_rate({}) is None  # base pairs: no SASI asked


def test_eval_reads_the_rate_of_every_trainer(tmp_path):
    tag = tmp_path / "global_step4"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag / "client_rank0.json").write_text(json.dumps({"sasi_outcomes": {"ring_hit": 8, "fallback": 0}}))
    (tag / "client_rank1.json").write_text(json.dumps({"sasi_outcomes": {"ring_hit": 0, "fallback": 8}}))
    assert _sasi_pair_rate(tag / "mp_rank_00_model_states.pt") == 0.5


def test_report_flags_a_sasi_run_without_sasi():
    runs = [{"results": {"knn": {"top1": 50.0}}, "pair_mode": "base", "sasi_pair_rate": None},
            {"results": {"knn": {"top1": 51.0}}, "pair_mode": "sasi", "sasi_pair_rate": 0.0},
            {"results": {"knn": {"top1": 52.0}}, "pair_mode": "sasi", "sasi_pair_rate": 0.875}]
    text = render_markdown(["base", "online", "offline"], runs)
    assert "| base | — | — | base | — |" in text and "| 88 % |" in text
    assert "- online: **no SASI reached this run**" in text and "- offline: **no SASI" not in text
