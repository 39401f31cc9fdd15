"""The pipeline's stages (Algorithm 1 of RLP): SFT -> D from SFT samples -> reward model -> PPO
(and the oracle PPO) -> sample P -> RLP-UML / RLP-SPG reward models -> PPO, over rounds. Each stage is
an explicit call of a recipe inside `run.stage(name)` (pipeline/run.py: timing, checkpoint, resume)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from rlp_engine.config import ConfigError, TrainConfig
from rlp_engine.data.build import TaskData
from rlp_engine.data.task import annotate, label_pairs
from rlp_engine.engine.generate import sample
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.pipeline.arena import REQUIRES, arena_stage_names, run_arena
from rlp_engine.pipeline.blocks import ppo_stage, reward_model, sample_stage, spg_stage
from rlp_engine.recipes.reward import train_reward_model
from rlp_engine.recipes.rlp import rlp_uml
from rlp_engine.recipes.scaffold import Optim
from rlp_engine.recipes.sft import sft

if TYPE_CHECKING:
    from rlp_engine.pipeline.run import Run

STAGES = ("sft", "rm", "ppo", "oracle", "uml", "spg", "uml_spg")


def stage_names(cfg: TrainConfig) -> set[str]:
    """The stages run.stages selects: "all" (the RLP pipeline), "arena" (it and every arena method,
    pipeline/arena.py) or a comma-separated list of names (sft, rm and ppo always run, and the RLP
    stages an arena method needs: arena.REQUIRES)."""
    known = STAGES + arena_stage_names()
    if cfg.run.stages == "all":
        return set(STAGES)
    if cfg.run.stages == "arena":
        return set(known)
    chosen = {s.strip() for s in cfg.run.stages.split(",") if s.strip()}
    unknown = chosen - set(known)
    if unknown:
        raise ConfigError(
            f"run.stages: unknown stages {sorted(unknown)}; expected all, arena or a subset of {known}"
        )
    needed = set().union(*(REQUIRES.get(s, set()) for s in chosen))  # e.g. grpo_spg: RLP-SPG's RM
    return chosen | needed | {"sft", "rm", "ppo"}  # RLP refines the reward model of a PPO run


def _sample_pairs(run, policy, tokenizer, prompts: list[str], n: int) -> list[list[str]]:
    """`n` samples of `policy` per prompt (run.cfg.sample's temperature), grouped per prompt."""
    cfg = run.cfg
    s = sample(
        policy,
        tokenizer,
        prompts,
        cfg.sample,
        cfg.data,
        n=n,
        batch_size=cfg.eval.batch_size,
        show_progress=cfg.run.progress,
        desc=f"pref n={n}",
    )
    return [s.responses[i * n : (i + 1) * n] for i in range(len(prompts))]


def preference_sets(run, data: TaskData, tokenizer, policy):
    """(D, held-out pairs). D: data.pref_prompts' SFT-sample pairs labelled by the task's annotator
    with data.label_noise (None when D came from the task or JSONL). Held-out: pairs (0, 1), (2, 3)
    of 4 SFT samples per eval prompt, labelled by gold without noise, gold ties dropped (None
    without gold): the RM's accuracy on the distribution of D, on prompts it never saw."""
    cfg = run.cfg
    prefs = heldout = None
    if data.pref_prompts:
        groups = _sample_pairs(run, policy, tokenizer, data.pref_prompts, 2)
        prefs = label_pairs(
            data.task, data.pref_prompts, [tuple(g) for g in groups], cfg.data.label_noise, cfg.run.seed
        )
        dropped = len(data.pref_prompts) - len(prefs)
        run.say(f"D: {len(prefs)} labelled pairs of SFT samples ({dropped} identical dropped)")
        if not prefs:
            raise ConfigError("data.num_pref: every pair of SFT samples was identical; D is empty")
    if data.gold is not None:
        prompts = data.eval_prompts[: cfg.eval.num_prompts]
        groups = _sample_pairs(run, policy, tokenizer, prompts, 4)
        rng = random.Random(0)
        heldout = []
        for p, g in zip(prompts, groups):
            for a, b in ((g[0], g[1]), (g[2], g[3])):
                if data.gold(p, a) != data.gold(p, b):
                    heldout.append(annotate(data.gold, p, a, b, 0.0, rng))
    return prefs, heldout


def _round(k: int) -> str:
    """Name suffix of RLP round k: "" for the first, "_r2", "_r3", ... after."""
    return "" if k == 1 else f"_r{k}"


def _uml_stage(run: Run, name: str, policy, tokenizer, pairs, samples):
    """Stage `name`: RLP-UML's reward model from the SFT `policy` (Bradley-Terry on `pairs` + lam * L_M
    on P). Returns (reward model, held-out IB diagnostics): MI above -2 ln 2 = -1.386 and mu_std not
    tiny against mu_norm mean the bottleneck carries information (it collapsed at beta 1)."""
    cfg = run.cfg
    with run.stage(name) as st:
        diag = None
        if st.done:
            rm = reward_model(policy, run.device, cfg.uml.latent_dim).eval()
        else:
            rm, diag = rlp_uml(policy, tokenizer, pairs, samples, cfg.uml, cfg.data, run.context(st))
        rm.requires_grad_(False)
        return rm, st.keep({"rm": rm}, {"heldout": diag}, rm, tokenizer)["heldout"]


def _sft_pref_rm(run: Run, data: TaskData, tokenizer, policy) -> ScalarHeadModel:
    """Stages sft (trains `policy` in place), pref (D from its samples, and the held-out pairs) and
    rm; returns the reward model."""
    cfg = run.cfg
    with run.stage("sft") as st:
        if not st.done:
            sft(policy, tokenizer, data.sft, cfg.sft, cfg.data, run.context(st))
        policy.eval()
        st.keep({"policy": policy}, export=policy, tokenizer=tokenizer)
    with run.stage("pref") as st:
        # AlpacaFarm's D: two samples of the SFT policy per prompt, labelled by the simulated annotator;
        # and, for the held-out RM accuracy, gold-labelled pairs of SFT samples on the eval prompts
        prefs = heldout = None
        if not st.done:
            prefs, heldout = preference_sets(run, data, tokenizer, policy)
        got = st.keep({}, {"preferences": prefs, "heldout": heldout})
        if got["preferences"] is not None:
            data.preferences = got["preferences"]
        run.heldout_pairs = got["heldout"]
    with run.stage("rm") as st:
        rm = reward_model(policy, run.device)
        if not st.done:
            r = cfg.rm
            opt = Optim(r.steps, r.batch_size, r.lr, r.weight_decay, r.max_grad_norm)
            train_reward_model(rm, tokenizer, data.preferences, opt, cfg.data, run.context(st))
        rm.eval().requires_grad_(False)
        st.keep({"rm": rm}, export=rm, tokenizer=tokenizer)
    return rm


def _rlp_stages(
    run: Run, data: TaskData, tokenizer, policy, stages: set, policies: dict, rms: dict, info: dict
):
    """RLP's stages into `policies`, `rms` and `info`: sample P from PPO's policy; RLP-UML, RLP-SPG
    and both, each followed by PPO from SFT; then rlp.rounds - 1 more SPG rounds (P sampled again
    from the latest RLP-SPG policy, ranked by the latest refined RM)."""
    prompts = data.prompts
    samples = sample_stage(run, "sample", policies["ppo"], tokenizer, prompts)
    if "uml" in stages:
        rms["rm_uml"], info["uml"] = _uml_stage(run, "rm_uml", policy, tokenizer, data.preferences, samples)
        policies["rlp_uml"] = ppo_stage(run, "ppo_uml", policy, rms["rm_uml"], tokenizer, prompts)
    synthetic = []
    if stages & {"spg", "uml_spg"}:
        rms["rm_spg"], synthetic, info["spg"] = spg_stage(
            run, "rm_spg", data, tokenizer, policy, rms["rm"], samples
        )
        policies["rlp_spg"] = ppo_stage(run, "ppo_spg", policy, rms["rm_spg"], tokenizer, prompts)
    if "uml_spg" in stages:
        # both refinements at once: Bradley-Terry on D + the SPG pairs, + lam * L_M on P
        pairs = data.preferences + synthetic
        rms["rm_uml_spg"], _ = _uml_stage(run, "rm_uml_spg", policy, tokenizer, pairs, samples)
        policies["rlp_uml_spg"] = ppo_stage(run, "ppo_uml_spg", policy, rms["rm_uml_spg"], tokenizer, prompts)
    if "spg" in stages:
        for k in range(2, run.cfg.rlp.rounds + 1):
            last, tag = f"rlp_spg{_round(k - 1)}", _round(k)
            fresh = sample_stage(run, f"sample{tag}", policies[last], tokenizer, prompts)
            ranker = rms[f"rm_spg{_round(k - 1)}"]
            rms[f"rm_spg{tag}"], _, info[f"spg{tag}"] = spg_stage(
                run, f"rm_spg{tag}", data, tokenizer, policy, ranker, fresh
            )
            policies[f"rlp_spg{tag}"] = ppo_stage(
                run, f"ppo_spg{tag}", policy, rms[f"rm_spg{tag}"], tokenizer, prompts
            )


def train_all(run: Run, data: TaskData, tokenizer, policy) -> tuple[dict, dict, dict]:
    """Every training stage. Returns (policies, reward models, extra info) keyed by name. A resumed
    run loads the outputs of the stages it had finished and continues the one it was inside."""
    stages = stage_names(run.cfg)
    rm = _sft_pref_rm(run, data, tokenizer, policy)
    policies, rms, info = {"sft": policy}, {"rm": rm}, {}
    policies["ppo"] = ppo_stage(run, "ppo", policy, rm, tokenizer, data.prompts)
    if "oracle" in stages and data.gold is not None:
        # the ceiling of the testbed: PPO against the gold reward itself (critic initialised from rm)
        def gold_reward(ps, rs):
            return [data.gold(p, r) for p, r in zip(ps, rs)]

        policies["ppo_oracle"] = ppo_stage(
            run, "ppo_oracle", policy, rm, tokenizer, data.prompts, gold_reward
        )
    if stages & {"uml", "spg", "uml_spg"}:
        _rlp_stages(run, data, tokenizer, policy, stages, policies, rms, info)
    run_arena(run, data, tokenizer, policy, stages, policies, rms, info)
    return policies, rms, info
