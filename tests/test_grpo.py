"""GRPO and RLOO (algos/grpo.py, recipes/grpo.py, the arena stages): group advantages and the loss
against float64 references written out here and hand-worked values, an update that lowers its loss on
a fixed batch, a short run that raises the mean proxy score, and the tiny pipeline with both stages."""

import dataclasses
import json
import math

import pytest
import torch
from tiny import tiny_preset

from rlp_engine.algos.grpo import group_index, grpo_loss, outcome_advantages
from rlp_engine.config import load_config
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import Throughput
from rlp_engine.models import ScalarHeadModel
from rlp_engine.recipes.grpo import grpo, grpo_losses, init_grpo, make_group_experience, train_on_groups
from rlp_engine.recipes.scaffold import TrainContext


def _mask(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def _adv_ref(scores, n, estimator, norm_by_std, eps=1e-6):
    """float64, one group at a time, from the definitions."""
    out = []
    for g in scores.double().view(-1, n):
        mean = g.mean()
        if estimator == "rloo":
            out.append(torch.stack([g[i] - (g.sum() - g[i]) / (n - 1) for i in range(n)]))
        elif norm_by_std:
            out.append((g - mean) / (g.std(unbiased=True) + eps))
        else:
            out.append(g - mean)
    return torch.cat(out)


@pytest.mark.parametrize("estimator,norm", [("grpo", True), ("grpo", False), ("rloo", True)])
@pytest.mark.parametrize("groups,n,T", [(3, 4, 5), (1, 2, 1), (5, 3, 7)])
def test_outcome_advantages_match_float64(estimator, norm, groups, n, T):
    torch.manual_seed(groups * 10 + n)
    scores = torch.randn(groups * n) * 3 + 1
    mask = _mask(groups * n, T, seed=n)
    got = outcome_advantages(scores, mask, n, estimator=estimator, norm_by_std=norm)
    want = _adv_ref(scores, n, estimator, norm)[:, None] * mask.double()
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_outcome_advantages_hand_worked():
    scores = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])  # groups (1, 2, 6) and (5, 5, 5)
    mask = torch.ones(6, 2)
    # group 1: mean 3, unbiased std sqrt(7); RLOO: 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(
        outcome_advantages(scores, mask, 3, norm_by_std=False)[:, 0], torch.tensor([-2.0, -1, 3, 0, 0, 0])
    )
    s7 = math.sqrt(7) + 1e-6
    torch.testing.assert_close(
        outcome_advantages(scores, mask, 3)[:, 1], torch.tensor([-2 / s7, -1 / s7, 3 / s7, 0, 0, 0])
    )
    torch.testing.assert_close(
        outcome_advantages(scores, mask, 3, estimator="rloo")[:, 0], torch.tensor([-3.0, -1.5, 4.5, 0, 0, 0])
    )


def test_group_index_and_bad_input():
    assert group_index(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="group_size"):
        group_index(7, 3)
    with pytest.raises(ValueError, match="group_size"):
        group_index(4, 0)
    with pytest.raises(ValueError, match="estimator"):
        outcome_advantages(torch.randn(4), torch.ones(4, 2), 2, estimator="ppo")
    with pytest.raises(ValueError, match="kl_coef"):
        x = torch.randn(2, 3)
        grpo_loss(x, x, x, x, torch.ones(2, 3), clip=0.2, kl_coef=-1.0)


def _loss_ref(lp, old, ref, adv, mask, clip, beta):
    """float64 token-mean of max(-A r, -A clip(r)) + beta * (exp(ref - lp) - (ref - lp) - 1)."""
    ratio = (lp - old).exp()
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    d = ref - lp
    kl = d.exp() - d - 1
    return ((pg + beta * kl) * mask).sum() / mask.sum()


@pytest.mark.parametrize("B,T,beta", [(6, 5, 0.05), (3, 1, 0.0), (8, 11, 1.0)])
def test_grpo_loss_and_gradient_match_float64(B, T, beta):
    torch.manual_seed(B * T)
    lp = (torch.randn(B, T) * 0.5 - 1.5).requires_grad_(True)
    old = lp.detach() + torch.randn(B, T) * 0.3  # ratios on both sides of the clip range
    ref = lp.detach() + torch.randn(B, T) * 0.5
    adv = torch.randn(B)[:, None].expand(B, T).contiguous()
    mask = _mask(B, T, seed=B)
    loss, m = grpo_loss(lp, old, ref, adv, mask, clip=0.2, kl_coef=beta, kl_kind="k3")
    loss.backward()
    lp64 = lp.detach().double().requires_grad_(True)
    want = _loss_ref(lp64, old.double(), ref.double(), adv.double(), mask.double(), 0.2, beta)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)
    assert set(m) == {"pg_loss", "kl_loss", "pg_clipfrac", "approx_kl"}
    assert 0 < float(m["pg_clipfrac"]) < 1 or T == 1


