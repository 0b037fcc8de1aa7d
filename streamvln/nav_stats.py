"""Evaluation statistics: 95% intervals for closed-loop summaries and paired tests between two runs.

Rates (SR, OS) get Wilson score intervals; means (SPL, nDTW, NE, ...) get percentile bootstrap intervals
with a fixed seed, so a summary is byte-identical when its episodes are. Two runs are compared on the
episodes both evaluated: McNemar's exact test for success-type outcomes (only the discordant episodes
carry information), the paired bootstrap and Wilcoxon's signed-rank test for continuous metrics.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

RATES = ("success", "oracle_success")
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def interval(metric: str, values) -> tuple[float, float]:
    values = [float(v) for v in values]
    if metric in RATES:
        return wilson(int(round(sum(values))), len(values))
    return bootstrap_mean(values)


def mcnemar(a, b) -> dict:
    """Exact McNemar test on paired binary outcomes: a-only and b-only counts, two-sided p."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5).pvalue)
    return {"a_only": only_a, "b_only": only_b, "p": p}


def paired(metric: str, a, b) -> dict:
    """Means of both runs, the mean difference b - a with its 95% interval, and a paired test's p."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = b - a
    out = {"a": float(a.mean()), "b": float(b.mean()), "diff": float(d.mean())}
    if metric in RATES:
        out.update(mcnemar(a > 0.5, b > 0.5))
        out["test"] = "mcnemar_exact"
    else:
        nonzero = d[d != 0]
        out["p"] = 1.0 if len(nonzero) == 0 else float(stats.wilcoxon(nonzero).pvalue)
        out["test"] = "wilcoxon_signed_rank"
    out["diff_ci95"] = list(bootstrap_mean(d))
    return out
