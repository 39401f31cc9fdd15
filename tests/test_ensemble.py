"""Reward-model ensembles (algos/ensemble.py): the objectives against a float64 reference written out
by hand, a hand-worked case, the scorer module against the objective over its members' scores, and
bad input naming the argument."""

import math

import pytest
import torch

from rlp_engine.algos.ensemble import EnsembleScorer, ensemble_objective, standardisation
from rlp_engine.config import load_config
from rlp_engine.models import ScalarHeadModel, tiny_llama, train_byte_tokenizer


def _reference(scores: torch.Tensor, objective: str, lam: float) -> torch.Tensor:
    """Per response, in float64, by loops over the members."""
    k, b = scores.shape
    out = []
    for j in range(b):
        col = [float(scores[i, j]) for i in range(k)]
        mean = sum(col) / k
        if objective == "mean":
            out.append(mean)
        elif objective == "wco":
            out.append(min(col))
        else:
            out.append(mean - lam * sum((x - mean) ** 2 for x in col) / k)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 7), (4, 1), (5, 33)])
def test_objective_matches_float64_reference_forward_and_grad(objective, shape):
    scores = (torch.randn(*shape) * 2.0 + 0.5).requires_grad_(True)
    lam = 0.7
    got = ensemble_objective(scores, objective, lam)
    want = _reference(scores.detach().double(), objective, lam)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # gradients against the float64 autograd of the same formula
    s64 = scores.detach().double().requires_grad_(True)
    mean = s64.mean(0)
    ref = {"mean": mean, "wco": s64.min(0).values, "uwo": mean - lam * ((s64 - mean) ** 2).mean(0)}[objective]
    w = torch.randn(shape[1], dtype=torch.float64)
    (got * w.float()).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(scores.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_objective_hand_worked():
    # one response, members 1, 2, 6: mean 3, min 1, population variance (4 + 1 + 9) / 3 = 14/3
    scores = torch.tensor([[1.0], [2.0], [6.0]])
    assert ensemble_objective(scores, "mean").item() == pytest.approx(3.0)
    assert ensemble_objective(scores, "wco").item() == pytest.approx(1.0)
    assert ensemble_objective(scores, "uwo", 0.5).item() == pytest.approx(3.0 - 0.5 * 14 / 3)
    # lambda 0 is the mean; members that agree pay no penalty; one member: all three are its score
    torch.testing.assert_close(ensemble_objective(scores, "uwo", 0.0), ensemble_objective(scores, "mean"))
    same = torch.full((4, 3), 1.25)
    torch.testing.assert_close(ensemble_objective(same, "uwo", 10.0), torch.full((3,), 1.25))
    one = torch.randn(1, 6)
    for obj in ("mean", "wco", "uwo"):
        torch.testing.assert_close(ensemble_objective(one, obj, 3.0), one[0])
    # empty batch: an empty result
    assert ensemble_objective(torch.zeros(3, 0), "uwo", 1.0).shape == (0,)


def test_wco_never_exceeds_mean_and_uwo_decreases_in_lambda():
    scores = torch.randn(4, 50)
    assert bool((ensemble_objective(scores, "wco") <= ensemble_objective(scores, "mean") + 1e-6).all())
    a, b = ensemble_objective(scores, "uwo", 0.1), ensemble_objective(scores, "uwo", 1.0)
    assert bool((b <= a).all()) and bool((b < a).any())


def test_standardisation_gives_zero_mean_unit_std_on_the_reference():
    ref = torch.randn(3, 40) * torch.tensor([[0.5], [2.0], [7.0]]) + torch.tensor([[3.0], [-1.0], [0.0]])
    shift, scale = standardisation(ref)
    z = (ref - shift[:, None]) / scale[:, None]
    torch.testing.assert_close(z.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    _, flat = standardisation(torch.ones(2, 5))
    assert bool((flat > 0).all())  # a constant member: floored, stays finite


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="objective"):
        ensemble_objective(torch.randn(3, 2), "median")
    with pytest.raises(ValueError, match="scores"):
        ensemble_objective(torch.randn(6), "mean")
    with pytest.raises(ValueError, match="scores"):
        ensemble_objective(torch.zeros(0, 4), "mean")
    with pytest.raises(ValueError, match="scores"):
        ensemble_objective(torch.ones(2, 2, dtype=torch.long), "mean")
    for lam in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="uwo_lambda"):
            ensemble_objective(torch.randn(3, 2), "uwo", lam)
    with pytest.raises(ValueError, match="scores"):
        standardisation(torch.randn(3, 0))


@pytest.fixture(scope="module")
def members():
    cfg = load_config(preset="tiny")
    tok = train_byte_tokenizer(["0123456789+="])
    torch.manual_seed(0)
    policy = tiny_llama(cfg.model, tok)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(ScalarHeadModel.from_causal_lm(policy).eval())
    return out


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
def test_scorer_is_the_objective_over_its_members_standardised_scores(members, objective):
    ids = torch.randint(3, 12, (5, 9))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding on one row
    shift, scale = torch.randn(3), torch.rand(3) + 0.5
    scorer = EnsembleScorer(members, shift, scale, objective, uwo_lambda=0.8)
    with torch.no_grad():
        raw = torch.stack([m.score(ids, attn) for m in members]).double()
        want = _reference((raw - shift[:, None].double()) / scale[:, None].double(), objective, 0.8)
        got = scorer.score(ids, attn)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert scorer.member_scores(ids, attn).shape == (3, 5)
    # the members are shared, not copied
    assert scorer.members[0] is members[0]


def test_scorer_refuses_mismatched_normalisers(members):
    with pytest.raises(ValueError, match="shift, scale"):
        EnsembleScorer(members, torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="scale"):
        EnsembleScorer(members, torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="objective"):
        EnsembleScorer(members, torch.zeros(3), torch.ones(3), "max")
