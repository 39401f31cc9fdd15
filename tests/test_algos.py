"""RLP pieces on hand-worked cases (clustering, confidence, pair choice, reward shaping, BT loss, the
UML views) and a PPO update that lowers its loss on a fixed batch."""

import dataclasses
import math
import random

import pytest
import torch
from tiny import tiny_preset

from rlp_engine import ops
from rlp_engine.algos import (
    PolicySamples,
    bt_loss,
    cluster,
    shaped_rewards,
    spg_pair,
    synthetic_preferences,
)
from rlp_engine.algos.rlp import EQUIVALENCES, MultiViewData
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import Throughput
from rlp_engine.models import GaussianEncoder, ScalarHeadModel
from rlp_engine.recipes.ppo import init_ppo, make_experience, ppo_losses, train_on_experience
from rlp_engine.recipes.rlp import ib_aux_loss

# Ten samples of "12+7=": final answers 19 x5 (indices 0, 1, 3, 6, 8), 18 x2 (2, 7), 20, 7, and one
# without a number ("x", its own cluster).
RESPONSES = ["19", "19", "18", "19 ", "x", "20", "19", "18", "19", "7"]
FA = EQUIVALENCES["final_answer"]


def test_cluster_by_final_answer_largest_first():
    clusters = cluster(RESPONSES, FA)
    # Sizes 5, 2, then the singletons in order of first appearance: "x" (4), "20" (5), "7" (9).
    assert clusters == [[0, 1, 3, 6, 8], [2, 7], [4], [5], [9]]


def test_cluster_exact_text_and_answerless_responses_stay_apart():
    assert cluster(["a ", "a", "b"], EQUIVALENCES["exact"]) == [[0, 1], [2]]
    # Two responses with no extractable answer are not "equal" under final_answer.
    assert cluster(["x", "x", "3"], FA) == [[0], [1], [2]]


def test_spg_pair_confidence_winner_and_loser():
    clusters = cluster(RESPONSES, FA)
    rewards = [0.1, 0.9, 5.0, 0.9, 0.0, 0.0, 0.3, 0.0, 0.2, 0.0]
    # confidence = 5 / 10 = 0.5 >= gamma = 0.5: kept. y_w: the largest cluster's best reward, 0.9 at
    # indices 1 and 3: the first (1, "19") wins the tie. Index 2 ("18") has reward 5 but is outside it.
    pair = spg_pair("12+7=", RESPONSES, rewards, clusters, 0.5, random.Random(0))
    assert pair.prompt == "12+7=" and pair.chosen == "19"
    # y_l: uniform over the 5 members of the other clusters: "18" twice, "x", "20", "7".
    counts = {}
    for seed in range(2000):
        p = spg_pair("12+7=", RESPONSES, rewards, clusters, 0.5, random.Random(seed))
        counts[p.rejected] = counts.get(p.rejected, 0) + 1
    assert set(counts) == {"18", "x", "20", "7"}
    assert counts["18"] / 2000 == pytest.approx(2 / 5, abs=0.04)
    assert counts["7"] / 2000 == pytest.approx(1 / 5, abs=0.04)


def test_spg_pair_rejects_low_confidence_and_unanimous_prompts():
    clusters = cluster(RESPONSES, FA)
    rewards = [0.0] * 10
    assert spg_pair("p", RESPONSES, rewards, clusters, 0.6, random.Random(0)) is None  # 0.5 < 0.6
    same = ["4"] * 4
    assert spg_pair("p", same, [0.0] * 4, cluster(same, FA), 0.5, random.Random(0)) is None  # empty rest


def test_synthetic_preferences_statistics():
    samples = PolicySamples(["a", "b", "c"], [RESPONSES, ["1", "2", "3", "1"], ["5"] * 10])
    rewards = [[0.0] * 10, [0.0, 0.0, 0.0, 1.0], [0.0] * 10]
    pairs, stats = synthetic_preferences(samples, rewards, gamma=0.5)
    # a: kept (0.5); b: confidence 2/4 = 0.5, kept, y_w = the "1" with reward 1 (index 3);
    # c: unanimous, dropped. kept = 2/3; mean confidence (0.5 + 0.5 + 1.0) / 3.
    assert [p.prompt for p in pairs] == ["a", "b"]
    assert pairs[1].chosen == "1" and pairs[1].rejected in {"2", "3"}
    assert stats["kept"] == pytest.approx(2 / 3)
    assert stats["confidence"] == pytest.approx(2 / 3)


def test_bt_loss_and_shaped_rewards_hand_worked():
    # r_w - r_l = 0 -> log 2; = 2 -> log(1 + e^-2).
    loss = bt_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-2))) / 2)
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.5, 1.0, 7.0], [2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # -0.1 * kl on response tokens; the score lands on each row's last response token.
    expected = torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.2 + 2.0, 0.0, 0.0]])
    torch.testing.assert_close(shaped_rewards(scores, kl, mask, 0.1), expected)