def test_grpo_loss_at_the_reference_is_minus_the_mean_advantage():
    """lp = old = ref: ratio 1, k3 = 0 with gradient 0, so loss = -token-mean(A) and d loss / d lp =
    -A / tokens, whatever kl_coef."""
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, m = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask, clip=0.2, kl_coef=0.5)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-(2.0 * 3 - 1.0) / 4))
    torch.testing.assert_close(float(m["kl_loss"]), 0.0)
    torch.testing.assert_close(lp.grad, -adv * mask / 4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_preset()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_update_lowers_its_loss_on_a_fixed_batch(tiny, estimator):
    cfg, tok, policy = tiny
    g = dataclasses.replace(cfg.grpo, lr=3e-3, n=4)
    rm = ScalarHeadModel.from_causal_lm(policy)
    state = init_grpo(policy, rm, tok, g, cfg.data, estimator=estimator, seed=0)
    prompts = [f"{a}+{b}=" for a in range(3) for b in range(2)]
    torch.manual_seed(1)
    batch = sample(state.actor, tok, prompts, g, cfg.data, n=g.n).batch
    exp = make_group_experience(state, batch, Throughput())
    assert exp.advantages.abs().sum() > 0
    everything = torch.arange(len(batch))
    before, _ = grpo_losses(state, exp, everything)
    for _ in range(4):
        metrics = train_on_groups(state, exp, Throughput())
    after, _ = grpo_losses(state, exp, everything)
    assert after.item() < before.item() - 1e-3
    assert set(metrics) >= {"loss", "pg_loss", "kl_loss", "pg_clipfrac", "approx_kl", "grad_norm"}
    assert not any(p.requires_grad for p in state.ref.parameters())
    # the SFT policy is untouched; the actor moved
    assert any((a - b).abs().max() > 0 for a, b in zip(state.actor.parameters(), policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state.ref.parameters(), policy.parameters()))


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_short_run_raises_the_mean_proxy_score(tiny, estimator):
    """A reward model that scores how often the digit "7" appears: 12 steps raise the mean
    score of fresh samples of the trained actor over the SFT policy's (same prompts, same seed)."""
    cfg, tok, policy = tiny
    g = dataclasses.replace(cfg.grpo, steps=12, prompts_per_step=6, n=4, mini_batch_size=12, epochs=2)
    g.lr = 1e-2
    seven = tok.convert_tokens_to_ids("7")

    class Sevens(torch.nn.Module):
        def score(self, ids, attn):
            return ((ids == seven) & attn.bool()).float().sum(-1)

    prompts = [f"{a}+{b}=" for a in range(4) for b in range(3)]

    def mean_sevens(model):
        torch.manual_seed(123)
        s = sample(model, tok, prompts, g, cfg.data, n=4)
        return Sevens().score(s.batch.input_ids, s.batch.attention_mask).mean().item()

    torch.manual_seed(0)
    ctx = TrainContext(stage=estimator, log_every=100)
    trained = grpo(policy, Sevens(), tok, prompts, g, cfg.data, ctx, estimator=estimator)
    before, after = mean_sevens(policy), mean_sevens(trained)
    assert after > before + 0.5, (before, after)


def test_grpo_spg_brings_the_rlp_spg_stages_and_only_them():
    from rlp_engine.pipeline.stages import stage_names

    cfg = load_config(preset="tiny", overrides=["run.stages=grpo_spg"])
    assert stage_names(cfg) == {"sft", "rm", "ppo", "spg", "grpo_spg"}
    assert "grpo_spg" in stage_names(load_config(preset="tiny", overrides=["run.stages=arena"]))


def test_tiny_pipeline_runs_both_stages(tmp_path):
    from rlp_engine.pipeline.run import run_pipeline

    # grpo_spg (GRPO against RLP-SPG's refined RM) brings the RLP-SPG stages it needs
    stages = "run.stages=grpo,rloo,grpo_spg"
    overrides = [f"run.output_dir={tmp_path}", stages, "run.tensorboard=false"]
    cfg = load_config(preset="tiny", overrides=overrides)
    report = run_pipeline(cfg)
    assert {"sft", "ppo", "grpo", "rloo", "rlp_spg", "grpo_spg"} <= set(report["policies"])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert list(saved["stage_seconds"])[-4:] == ["grpo", "rloo", "grpo_spg", "eval"]
    assert {"sample", "rm_spg", "ppo_spg"} <= set(saved["stage_seconds"])
    for name in ("grpo", "rloo", "grpo_spg"):
        assert saved["policies"][name]["proxy_reward"] is not None
        assert (tmp_path / "checkpoints" / name).is_dir()
    # each policy's proxy reward is under the reward model it was trained against
    rows = saved["policies"]
    assert rows["grpo_spg"]["proxy_reward"] == rows["grpo_spg"]["proxy_reward_by_rm"]["rm_spg"]
    assert rows["grpo"]["proxy_reward"] == rows["grpo"]["proxy_reward_by_rm"]["rm"]


@pytest.mark.slow  # three `rlp-engine train` subprocesses (~60 s on the shared 2-core machine)
def test_killed_rloo_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL inside the rloo stage after its step 3 (checkpoint at 2), `train --resume`: the same
    exported weights of both stages and the same metrics lines as an uninterrupted run."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    args = ["--preset", "tiny", "run.stages=grpo,rloo", "grpo.steps=4", "run.checkpoint_every=2"]
    args += ["run.tensorboard=false", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runner = str(Path(__file__).with_name("fault_runner.py"))

    def train(out, *pre, resume=False):
        cmd = [sys.executable, *pre, "train", "--output-dir", str(out), *(["--resume"] if resume else args)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    def outcome(out):
        weights = {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "checkpoints").rglob("*.safetensors"))
        }
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        lines = [r for r in lines if r.get("stage") == "rloo"]
        lines = [{k: v for k, v in r.items() if "seconds" not in k} for r in lines]
        return weights, lines

    base, killed = tmp_path / "base", tmp_path / "killed"
    assert train(base, "-m", "rlp_engine.cli").returncode == 0
    first = train(killed, runner, "--kill-at", "rloo:3", "--")
    assert first.returncode == -9, first.stderr[-2000:]
    second = train(killed, "-m", "rlp_engine.cli", resume=True)
    assert second.returncode == 0, second.stderr[-2000:]
    (w0, m0), (w1, m1) = outcome(base), outcome(killed)
    assert any("grpo" in k for k in w0) and any("rloo" in k for k in w0)
    assert w0 == w1
    assert m0 == m1 and len(m0) == 4
