"""The arena's reward-model ensembles (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization"): PPO from the SFT policy against K reward models combined by algos.ensemble's
objectives, and (rlp_ens) RLP-SPG refinement of every member before PPO against their mean.

Stages, run in this order when named in run.stages (each checkpointed and resumable):
- rm_ens_m<i>, i < ensemble.k (the first of ens_mean / ens_wco / ens_uwo / rlp_ens trains them, the
  others reuse them): member i trained like rm (cfg.rm) from the SFT policy, seed run.seed +
  ensemble.seed_offset + i (head init and batch order; with ensemble.bootstrap also its resample of
  D); its standardisation (mean, std of its scores over D's responses) is kept with its weights;
- ppo_ens_<objective>: PPO (cfg.ppo) whose reward is the objective over the standardised members
  (reward_fn), its critic initialised from member 0; reported as "ppo_ens_<objective>", its proxy
  reward under rms["rm_ens_<objective>"] (an algos.ensemble.EnsembleScorer);
- rlp_ens: sample_ens (P from the ppo_ens_mean policy), rm_ens_spg_m<i> (RLP-SPG of member i: pairs
  from P ranked by member i, Bradley-Terry on D + them from the SFT policy), ppo_rlp_ens (PPO against
  the refined members' mean); reported as "rlp_ens", proxy rms["rm_rlp_ens"].
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlp_engine.algos.ensemble import EnsembleScorer, standardisation
from rlp_engine.algos.reward import preference_accuracy, score_texts
from rlp_engine.pipeline.blocks import ppo_stage, reward_model, sample_stage, spg_stage
from rlp_engine.recipes.reward import train_reward_model
from rlp_engine.recipes.scaffold import Optim

if TYPE_CHECKING:
    from rlp_engine.pipeline.run import Run


def _shared(run: Run) -> dict:
    """The members (and the ens_mean policy) the run's first ensemble stage made, for the others."""
    return run.shared.setdefault("ensemble", {})


def bootstrap_resample(pairs: list, seed: int) -> list:
    """len(pairs) pairs drawn from `pairs` with replacement (random.Random(seed))."""
    rng = random.Random(seed)
    return [pairs[rng.randrange(len(pairs))] for _ in pairs]


def _normaliser(run: Run, rm, tokenizer, pairs: list) -> tuple[float, float]:
    """(shift, scale) of `rm` over the responses of `pairs` (ensemble.normalize; else (0, 1))."""
    if not run.cfg.ensemble.normalize:
        return 0.0, 1.0
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    scores = score_texts(rm, tokenizer, prompts, responses, run.cfg.data, run.cfg.eval.batch_size)
    shift, scale = standardisation(scores[None].double())
    return float(shift[0]), float(scale[0])


def _member_stage(run: Run, data, tokenizer, policy, i: int) -> tuple[torch.nn.Module, dict]:
    """Stage rm_ens_m<i>: member i from the SFT `policy` (module docstring) -> (model, stats)."""
    cfg, e = run.cfg, run.cfg.ensemble
    seed = cfg.run.seed + e.seed_offset + i
    with run.stage(f"rm_ens_m{i}") as st:
        with torch.random.fork_rng(devices=[]):  # the head's init from the member's seed, global RNG kept
            torch.manual_seed(seed)
            rm = reward_model(policy, run.device)
        stats = None
        if not st.done:
            pairs = bootstrap_resample(data.preferences, seed) if e.bootstrap else data.preferences
            r = cfg.rm
            opt = Optim(r.steps, r.batch_size, r.lr, r.weight_decay, r.max_grad_norm)
            last = train_reward_model(rm, tokenizer, pairs, opt, cfg.data, run.context(st, seed=seed))
            shift, scale = _normaliser(run, rm, tokenizer, data.preferences)
            stats = {"seed": seed, "shift": shift, "scale": scale, "train_acc": last.get("acc")}
            stats["distinct_pairs"] = len({id(p) for p in pairs})
            if run.heldout_pairs:  # the member alone, beside the ensemble's rows in the report
                stats["heldout_acc"] = preference_accuracy(rm, tokenizer, run.heldout_pairs, cfg.data)
        rm.eval().requires_grad_(False)
        out = st.keep({"rm": rm}, {"stats": stats}, rm, tokenizer)
    return rm, out["stats"]


