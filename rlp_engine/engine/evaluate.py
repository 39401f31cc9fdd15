"""Evaluation of policies and reward models on held-out prompts.

A policy is sampled eval.samples_per_prompt times per evaluation prompt at the evaluation
temperature; the report gives its mean gold score (when the task has one) and its mean proxy reward
under each reward model. Pairs of a policy's samples of one prompt (first with second, third with
fourth, ...) whose gold scores differ, labelled by the gold reward, measure each reward model's
accuracy on the policy's own distribution (the quantity RLP sets out to improve).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlp_engine.algos.reward import preference_accuracy, score_texts
from rlp_engine.data.records import Preference
from rlp_engine.engine.generate import sample


@dataclass
class PolicyEval:
    prompts: list[str]  # one per sample (prompt-major)
    responses: list[str]
    gold: list[float] | None
    proxy: dict[str, float]  # reward model name -> mean reward
    response_tokens: float  # mean response length in tokens (eos included)
    samples_per_prompt: int = 2

    def summary(self) -> dict:
        out = {
            "gold": None if self.gold is None else sum(self.gold) / max(1, len(self.gold)),
            "exact": None if self.gold is None else sum(g == 1.0 for g in self.gold) / max(1, len(self.gold)),
            "proxy_reward_by_rm": self.proxy,
            "response_tokens": self.response_tokens,
            "examples": [{"prompt": p, "response": r} for p, r in zip(self.prompts[:6], self.responses[:6])],
        }
        return out


def evaluate_policy(policy, tokenizer, eval_prompts, eval_cfg, data_cfg, reward_models: dict, gold=None):
    """Sample eval_cfg.samples_per_prompt responses per prompt; gold and proxy means. -> PolicyEval"""
    prompts = eval_prompts[: eval_cfg.num_prompts]
    n = eval_cfg.samples_per_prompt
    s = sample(policy, tokenizer, prompts, eval_cfg, data_cfg, n=n, batch_size=eval_cfg.batch_size)
    proxy = {
        name: float(score_texts(rm, tokenizer, s.prompts, s.responses, data_cfg).mean())
        for name, rm in reward_models.items()
    }
    scores = None if gold is None else [gold(p, r) for p, r in zip(s.prompts, s.responses)]
    tokens = float(s.batch.response_mask.sum(-1).mean())
    return PolicyEval(s.prompts, s.responses, scores, proxy, tokens, n)


def gold_pairs(ev: PolicyEval) -> list[Preference]:
    """Gold-labelled pairs from a policy's samples of one prompt, (0, 1), (2, 3), ... within each
    prompt's group (ties dropped)."""
    if ev.gold is None:
        return []
    n = ev.samples_per_prompt
    pairs = []
    for start in range(0, len(ev.prompts), n):
        for i in range(start, start + n - 1, 2):
            p, r1, r2, g1, g2 = (
                ev.prompts[i],
                ev.responses[i],
                ev.responses[i + 1],
                ev.gold[i],
                ev.gold[i + 1],
            )
            if g1 != g2:
                pairs.append(Preference(p, r1, r2) if g1 > g2 else Preference(p, r2, r1))
    return pairs


def reward_model_accuracy(reward_models: dict, tokenizer, pairs_by_policy: dict, data_cfg) -> dict:
    """{rm name: {policy name: accuracy, "all": accuracy, "pairs": count}} on gold-labelled pairs."""
    every = [p for pairs in pairs_by_policy.values() for p in pairs]
    out = {}
    for name, rm in reward_models.items():
        row = {
            pol: preference_accuracy(rm, tokenizer, pairs, data_cfg) for pol, pairs in pairs_by_policy.items()
        }
        row["all"] = preference_accuracy(rm, tokenizer, every, data_cfg)
        row["pairs"] = len(every)
        out[name] = row
    return out