@pytest.fixture(scope="module")
def tiny():
    return tiny_preset()


def test_multiview_data_uses_two_different_responses(tiny):
    cfg, tok, _ = tiny
    samples = PolicySamples(["1+1=", "2+2=", "3+3="], [["2", "2", "3"], ["4", "5", "4"], ["6", "6", "6"]])
    views = MultiViewData(tok, samples, cfg.data, seed=0)
    texts = [
        (tok.decode(a[:-1]), tok.decode(b[:-1])) for a, b in zip(views.view1.responses, views.view2.responses)
    ]
    assert {frozenset(t) for t in texts[:2]} == {frozenset({"2", "3"}), frozenset({"4", "5"})}
    assert texts[2] == ("6", "6")  # no second distinct response: the same text twice


def test_uml_loss_reaches_encoder_and_backbone(tiny):
    cfg, tok, policy = tiny
    rm = ScalarHeadModel.from_causal_lm(policy)
    rm.encoder = GaussianEncoder(rm.head.in_features, 4)
    samples = PolicySamples(["1+1=", "2+2=", "3+3="], [["2", "3"], ["4", "5"], ["6", "7"]])
    loss, metrics = ib_aux_loss(rm, MultiViewData(tok, samples, cfg.data), 3, beta=1.0, lam=0.5, seed=0).loss(
        0, rm
    )
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) == {"ib_loss", "mi", "skl", "ib_beta", "mu_std", "mu_norm"}
    assert rm.encoder.mu[0].weight.grad.abs().sum() > 0
    assert next(rm.backbone.parameters()).grad is not None


def test_ppo_update_lowers_its_loss_on_a_fixed_batch(tiny):
    cfg, tok, policy = tiny
    cfg.ppo.lr = 3e-3
    rm = ScalarHeadModel.from_causal_lm(policy)
    state = init_ppo(policy, rm, tok, cfg.ppo, cfg.data, seed=0)
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(4)]
    tp = Throughput()
    batch = sample(state.actor, tok, prompts, cfg.ppo, cfg.data).batch
    exp = make_experience(state, batch, tp)
    everything = torch.arange(len(batch))
    before, _ = ppo_losses(state, exp, everything)
    for _ in range(4):
        metrics = train_on_experience(state, exp, tp)
    after, _ = ppo_losses(state, exp, everything)
    assert after.item() < before.item() - 1e-3
    assert set(metrics) >= {"loss", "pg_loss", "vf_loss", "pg_clipfrac", "approx_kl", "grad_norm"}
    # The reference and the reward model stay frozen; the actor moved.
    assert not any(p.requires_grad for p in state.ref.parameters())
    moved = any((a - b).abs().max() > 0 for a, b in zip(state.actor.parameters(), policy.parameters()))
    assert moved


def test_tis_weights_truncate_the_trainer_over_generator_ratio():
    torch.manual_seed(3)
    trainer, gen = torch.randn(4, 7) - 2.0, torch.randn(4, 7) - 2.0
    mask = (torch.rand(4, 7) > 0.3).float()
    got = ops.truncated_is_weights(trainer, gen, mask, cap=1.5)
    want = torch.minimum((trainer.double() - gen.double()).exp(), torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(got.double(), want * mask, rtol=1e-6, atol=1e-7)
    assert got.max() <= 1.5 and (got[mask == 0] == 0).all()


def test_ppo_policy_loss_is_weighted_by_the_generators_tis_weights(tiny):
    """Generator log-probs lower than the trainer's by log 3 on every token give weights min(3, cap)
    on every token: with token-mean aggregation the policy loss scales by exactly that factor."""
    cfg, tok, policy = tiny
    rm = ScalarHeadModel.from_causal_lm(policy)
    state = init_ppo(policy, rm, tok, dataclasses.replace(cfg.ppo), cfg.data, seed=0)  # a copy: edited below
    prompts = [f"{a}+{b}=" for a in range(3) for b in range(3)]
    tp = Throughput()
    s = sample(state.actor, tok, prompts, cfg.ppo, cfg.data)
    plain = make_experience(state, s.batch, tp)
    assert plain.is_weights is None
    everything = torch.arange(len(s.batch))
    _, m0 = ppo_losses(state, plain, everything)
    for cap in (2.0, 5.0):
        state.cfg.tis_cap = cap
        shifted = make_experience(state, s.batch, tp, plain.old_logprobs - math.log(3.0))
        torch.testing.assert_close(shifted.is_weights, min(3.0, cap) * s.batch.response_mask)
        _, m1 = ppo_losses(state, shifted, everything)
        torch.testing.assert_close(m1["pg_loss"], min(3.0, cap) * m0["pg_loss"], rtol=1e-5, atol=1e-7)
    state.cfg.tis_cap = 0.0  # off: no weights even with generator log-probs
    assert make_experience(state, s.batch, tp, plain.old_logprobs - 1.0).is_weights is None
