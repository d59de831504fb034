"""Significance statistics for seed-paired comparisons (A/B reports and representation
analysis): t-intervals, the seed-paired t-test, Holm's
step-down adjustment and the equivalence check. No I/O, no knowledge of results rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from . import student_t

CONFIDENCE = 0.95
# Fewest seed pairs on which a comparison gets a verdict (reports), a paired test
# (representation analysis) or a sweep choice: with 2 the t critical value is 12.7.
MIN_PAIRED_SEEDS = 3


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, sd


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean: x̄ ± t_{(1+c)/2, n−1} · s/√n.

    NaN bounds for fewer than two values (no variance estimate)."""
    n = len(values)
    if n < 2:
        return float("nan"), float("nan")
    mean, sd = _mean_sd(values)
    half = student_t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


@dataclass(frozen=True)
class PairedDifference:
    """Δ = arm − parent over the ``n`` seeds both have: mean Δ, its t-interval and the
    two-sided paired t-test p-value. ``identical`` marks zero-variance differences, where
    t = Δ̄ / (s/√n) is undefined: p and the interval are then NaN, never 0 or 1."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p: float
    identical: bool


def paired_difference(arm: Mapping[int, float], parent: Mapping[int, float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Seed-paired comparison of two ``{seed: value}`` maps.

    With d_i = arm_i − parent_i (i over shared seeds), d̄ and s_d: t = d̄ / (s_d/√n) on
    n − 1 degrees of freedom, p = 2·P(T > |t|), interval d̄ ± t_{(1+c)/2, n−1} · s_d/√n
    (the same as ``scipy.stats.ttest_rel(arm, parent)``). Fewer than two pairs: no test."""
    seeds = sorted(set(arm) & set(parent))
    diffs = [arm[s] - parent[s] for s in seeds]
    n = len(diffs)
    nan = float("nan")
    if n == 0:
        return PairedDifference(0, nan, nan, nan, nan, False)
    mean, sd = _mean_sd(diffs)
    if n < 2:
        return PairedDifference(n, mean, nan, nan, nan, False)
    if all(d == diffs[0] for d in diffs):
        return PairedDifference(n, mean, nan, nan, nan, True)
    se = sd / math.sqrt(n)
    low, high = t_interval(diffs, confidence)
    p = 2 * student_t.sf(abs(mean / se), n - 1)
    return PairedDifference(n, mean, low, high, p, False)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    The m finite p-values sorted ascending p_(1) ≤ … ≤ p_(m) become
    p̃_(k) = max_{j ≤ k} min(1, (m − j + 1) · p_(j)); rejecting p̃ < α controls the
    family-wise error rate at α. NaN entries stay NaN and are not counted in m."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(finite)
    adjusted = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def within_margin(low: float, high: float, margin: float) -> bool:
    """Whether the interval [low, high] lies inside (−margin, +margin): equivalence by two
    one-sided tests at level (1 − confidence)/2 each. False for NaN bounds or margin."""
    return all(math.isfinite(x) for x in (low, high, margin)) and -margin < low and high < margin
