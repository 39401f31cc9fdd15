"""The building blocks every pipeline stage is made of (the RLP stages in pipeline/stages.py, the
arena's in pipeline/arena.py and pipeline/ensemble.py): a policy-training stage, PPO's stage, the
set P of policy samples, RLP-SPG's reward model, the reward-model template a finished stage loads
into. Each runs inside `run.stage(name)` (pipeline/run.py: timing, checkpoint, resume).

Kept apart from stages.py so that the arena's modules import them at the top: stages.py imports the
arena (to run its methods), so the arena cannot import stages.py."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlp_engine.data.build import TaskData
from rlp_engine.engine.distributed import rank_and_world
from rlp_engine.models.heads import GaussianEncoder, ScalarHeadModel
from rlp_engine.pipeline.curves import curve_context
from rlp_engine.recipes.ppo import ppo
from rlp_engine.recipes.rlp import rlp_spg, sample_policy

if TYPE_CHECKING:
    from rlp_engine.pipeline.run import Run, Stage


def reward_model(policy, device, latent_dim: int | None = None) -> ScalarHeadModel:
    """A reward model shaped like the pipeline's (SFT backbone + head, UML encoder when latent_dim):
    the template a finished stage's saved weights load into on resume."""
    rm = ScalarHeadModel.from_causal_lm(policy)
    if latent_dim is not None:
        rm.encoder = GaussianEncoder(rm.head.in_features, latent_dim)
    return rm.to(device)


def policy_stage(
    run: Run, name: str, policy, tokenizer, train: Callable[[Stage], torch.nn.Module], key: str = "actor"
):
    """Stage `name`: `train(stage)` -> the trained policy (called only when the stage has not finished;
    a finished stage gives a copy of `policy` holding its saved weights), kept as the stage's
    artifact `key` and exported under checkpoints/<name>."""
    with run.stage(name) as st:
        model = copy.deepcopy(policy) if st.done else train(st)
        st.keep({key: model}, export=model, tokenizer=tokenizer)
    return model


def ppo_stage(run: Run, name: str, policy, reward_model, tokenizer, prompts: list[str], reward_fn=None):
    """The PPO stage `name` from the SFT `policy` against `reward_model` (or `reward_fn`, see `ppo`);
    returns the trained actor."""

    def train(st):
        cfg = run.cfg
        # the rollouts' sampling noise: the same weights on every rank (copied), different noise
        torch.manual_seed(cfg.run.seed + rank_and_world()[0])
        return ppo(
            policy,
            reward_model,
            tokenizer,
            prompts,
            cfg.ppo,
            cfg.data,
            curve_context(run, st, "actor", log_every=1),  # PPO's few, costly iterations: all logged
            gold=run.gold,
            reward_fn=reward_fn,
            rollout_backend=cfg.rollout.backend,
            model_path=cfg.model.path,
        )

    return policy_stage(run, name, policy, tokenizer, train)


def equivalence(name: str, data: TaskData):
    """spg.equivalence "answer": the task's own answer(response) (each response without one is its
    own cluster); other names are rlp_spg's built-in keys."""
    if name != "answer":
        return name
    if data.task is None:
        return "exact"

    def key(response: str, index: int):
        answer = data.task.answer(response)
        return ("answer", answer) if answer is not None else ("none", index)

    return key


def sample_stage(run: Run, name: str, policy, tokenizer, prompts: list[str]):
    """Stage `name`: the set P, sample.n responses of `policy` to each of the first
    sample.num_prompts prompts (a finished stage: its saved samples)."""
    cfg = run.cfg
    with run.stage(name) as st:
        samples = None
        if not st.done:
            samples = sample_policy(
                policy,
                tokenizer,
                prompts[: cfg.sample.num_prompts],
                cfg.sample,
                cfg.data,
                run.throughput,
                show_progress=cfg.run.progress,
            )
        return st.keep({}, {"samples": samples})["samples"]


def spg_stage(
    run: Run,
    name: str,
    data: TaskData,
    tokenizer,
    policy,
    ranker,
    samples,
    *,
    seed: int | None = None,
    describe: Callable[[torch.nn.Module], dict] | None = None,
):
    """Stage `name`: RLP-SPG's reward model from the SFT `policy` on D + synthetic pairs from
    `samples` (y_w ranked by `ranker`). Returns (reward model, synthetic pairs, statistics).

    seed: None trains on the run's RNG stream and seed; an int (an ensemble member's) trains from
    that seed, leaving the global RNG as it was. describe(rm) -> more statistics of the trained model
    (an ensemble member's standardisation), kept with the stage's results for resume."""
    cfg = run.cfg
    with run.stage(name) as st:
        synthetic, stats = [], None
        if st.done:
            rm = reward_model(policy, run.device).eval()
        else:
            ctx = run.context(st) if seed is None else run.context(st, seed=seed)
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                rm, synthetic, stats = rlp_spg(
                    policy,
                    ranker,
                    tokenizer,
                    data.preferences,
                    samples,
                    cfg.spg,
                    cfg.data,
                    equivalence=equivalence(cfg.spg.equivalence, data),
                    ctx=ctx,
                )
            stats = dict(stats or {})
            if data.gold is not None and synthetic:
                g = [(data.gold(p.prompt, p.chosen), data.gold(p.prompt, p.rejected)) for p in synthetic]
                stats["synthetic_pair_gold_acc"] = sum(w > lo for w, lo in g) / len(g)
                stats["synthetic_pair_gold_ties"] = sum(w == lo for w, lo in g) / len(g)
            if describe is not None:
                stats.update(describe(rm))
        rm.requires_grad_(False)
        out = st.keep({"rm": rm}, {"stats": stats, "synthetic": synthetic}, rm, tokenizer)
    return rm, out["synthetic"], out["stats"]
