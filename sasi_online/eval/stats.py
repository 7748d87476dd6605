"""Small-sample statistics for comparing training arms over seeds.

`mean_std` gives the mean and the sample standard deviation (n - 1 in the denominator);
`paired_interval` the mean per-seed difference between two arms run with the same seeds,
with a two-sided t interval on n - 1 degrees of freedom. The t quantile comes from
scipy when it is installed, else from a table of the 97.5 % quantiles (exact to 3 decimals).
"""
from __future__ import annotations

import math
from typing import Sequence

# two-sided 95 % (the 0.975 quantile) of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile(dof: int, level: float = 0.95) -> float:
    """The two-sided `level` critical value of Student's t with `dof` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 seeds), got {dof}")
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, dof))
    except ImportError:
        pass
    if abs(level - 0.95) > 1e-12:
        raise ValueError(f"without scipy only the 95 % level is tabulated, got {level}")
    if dof in _T975:
        return _T975[dof]
    above = [d for d in _T975 if d > dof]
    if not above:
        return 1.960
    # between tabulated rows: conservative (the smaller dof, the larger quantile)
    return _T975[max(d for d in _T975 if d < dof)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_std of no values")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def paired_interval(arm: Sequence[float], base: Sequence[float], level: float = 0.95) -> dict:
    """Per-seed differences arm - base (same seeds, same order): their mean, std and the
    t interval of the mean difference. With one seed the interval is undefined (None)."""
    if len(arm) != len(base):
        raise ValueError(f"paired values need the same seeds: {len(arm)} vs {len(base)} values")
    diffs = [float(a) - float(b) for a, b in zip(arm, base)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    out = {"n": n, "diffs": diffs, "mean": mean, "std": std, "level": level, "low": None, "high": None}
    if n >= 2:
        half = t_quantile(n - 1, level) * std / math.sqrt(n)
        out.update(low=mean - half, high=mean + half, half_width=half)
    return out
