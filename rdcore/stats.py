"""Statistics of evaluations: paired differences between methods over the same test rows, and
binomial confidence intervals of a rate (``rdcore.evaluate``'s ``eval.json``)."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict


def paired_difference(method_SR: list[dict[int, tuple[str, str, float]]],
                      ref_SR: list[dict[int, tuple[str, str, float]]]) -> tuple[float, float, int]:
    """A method's main metric minus the reference's over the same test rows: each row's value is
    averaged over the seeds (S) first, then the metric is the mean over groups of the group means.
    Returns (difference, its standard error over test rows, rows): SE = √(Σ_g var_g / n_g) / G, the
    sampling error of a test set of this size — which the spread over seeds does not show."""
    rows = sorted(set.intersection(*(set(d) for d in method_SR + ref_SR)))
    groups: dict[str, list[float]] = defaultdict(list)
    for i in rows:
        a = statistics.mean(d[i][2] for d in method_SR)
        b = statistics.mean(d[i][2] for d in ref_SR)
        groups[ref_SR[0][i][1]].append(a - b)
    if not groups:
        return float("nan"), float("nan"), 0
    diff = statistics.mean(statistics.mean(v) for v in groups.values())
    if any(len(v) < 2 for v in groups.values()):
        return diff, float("nan"), len(rows)
    var = sum(statistics.variance(v) / len(v) for v in groups.values())
    return diff, var ** 0.5 / len(groups), len(rows)


def seed_difference(method_SR: list[dict[int, tuple[str, str, float]]],
                    ref_SR: list[dict[int, tuple[str, str, float]]]) -> tuple[float, float, int]:
    """The same difference seed by seed: method and reference of seed s paired over their rows
    (:func:`paired_difference` with one seed each), then the mean over the S seeds and its standard
    error over seeds, stdev/√S — the spread of retraining, which the SE over test rows does not
    show (NaN below two seeds). Returns (difference, SE over seeds, S)."""
    diffs = [paired_difference([m], [r])[0] for m, r in zip(method_SR, ref_SR, strict=True)]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (95 % by default): exact at 0 and n successes
    (never [0, 0] from a sample of 5), unlike the normal approximation. ``n = 0``: (nan, nan)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else max(0.0, centre - half)  # exactly 0 / 1 at the ends, not
    high = 1.0 if successes >= n else min(1.0, centre + half)  # 1e-17 of rounding
    return low, high
