"""Reward-model ensembles in the pipeline (pipeline/ensemble.py): PPO raises its own ensemble
objective on a fixed batch; the tiny run of the stages ens_mean, ens_wco, ens_uwo reports the three
policies under their ensemble scorers; a run failed between stages resumes to the same report and
weights (the members and their standardisation reloaded from their stages)."""

import hashlib
import json

import pytest
import torch
from fault_runner import fail_at

from rlp_engine.algos.ensemble import EnsembleScorer
from rlp_engine.algos.reward import score_texts
from rlp_engine.cli import main
from rlp_engine.config import load_config
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import Throughput
from rlp_engine.models import ScalarHeadModel, tiny_llama, train_byte_tokenizer
from rlp_engine.models.policy import response_logprobs
from rlp_engine.pipeline.ensemble import bootstrap_resample
from rlp_engine.pipeline.evaluate import proxy_of
from rlp_engine.recipes.ppo import init_ppo, make_experience, train_on_experience

ARGS = ["--preset", "tiny", "run.threads=1", "run.tensorboard=false", "run.stages=ens_mean,ens_wco,ens_uwo"]
POLICIES = ("ppo_ens_mean", "ppo_ens_wco", "ppo_ens_uwo")


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
def test_ppo_raises_its_ensemble_objective_on_a_fixed_batch(objective):
    """After PPO epochs on one rollout scored by the ensemble (no KL term), the updated policy
    reweights that rollout towards high objective: the self-normalised importance-weighted mean of
    the scores, weights pi_new / pi_old of each response, exceeds the rollout's plain mean."""
    cfg = load_config(preset="tiny")
    cfg.ppo.lr, cfg.ppo.kl_coef = 3e-3, 0.0
    tok = train_byte_tokenizer(["0123456789+="])
    torch.manual_seed(0)
    policy = tiny_llama(cfg.model, tok)
    members = []
    for seed in range(3):
        torch.manual_seed(10 + seed)
        members.append(ScalarHeadModel.from_causal_lm(policy).eval().requires_grad_(False))
    scorer = EnsembleScorer(members, torch.randn(3), torch.rand(3) + 0.5, objective, uwo_lambda=1.0)
    state = init_ppo(policy, members[0], tok, cfg.ppo, cfg.data, seed=0)
    state.reward_fn = lambda ps, rs: score_texts(scorer, tok, ps, rs, cfg.data)
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(4)]
    s = sample(state.actor, tok, prompts, cfg.ppo, cfg.data)
    b, tp = s.batch, Throughput()
    exp = make_experience(state, b, tp, texts=(s.prompts, s.responses))
    # the reward PPO saw is the objective over the members (re-tokenised texts, as score_texts does)
    torch.testing.assert_close(exp.scores, state.reward_fn(s.prompts, s.responses))

    def seq_logprob():
        with torch.no_grad():
            lp = response_logprobs(state.actor, b.input_ids, b.attention_mask, b.response_len)
        return (lp * b.response_mask).sum(-1)

    before = seq_logprob()
    for _ in range(4):
        train_on_experience(state, exp, tp)
    weights = torch.softmax(seq_logprob() - before, 0)
    plain, reweighted = exp.scores.mean().item(), (weights * exp.scores).sum().item()
    assert reweighted > plain + 0.1 * exp.scores.std().item()


def test_bootstrap_resample_draws_with_replacement_reproducibly():
    pairs = list(range(50))
    a, b = bootstrap_resample(pairs, 3), bootstrap_resample(pairs, 3)
    assert a == b and len(a) == 50 and set(a) <= set(pairs)
    assert len(set(a)) < 50  # with replacement: P(no repeat in 50 draws of 50) ~ 1e-21
    assert bootstrap_resample(pairs, 4) != a


def test_proxy_of_names_the_ensemble_scorers():
    assert proxy_of("ppo_ens_wco") == "rm_ens_wco" and proxy_of("rlp_ens") == "rm_rlp_ens"
    assert proxy_of("ppo") == "rm" and proxy_of("rlp_spg_r2") == "rm_spg_r2"


def _outcome(out):
    weights = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((out / "checkpoints").rglob("*"))
        if p.suffix in (".safetensors", ".pt")
    }
    report = json.loads((out / "report.json").read_text())
    return weights, {k: report[k] for k in ("policies", "reward_models", "ensemble")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    assert main(["train", *ARGS, "--output-dir", str(out)]) == 0
    return out


def test_tiny_run_reports_the_ensemble_policies(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    assert set(POLICIES) <= set(report["policies"])
    k = load_config(preset="tiny").ensemble.k
    assert [m["seed"] for m in report["ensemble"]["members"]] == [1000 + i for i in range(k)]
    stages = list(report["stage_seconds"])
    assert stages[stages.index("ppo") + 1 :] == [f"rm_ens_m{i}" for i in range(k)] + [*POLICIES, "eval"]
    for name in POLICIES:
        row = report["policies"][name]
        # proxy reward: the policy's own ensemble objective
        assert row["proxy_reward"] == row["proxy_reward_by_rm"][proxy_of(name)]
    by_rm = report["policies"]["sft"]["proxy_reward_by_rm"]
    # per response min <= mean and mean - lambda * var <= mean, so also on average
    assert by_rm["rm_ens_wco"] <= by_rm["rm_ens_mean"] and by_rm["rm_ens_uwo"] <= by_rm["rm_ens_mean"]
    assert "PPO (RM ensemble: WCO)" in (tiny_run / "report.md").read_text()


def test_failed_run_resumes_to_the_same_weights_and_report(tiny_run, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        main(["train", *ARGS, "--output-dir", str(out)], hook=fail_at("ppo_ens_wco"))
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert _outcome(out) == _outcome(tiny_run)


def test_rlp_ens_alone_trains_the_mean_policy_it_samples_from(tmp_path):
    args = ["--preset", "tiny", "run.threads=1", "run.tensorboard=false", "run.stages=rlp_ens"]
    assert main(["train", *args, "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"ppo_ens_mean", "rlp_ens"} <= set(report["policies"])
    assert set(report["reward_models"]) == {"rm", "rm_ens_mean", "rm_rlp_ens"}
    k = load_config(preset="tiny").ensemble.k
    stages = list(report["stage_seconds"])
    refined = [f"rm_ens_spg_m{i}" for i in range(k)]
    assert stages[stages.index("ppo_ens_mean") + 1 :] == ["sample_ens", *refined, "ppo_rlp_ens", "eval"]
    assert len(report["ensemble_spg"]) == k
    row = report["policies"]["rlp_ens"]
    assert row["proxy_reward"] == row["proxy_reward_by_rm"]["rm_rlp_ens"]
