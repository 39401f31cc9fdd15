"""The arena: the seed papers' other RLHF methods on the same gold testbed, each from the same SFT
policy and the same preference data D (or the same proxy reward model) as PPO and RLP, so that one
report compares them all. Selected by name in run.stages (or all at once with run.stages=arena);
`run.stages=all` (the default) runs the RLP pipeline alone.

Each method is one entry of METHODS: stage name -> function(run, data, tokenizer, policy, rms, info)
that trains inside `run.stage(...)` (checkpointed and resumable like every stage) and returns the
policies it made, keyed by report name. Engineers adding a method add its function and entry here
and its recipe under rlp_engine/recipes (see ARCHITECTURE.md, "Adding an algorithm").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlp_engine.engine.distributed import rank_and_world
from rlp_engine.pipeline.blocks import policy_stage
from rlp_engine.pipeline.curves import curve_context
from rlp_engine.pipeline.ensemble import ENSEMBLE_METHODS
from rlp_engine.recipes.grpo import grpo
from rlp_engine.recipes.preference import preference_optimize

if TYPE_CHECKING:
    from rlp_engine.pipeline.run import Run

# stage name -> function(run, data, tokenizer, policy, rms, info) -> {policy name: model}
METHODS: dict[str, Callable] = {}


def _offline_stage(method: str) -> Callable:
    """The stage `method` ("dpo", "ipo", "simpo"): recipes.preference on D from the SFT `policy`;
    its policy is reported under the method's name (a finished stage: a copy of `policy` holding its
    saved weights)."""

    def stage(run: Run, data, tokenizer, policy, rms: dict, info: dict) -> dict:
        def train(st):
            cfg, ctx = run.cfg, curve_context(run, st, "policy")
            return preference_optimize(
                policy, tokenizer, data.preferences, method, cfg.offline, cfg.data, ctx
            )

        model = policy_stage(run, method, policy, tokenizer, train, key="policy")
        return {method: model.eval()}

    return stage


METHODS.update({m: _offline_stage(m) for m in ("dpo", "ipo", "simpo")})


def _online_stage(estimator: str, name: str | None = None, rm: str = "rm") -> Callable:
    """The stage `name` (default: `estimator`, "grpo" or "rloo"): recipes.grpo from the SFT `policy`
    against the reward model rms[rm] (the proxy RM; "rm_spg": RLP-SPG's refined one) on
    data.prompts (PPO's prompts), cfg.grpo; its policy is reported under the stage's name (a finished
    stage: a copy of `policy` holding its saved actor)."""
    name = name or estimator

    def stage(run: Run, data, tokenizer, policy, rms: dict, info: dict) -> dict:
        def train(st):
            cfg = run.cfg
            # the rollouts' sampling noise, as PPO's stage: same weights on every rank, own noise
            torch.manual_seed(cfg.run.seed + rank_and_world()[0])
            return grpo(
                policy,
                rms[rm],
                tokenizer,
                data.prompts,
                cfg.grpo,
                cfg.data,
                curve_context(run, st, "actor", log_every=1),  # few, costly iterations: every one logged
                estimator=estimator,
                gold=run.gold,
                rollout_backend=cfg.rollout.backend,
                model_path=cfg.model.path,
            )

        actor = policy_stage(run, name, policy, tokenizer, train)
        return {name: actor.eval()}

    return stage


METHODS.update({m: _online_stage(m) for m in ("grpo", "rloo")})
# PPO against reward-model ensembles (mean, WCO, UWO) and RLP-SPG on every member (pipeline/ensemble.py)
METHODS.update(ENSEMBLE_METHODS)
# RLP composed with a critic-free method: GRPO against RLP-SPG's refined reward model (last, so that
# adding it moved no other stage's RNG draws)
METHODS["grpo_spg"] = _online_stage("grpo", "grpo_spg", rm="rm_spg")
# the RLP pipeline's stages (pipeline/stages.py STAGES) an arena method needs: run.stages adds them
REQUIRES: dict[str, set[str]] = {"grpo_spg": {"spg"}}


def arena_stage_names() -> tuple[str, ...]:
    return tuple(METHODS)


def run_arena(run: Run, data, tokenizer, policy, stages: set, policies: dict, rms: dict, info: dict) -> None:
    """Every arena method named in `stages`, in METHODS order, into `policies` (and `rms`, `info`)."""
    for name, method in METHODS.items():
        if name in stages:
            policies.update(method(run, data, tokenizer, policy, rms, info))
