"""rlp_engine.stats on hand-worked cases, against numpy float64 on fresh random inputs, and its
error paths."""

import json
import math
import random

import numpy as np
import pytest

from rlp_engine.stats import (
    Estimate,
    best_of,
    binomial_se,
    clustered_mean_se,
    json_safe,
    mean_se,
    pair_outcome,
    paired_diff,
    seed_summary,
)


def test_clustered_se_exceeds_naive_se_when_prompts_differ():
    # Two samples on each of three prompts: [1, 1], [0, 0], [1, 0].
    # Clustered: prompt means 1, 0, 0.5 -> mean 0.5; deviations 0.5, -0.5, 0 -> var = 0.5 / 2 = 0.25,
    # sd 0.5, se = 0.5 / sqrt(3) = 0.288675.
    # Naive over the six samples: mean 0.5, var = 6 * 0.25 / 5 = 0.3, se = sqrt(0.3 / 6) = 0.223607.
    est = clustered_mean_se([[1, 1], [0, 0], [1, 0]])
    assert est == pytest.approx(Estimate(0.5, 0.5 / math.sqrt(3), 3))
    naive = mean_se([1, 1, 0, 0, 1, 0])
    assert naive == pytest.approx(Estimate(0.5, math.sqrt(0.05), 6))
    assert est.se > naive.se


def test_clustered_mean_weights_prompts_not_samples_and_skips_empty_groups():
    # Prompt means 2 and 1 (a pooled mean over the four values would be 1.25): mean 1.5;
    # sd(2, 1) = sqrt(0.5), se = sqrt(0.5) / sqrt(2) = 0.5. The empty group (a prompt without a pair)
    # is left out, so G = 2.
    assert clustered_mean_se([[2.0], [], [0.0, 1.0, 2.0]]) == pytest.approx(Estimate(1.5, 0.5, 2))


def test_one_value_has_a_mean_and_a_nan_se():
    est = mean_se([0.25])
    assert est.mean == 0.25 and math.isnan(est.se) and est.n == 1


def test_paired_se_is_far_below_the_unpaired_one():
    # d = a - b = [0.1, 0.2, 0.0]: mean 0.1; deviations 0, 0.1, -0.1 -> var 0.02 / 2 = 0.01, sd 0.1,
    # se = 0.1 / sqrt(3) = 0.057735. Unpaired: se(a) = 0.4 / sqrt(3) = 0.2309,
    # se(b) = sqrt(0.13) / sqrt(3) = 0.2082, sqrt(se_a^2 + se_b^2) = 0.3109.
    a, b = [0.9, 0.5, 0.1], [0.8, 0.3, 0.1]
    est = paired_diff(a, b)
    assert est == pytest.approx(Estimate(0.1, 0.1 / math.sqrt(3), 3))
    unpaired = math.hypot(mean_se(a).se, mean_se(b).se)
    assert unpaired == pytest.approx(0.31091, abs=1e-5) and est.se < unpaired / 5


def test_binomial_se_with_a_tie_counted_half():
    # RM outcomes on four pairs: win, tie, loss, win -> p = 2.5 / 4 = 0.625;
    # se = sqrt(0.625 * 0.375 / 4) = sqrt(0.05859375) = 0.242061.
    outcomes = [pair_outcome(2.0, 1.0), pair_outcome(1.0, 1.0), pair_outcome(0.0, 1.0), pair_outcome(3, -1)]
    assert outcomes == [1.0, 0.5, 0.0, 1.0]
    assert binomial_se(outcomes) == pytest.approx(Estimate(0.625, math.sqrt(0.05859375), 4))


def test_best_of_breaks_rm_ties_uniformly():
    # RM top: candidates 1 and 2 (0.9 each); gold-best: 0 and 1 (1.0 each). The RM's pick is gold-best
    # with probability 1/2; a random pick with 2/4.
    assert best_of([0.3, 0.9, 0.9, 0.1], [1.0, 1.0, 0.5, 0.0]) == (0.5, 0.5)
    # a single RM top that is the unique gold-best: hit 1, chance 1/3
    assert best_of([0.0, 2.0, 1.0], [0.1, 0.9, 0.5]) == (1.0, pytest.approx(1 / 3))


def test_against_numpy_float64():
    rng = np.random.default_rng(1234)
    sizes = rng.integers(1, 6, size=37)
    groups = [rng.normal(rng.normal(), 1.0, size=k).tolist() for k in sizes]
    means = np.array([np.mean(g) for g in groups], dtype=np.float64)
    est = clustered_mean_se(groups)
    assert est.n == 37
    np.testing.assert_allclose(est.mean, means.mean(), rtol=1e-12)
    np.testing.assert_allclose(est.se, means.std(ddof=1) / np.sqrt(37), rtol=1e-12)

    a, b = rng.random(53), rng.random(53)
    d = paired_diff(a.tolist(), b.tolist())
    np.testing.assert_allclose(
        [d.mean, d.se], [(a - b).mean(), (a - b).std(ddof=1) / np.sqrt(53)], rtol=1e-12
    )

    outcomes = rng.choice([0.0, 0.5, 1.0], size=101)
    p = outcomes.mean()
    np.testing.assert_allclose(binomial_se(outcomes.tolist()).se, np.sqrt(p * (1 - p) / 101), rtol=1e-12)

    per_seed = rng.normal(size=5)
    s = seed_summary(per_seed.tolist())
    assert set(s) == {"mean", "se", "per_seed"} and s["per_seed"] == per_seed.tolist()
    np.testing.assert_allclose(
        [s["mean"], s["se"]], [per_seed.mean(), per_seed.std(ddof=1) / np.sqrt(5)], rtol=1e-12
    )


def test_best_of_against_brute_force_tie_breaking():
    rng = random.Random(99)
    for _ in range(50):
        n = rng.randint(1, 6)
        rm = [rng.choice([0.0, 1.0, 2.0]) for _ in range(n)]
        gold = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]
        top = [i for i in range(n) if rm[i] == max(rm)]
        hits = [gold[i] == max(gold) for i in top]  # every way the RM could break its tie
        hit, chance = best_of(rm, gold)
        assert hit == pytest.approx(sum(hits) / len(hits))
        assert chance == pytest.approx(sum(g == max(gold) for g in gold) / n)


def test_json_safe_replaces_nan_with_none():
    out = json_safe({"a": math.nan, "b": [1.0, math.nan], "c": Estimate(0.5, math.nan, 1), "d": "x"})
    assert out == {"a": None, "b": [1.0, None], "c": [0.5, None, 1], "d": "x"}
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mean_se([]), "values: empty"),
        (lambda: clustered_mean_se([[], []], name="gold"), "gold: no group holds a value"),
        (lambda: clustered_mean_se([]), "groups: no group"),
        (
            lambda: paired_diff([1.0, 2.0], [1.0], names=("rlp_spg", "ppo")),
            "ppo: length 1 does not match rlp_spg's 2",
        ),
        (lambda: paired_diff([], []), "a: empty"),
        (lambda: binomial_se([]), "outcomes: empty"),
        (lambda: binomial_se([1.0, 1.5]), r"outcomes: outcomes must lie in \[0, 1\], got 1.5"),
        (lambda: best_of([1.0, 2.0], [1.0]), "gold_scores: length 1 does not match"),
        (lambda: best_of([], []), "rm_scores: empty"),
        (lambda: seed_summary([]), "values: empty"),
    ],
)
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