def _scorer(members: list, stats: list[dict], objective: str, uwo_lambda: float) -> EnsembleScorer:
    """The objective over `members`, standardised by their stats' shift and scale, on their device."""
    shift = [s["shift"] for s in stats]
    scale = [s["scale"] for s in stats]
    device = next(members[0].parameters()).device
    return EnsembleScorer(members, shift, scale, objective, uwo_lambda).to(device)


def ensemble(run: Run, data, tokenizer, policy, info: dict) -> tuple[list, list[dict]]:
    """(members, their stats): trained in stages rm_ens_m<i> by the first caller of a run."""
    cache = _shared(run)
    if "members" not in cache:
        built = [_member_stage(run, data, tokenizer, policy, i) for i in range(run.cfg.ensemble.k)]
        cache["members"], cache["stats"] = [m for m, _ in built], [s for _, s in built]
        e = run.cfg.ensemble
        info["ensemble"] = {
            "k": e.k,
            "bootstrap": e.bootstrap,
            "normalize": e.normalize,
            "uwo_lambda": e.uwo_lambda,
            "members": cache["stats"],
        }
    return cache["members"], cache["stats"]


def _ppo_against(run: Run, name: str, policy, scorer: EnsembleScorer, tokenizer, prompts):
    """PPO stage `name` against `scorer` (its critic from member 0) -> the trained actor."""

    def reward_fn(ps: list[str], rs: list[str]) -> torch.Tensor:
        return score_texts(scorer, tokenizer, ps, rs, run.cfg.data, run.cfg.eval.batch_size)

    return ppo_stage(run, name, policy, scorer.members[0], tokenizer, prompts, reward_fn)


def _objective_stage(objective: str) -> Callable:
    """The arena stage ens_<objective>: members (once per run), then PPO against their objective."""

    def stage(run: Run, data, tokenizer, policy, rms: dict, info: dict) -> dict:
        members, stats = ensemble(run, data, tokenizer, policy, info)
        scorer = _scorer(members, stats, objective, run.cfg.ensemble.uwo_lambda)
        rms[f"rm_ens_{objective}"] = scorer
        name = f"ppo_ens_{objective}"
        actor = _ppo_against(run, name, policy, scorer, tokenizer, data.prompts)
        if objective == "mean":
            _shared(run)["ppo_ens_mean"] = actor
        return {name: actor}

    return stage


def _refined_member(run: Run, data, tokenizer, policy, member, samples, i: int):
    """Stage rm_ens_spg_m<i>: RLP-SPG of member i (P ranked by it; BT on D + the synthetic pairs
    from the SFT policy, seed as member i's) -> (model, stats with its standardisation)."""
    seed = run.cfg.run.seed + run.cfg.ensemble.seed_offset + i

    def describe(rm) -> dict:
        shift, scale = _normaliser(run, rm, tokenizer, data.preferences)
        return {"seed": seed, "shift": shift, "scale": scale}

    rm, _, stats = spg_stage(
        run, f"rm_ens_spg_m{i}", data, tokenizer, policy, member, samples, seed=seed, describe=describe
    )
    return rm, stats


def rlp_ens_stage(run: Run, data, tokenizer, policy, rms: dict, info: dict) -> dict:
    """The arena stage rlp_ens: P from the ens_mean policy (trained first when ens_mean was not
    named), every member refined by RLP-SPG, PPO against the refined members' mean."""
    cache = _shared(run)
    out = {}
    if "ppo_ens_mean" not in cache:  # ens_mean not named: its policy is trained (and reported) here
        out.update(_objective_stage("mean")(run, data, tokenizer, policy, rms, info))
    members, _ = ensemble(run, data, tokenizer, policy, info)
    samples = sample_stage(run, "sample_ens", cache["ppo_ens_mean"], tokenizer, data.prompts)
    refined = [_refined_member(run, data, tokenizer, policy, m, samples, i) for i, m in enumerate(members)]
    info["ensemble_spg"] = [s for _, s in refined]
    scorer = _scorer([m for m, _ in refined], [s for _, s in refined], "mean", 0.0)
    rms["rm_rlp_ens"] = scorer
    out["rlp_ens"] = _ppo_against(run, "ppo_rlp_ens", policy, scorer, tokenizer, data.prompts)
    return out


# arena stage name -> stage function (pipeline/arena.py adds them to METHODS, in this order)
ENSEMBLE_METHODS: dict[str, Callable] = {
    "ens_mean": _objective_stage("mean"),
    "ens_wco": _objective_stage("wco"),
    "ens_uwo": _objective_stage("uwo"),
    "rlp_ens": rlp_ens_stage,
}
