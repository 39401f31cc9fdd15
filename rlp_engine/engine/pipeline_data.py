"""The pipeline's data around training: D and the held-out pairs made from the SFT policy's samples
(stage "pref"), and the final evaluation of every policy and reward model (stage "eval"). `run` is
the pipeline's `Run` (its cfg and say())."""

from __future__ import annotations

import random

from rlp_engine.config import ConfigError
from rlp_engine.data.build import TaskData
from rlp_engine.data.task import annotate, label_pairs
from rlp_engine.engine.evaluate import evaluate_policies
from rlp_engine.engine.generate import sample


def _sample_pairs(run, policy, tokenizer, prompts: list[str], n: int) -> list[list[str]]:
    """`n` samples of `policy` per prompt (run.cfg.sample's temperature), grouped per prompt."""
    cfg = run.cfg
    s = sample(policy, tokenizer, prompts, cfg.sample, cfg.data, n=n, batch_size=cfg.eval.batch_size)
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


def proxy_of(policy: str) -> str:
    """The reward model `policy` was optimised against: "rm" for SFT, PPO and the oracle (its critic's
    RM), "rm_<variant>" for "rlp_<variant>" (rlp_uml -> rm_uml, rlp_spg_r2 -> rm_spg_r2)."""
    return "rm_" + policy[len("rlp_") :] if policy.startswith("rlp_") else "rm"


def _reference(data: TaskData, prompts: list[str], n: int, noise: float, seed: int):
    """The demonstrator that wrote the SFT data, `n` responses per eval prompt: the fixed reference
    of the win-rates (the paper compares with text-davinci-003)."""
    if data.task is None or not hasattr(data.task, "demonstrate"):
        return None
    rng = random.Random(seed * 7919 + 17)
    return {p: [data.task.demonstrate(p, rng, noise) for _ in range(n)] for p in prompts}


def evaluate_all(run, data: TaskData, tokenizer, policies: dict, rms: dict) -> dict:
    cfg = run.cfg
    prompts = data.eval_prompts[: cfg.eval.num_prompts]
    reference = _reference(data, prompts, cfg.eval.samples_per_prompt, cfg.data.sft_noise, cfg.run.seed)
    return evaluate_policies(
        policies,
        rms,
        tokenizer,
        prompts,
        cfg.eval,
        cfg.data,
        data.gold,
        reference=reference,
        proxy_of={name: proxy_of(name) for name in policies},
        paired_against={name: "ppo" for name in policies if name not in ("sft", "ppo")},
        heldout_pairs=run.heldout_pairs or None,
        seed=cfg.run.seed,
    )
