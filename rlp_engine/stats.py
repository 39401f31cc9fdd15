"""Small statistics for the evaluation report: means with standard errors (plain, clustered by
prompt, paired across policies, binomial, across seeds) and the per-prompt scores they average.

Plain Python floats (no torch, no numpy). A figure that is defined but has no spread estimate (the SE
of a single value) is NaN, never an exception; bad input (nothing to average, mismatched lengths,
a proportion outside [0, 1]) raises ValueError naming the argument.

Why clustered: a policy's k samples of one prompt are not independent draws (they share the prompt's
difficulty), so the naive SE over all n*k samples, sd / sqrt(n*k), understates the uncertainty when
prompts differ. Averaging each prompt's samples first and taking the SE over the n prompt means is the
cluster-robust SE (exact for equal cluster sizes): the prompt is the unit that was sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class Estimate(NamedTuple):
    """A mean, its standard error (NaN when n < 2) and the number of units n it is over."""

    mean: float
    se: float
    n: int


def mean_se(values: Sequence[float], name: str = "values") -> Estimate:
    """mean = sum(x) / n; se = sd / sqrt(n) with sd = sqrt(sum((x - mean)^2) / (n - 1)) (ddof=1);
    NaN se for n = 1."""
    xs = [float(x) for x in values]
    n = len(xs)
    if n == 0:
        raise ValueError(f"{name}: empty, nothing to average")
    mean = math.fsum(xs) / n
    if n == 1:
        return Estimate(mean, math.nan, 1)
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def clustered_mean_se(groups: Sequence[Sequence[float]], name: str = "groups") -> Estimate:
    """Mean and SE clustered by group (one group = one prompt's values).

    m_i = mean of group i; mean = sum(m_i) / G; se = sd(m_1..m_G, ddof=1) / sqrt(G), over the G
    groups that hold at least one value (a prompt without a pair is left out, not counted as 0).
    n of the result is G."""
    means = [math.fsum(map(float, g)) / len(g) for g in groups if len(g)]
    if not means:
        raise ValueError(f"{name}: no group holds a value (got {len(groups)} groups)")
    return mean_se(means, name)


def paired_diff(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> Estimate:
    """Paired difference of two per-unit series on the same units (per-prompt means of two policies
    on the same prompts): d_i = a_i - b_i; mean = mean(d); se = sd(d, ddof=1) / sqrt(n).
    The prompt's own difficulty cancels in d_i, so this SE is at most about the unpaired one and
    usually much smaller."""
    if len(a) != len(b):
        raise ValueError(
            f"{names[1]}: length {len(b)} does not match {names[0]}'s {len(a)} (paired by position)"
        )
    return mean_se([float(x) - float(y) for x, y in zip(a, b)], names[0])


def binomial_se(outcomes: Sequence[float], name: str = "outcomes") -> Estimate:
    """Share of successes among n independent outcomes in [0, 1] (a tie scored 1/2 counts half):
    p = mean(outcomes); se = sqrt(p (1 - p) / n)."""
    xs = [float(x) for x in outcomes]
    if not xs:
        raise ValueError(f"{name}: empty, nothing to average")
    bad = [x for x in xs if not 0.0 <= x <= 1.0]
    if bad:
        raise ValueError(f"{name}: outcomes must lie in [0, 1], got {bad[0]!r}")
    p = math.fsum(xs) / len(xs)
    return Estimate(p, math.sqrt(p * (1.0 - p) / len(xs)), len(xs))


def pair_outcome(r_chosen: float, r_rejected: float) -> float:
    """1 when the reward model ranks the chosen response higher, 1/2 on a tie, 0 otherwise."""
    if r_chosen > r_rejected:
        return 1.0
    return 0.5 if r_chosen == r_rejected else 0.0


def best_of(rm_scores: Sequence[float], gold_scores: Sequence[float]) -> tuple[float, float]:
    """Best-of probe on one prompt's distinct candidates -> (hit, chance).

    top = candidates with the highest RM score, best = those with the highest gold score;
    hit = |top & best| / |top| (the chance that the RM's pick, ties broken uniformly, is gold-best);
    chance = |best| / n (the same for a uniform random pick)."""
    if len(rm_scores) != len(gold_scores):
        raise ValueError(f"gold_scores: length {len(gold_scores)} does not match rm_scores' {len(rm_scores)}")
    if not rm_scores:
        raise ValueError("rm_scores: empty, no candidate to pick")
    top_r, top_g = max(rm_scores), max(gold_scores)
    top = [i for i, r in enumerate(rm_scores) if r == top_r]
    best = {i for i, g in enumerate(gold_scores) if g == top_g}
    return sum(i in best for i in top) / len(top), len(best) / len(gold_scores)


def seed_summary(values: Sequence[float]) -> dict:
    """One figure measured under several seeds -> {"mean", "se", "per_seed"}: mean over seeds and
    se = sd(ddof=1) / sqrt(#seeds) (NaN for one seed): the spread a rerun with another seed shows."""
    est = mean_se(values, "values")
    return {"mean": est.mean, "se": est.se, "per_seed": [float(v) for v in values]}


def json_safe(obj):
    """A copy of nested dicts/lists/tuples with every NaN float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
