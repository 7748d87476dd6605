"""The ring and store benches run end to end at small sizes (their full-size figures are
in the README); speed is reported there, never asserted."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_ring_small(tmp_path, capsys):
    out = _bench("bench_ring").main(["--slots", "2000", "--batch", "64", "--steps", "20",
                                     "--dataset-size", "5000", "--out", str(tmp_path)])
    for run in (out["full"], out["tenth"]):
        assert all(run[op] > 0 for op in ("lookup", "draw", "put", "stats", "lookup+draw"))
        assert 0.4 < run["hit_rate"] <= 1.0  # half of each batch is held by the ring
    assert out["tenth"]["slots"] == 200 and (tmp_path / "ring.json").is_file()
    assert "lookup+draw" in capsys.readouterr().out


def test_bench_store_small(tmp_path, capsys):
    out = _bench("bench_store").main(["--records", "3000", "--lookups", "500", "--dir", str(tmp_path)])
    assert out["build"]["records"] == out["open"]["records"] == 3000
    assert out["open"]["variant_lookups_per_s"] > 0 and out["index_mb"] > 0
    assert not (tmp_path / "store").exists()  # cleaned up
    assert "open with the index" in capsys.readouterr().out
