"""Metric logging on the first trainer: JSONL (one object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._writer = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:  # tensorboard is optional (a bare GPU machine may lack it): JSONL always
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    import warnings

                    warnings.warn(f"TensorBoard logging off ({exc}); metrics go to {self.path} only. "
                                  f"pip install tensorboard to get them in TensorBoard too")
                else:
                    self._writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            # appended and flushed per line: a crash loses at most the line being written
            fh.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self._writer is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)

    def drop_after(self, step: int) -> None:
        """On resume from `step`: drop the records of later steps, which the interrupted run
        logged after its last checkpoint and the resumed run logs again."""
        if not self.enabled or not self.path.is_file():
            return
        from sasi_online.utils import atomic_write_text

        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [x for x in lines if x.strip() and _step_of(x) is not None and _step_of(x) <= step]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(x + "\n" for x in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by the crash


def read_metrics(path: Path, key: Optional[str] = None) -> list[dict]:
    """All records of a metrics.jsonl (optionally only those that have `key`)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if key is None or key in r]
