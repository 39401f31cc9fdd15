"""Evaluation of policies and reward models on held-out prompts, with standard errors.

`evaluate_policies` samples each policy once: eval.samples_per_prompt responses per evaluation prompt
at the evaluation temperature, every policy under the same seed (common random numbers, so paired
differences see less sampling noise). Everything else is computed from those samples, each reward
model scoring every distinct (prompt, response) once:
- per policy: gold mean, exact-match rate (gold == 1), win-rate against reference responses under a
  simulated annotator (percent, the paper's Table 2), proxy reward under each reward model, KL to the
  SFT policy (`sequence_kl` on the policy's own samples: forward passes only, no RNG); standard
  errors clustered by prompt (a prompt's samples averaged first: rlp_engine.stats);
- paired differences between policies on the same prompts (vs the baseline, and per `paired_against`);
- per reward model: accuracy on gold-labelled pairs of each policy's own samples (the quantity RLP
  sets out to improve: pairs (1st, 2nd), (3rd, 4th), ... of one prompt, gold ties dropped, reward
  ties count 1/2, clustered by prompt), accuracy on caller-given held-out pairs (binomial SE), and a
  best-of probe: is the reward model's pick among the distinct responses of a prompt gold-best?
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from rlp_engine.algos.reward import preference_accuracy, score_texts
from rlp_engine.data.build import TaskData
from rlp_engine.data.records import Preference
from rlp_engine.engine.generate import sample
from rlp_engine.pipeline.curves import evaluate_curves, sequence_kl
from rlp_engine.stats import (
    Estimate,
    best_of,
    binomial_se,
    clustered_mean_se,
    json_safe,
    pair_outcome,
    paired_diff,
)

Annotator = Callable[[str, str, str], float]  # (prompt, y_a, y_b) -> P(y_a beats y_b)
NONE = Estimate(math.nan, math.nan, 0)
DIFF_METRICS = ("gold", "exact", "win_rate")


@dataclass
class PolicyEval:
    prompts: list[str]  # one per sample (prompt-major)
    responses: list[str]
    gold: list[float] | None
    proxy: dict[str, float]  # reward model name -> mean reward
    response_tokens: float  # mean response length in tokens (eos included)
    samples_per_prompt: int = 2
    proxy_se: dict[str, float] = field(default_factory=dict)  # reward model name -> clustered SE
    kl: list[float] | None = None  # per sample: sequence_kl to the SFT policy (None: not measured)
    kl_per_token: list[float] | None = None  # per sample: that KL / its response tokens

    def kl_figures(self) -> dict:
        """kl_to_sft (mean per-sequence KL) and kl_to_sft_per_token, each with its clustered SE."""
        out = {}
        for key, values in (("kl_to_sft", self.kl), ("kl_to_sft_per_token", self.kl_per_token)):
            est = clustered_mean_se(self.groups(values), "kl") if values is not None else NONE
            out[key], out[f"{key}_se"] = est.mean, est.se
        return out

    def groups(self, values: list) -> list[list]:
        """Per-sample values split into one list per prompt."""
        n = self.samples_per_prompt
        return [values[i : i + n] for i in range(0, len(values), n)]

    def summary(self) -> dict:
        gold = exact = NONE
        if self.gold is not None:
            gold = clustered_mean_se(self.groups(self.gold), "gold")
            exact = clustered_mean_se(self.groups([float(g == 1.0) for g in self.gold]), "gold")
        out = {
            "gold": None if self.gold is None else gold.mean,
            "gold_se": gold.se,
            "exact": None if self.gold is None else exact.mean,
            "exact_se": exact.se,
            "proxy_reward_by_rm": self.proxy,
            "proxy_reward_se_by_rm": self.proxy_se,
            "response_tokens": self.response_tokens,
            "n_prompts": len(self.prompts) // self.samples_per_prompt,
            "samples_per_prompt": self.samples_per_prompt,
            **(self.kl_figures() if self.kl is not None else {}),
            "examples": [
                {"prompt": p, "response": r, "gold": None if self.gold is None else self.gold[i]}
                for i, (p, r) in enumerate(zip(self.prompts[:6], self.responses[:6]))
            ],
        }
        return json_safe(out)


@contextmanager
def _seeded(model, seed: int | None):
    """Seed torch's generators for the block and restore their state after it (None: unseeded)."""
    if seed is None:
        yield
        return
    dev = next(model.parameters()).device
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def sample_policy(
    policy,
    tokenizer,
    prompts,
    eval_cfg,
    data_cfg,
    gold=None,
    seed: int | None = None,
    show_progress: bool = False,
    desc: str = "eval",
    sft=None,
) -> PolicyEval:
    """One sample() call: eval_cfg.samples_per_prompt responses per prompt, gold-scored. -> PolicyEval
    (proxy rewards left empty). show_progress: a bar `desc` over the prompt chunks (same samples).
    sft: the SFT policy, for the KL to it (`sequence_kl`, after the draws; 0 for `sft` itself)."""
    n = eval_cfg.samples_per_prompt
    with _seeded(policy, seed):
        s = sample(
            policy,
            tokenizer,
            prompts,
            eval_cfg,
            data_cfg,
            n=n,
            batch_size=eval_cfg.batch_size,
            show_progress=show_progress,
            desc=desc,
        )
    scores = None if gold is None else [float(gold(p, r)) for p, r in zip(s.prompts, s.responses)]
    tokens = float(s.batch.response_mask.sum(-1).mean())
    ev = PolicyEval(s.prompts, s.responses, scores, {}, tokens, n)
    if sft is not None:
        kl, lens = sequence_kl(policy, sft, s.batch, eval_cfg.temperature, eval_cfg.batch_size)
        ev.kl, ev.kl_per_token = kl.tolist(), (kl / lens.clamp(min=1)).tolist()
    return ev


def _score_table(reward_models: dict, tokenizer, keys, data_cfg, batch_size: int) -> dict:
    """{rm name: {(prompt, response): reward}} over the distinct keys."""
    keys = list(dict.fromkeys(keys))
    prompts, responses = [k[0] for k in keys], [k[1] for k in keys]
    return {
        name: dict(zip(keys, score_texts(rm, tokenizer, prompts, responses, data_cfg, batch_size).tolist()))
        for name, rm in reward_models.items()
    }


def _add_proxy(ev: PolicyEval, table: dict) -> None:
    for name, scores in table.items():
        est = clustered_mean_se(ev.groups([scores[k] for k in zip(ev.prompts, ev.responses)]), "proxy")
        ev.proxy[name], ev.proxy_se[name] = est.mean, est.se


def evaluate_policy(
    policy,
    tokenizer,
    eval_prompts,
    eval_cfg,
    data_cfg,
    reward_models: dict,
    gold=None,
    seed: int | None = None,
    show_progress: bool = False,
) -> PolicyEval:
    """Sample eval_cfg.samples_per_prompt responses per prompt; gold and proxy scores. -> PolicyEval
    show_progress: an "eval" bar over the sampling's prompt chunks."""
    prompts = eval_prompts[: eval_cfg.num_prompts]
    ev = sample_policy(policy, tokenizer, prompts, eval_cfg, data_cfg, gold, seed, show_progress)
    _add_proxy(
        ev,
        _score_table(reward_models, tokenizer, zip(ev.prompts, ev.responses), data_cfg, eval_cfg.batch_size),
    )
    return ev


def _gold_pairs_by_prompt(ev: PolicyEval) -> list[list[Preference]]:
    """Per prompt: its samples paired (0, 1), (2, 3), ..., labelled by gold, ties dropped."""
    if ev.gold is None:
        return []
    out = []
    for resp, gold, prompt in zip(
        ev.groups(ev.responses), ev.groups(ev.gold), ev.prompts[:: ev.samples_per_prompt]
    ):
        pairs = []
        for i in range(0, len(resp) - 1, 2):
            if gold[i] != gold[i + 1]:
                w, lo = (i, i + 1) if gold[i] > gold[i + 1] else (i + 1, i)
                pairs.append(Preference(prompt, resp[w], resp[lo]))
        out.append(pairs)
    return out


def gold_pairs(ev: PolicyEval) -> list[Preference]:
    """Gold-labelled pairs from a policy's samples of one prompt, (0, 1), (2, 3), ... within each
    prompt's group (ties dropped)."""
    return [p for pairs in _gold_pairs_by_prompt(ev) for p in pairs]


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


def gold_annotator(gold) -> Annotator:
    """The simulated annotator from a gold reward: 1 when gold(y_a) > gold(y_b), 1/2 on a tie, else 0."""
    return lambda prompt, a, b: pair_outcome(gold(prompt, a), gold(prompt, b))


def win_rates(
    prompts: list[str], groups: list[list[str]], reference: dict, annotate: Annotator
) -> list[list[float]]:
    """Per prompt, 100 * annotate(prompt, sample_j, ref_(j mod m)) for each of its samples, the m
    reference responses taken in order and cycled. Their clustered mean is the win-rate in percent
    (the reference against itself under a gold annotator: exactly 50)."""
    if len(prompts) != len(groups):
        raise ValueError(f"groups: {len(groups)} groups for {len(prompts)} prompts")
    out = []
    for prompt, group in zip(prompts, groups):
        refs = reference[prompt]
        row = []
        for j, y in enumerate(group):
            p = float(annotate(prompt, y, refs[j % len(refs)]))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"annotate: must return a probability in [0, 1], got {p!r} on {prompt!r}")
            row.append(100.0 * p)
        out.append(row)
    return out


def _check_inputs(policies, prompts, eval_cfg, gold, reference, annotate, heldout_pairs) -> None:
    if not policies:
        raise ValueError("policies: empty, nothing to evaluate")
    if not prompts:
        raise ValueError("eval_prompts: empty (or eval_cfg.num_prompts < 1)")
    if eval_cfg.samples_per_prompt < 1:
        raise ValueError(f"eval_cfg.samples_per_prompt: must be >= 1, got {eval_cfg.samples_per_prompt}")
    if reference is not None:
        missing = [p for p in dict.fromkeys(prompts) if not reference.get(p)]
        if missing:
            raise ValueError(
                f"reference: no responses for {len(missing)} of the {len(set(prompts))} eval prompts "
                f"(first: {missing[0]!r})"
            )
        if annotate is None and gold is None:
            raise ValueError("annotate: needed for the win-rate vs reference when there is no gold reward")
    if heldout_pairs is not None and not heldout_pairs:
        raise ValueError("heldout_pairs: empty (pass None when there are none)")


def _est(groups: list[list[float]], name: str) -> Estimate:
    return clustered_mean_se(groups, name) if any(groups) else NONE


def _rm_row(table: dict, evals: dict, heldout_pairs) -> dict:
    """One reward model's accuracy figures from its score table."""
    per_prompt = {}  # policy -> per prompt: outcomes of its gold-labelled pairs
    for pol, ev in evals.items():
        pairs = _gold_pairs_by_prompt(ev)
        per_prompt[pol] = [
            [pair_outcome(table[(p.prompt, p.chosen)], table[(p.prompt, p.rejected)]) for p in g]
            for g in pairs
        ]
    pooled = [sum(rows, []) for rows in zip(*per_prompt.values())]
    ests = {pol: _est(g, "pairs") for pol, g in {**per_prompt, "all": pooled}.items()}
    counts = {pol: sum(map(len, g)) for pol, g in {**per_prompt, "all": pooled}.items()}
    row = {
        "on_policy_accuracy": {**{k: e.mean for k, e in ests.items()}, "pairs": counts["all"]},
        "on_policy_accuracy_se": {k: e.se for k, e in ests.items()},
        "on_policy_pairs": counts,
        "on_policy_prompts": {k: e.n for k, e in ests.items()},
    }
    off = NONE
    if heldout_pairs:
        off = binomial_se(
            [pair_outcome(table[(p.prompt, p.chosen)], table[(p.prompt, p.rejected)]) for p in heldout_pairs],
            "heldout_pairs",
        )
    row.update(offline_accuracy=off.mean, offline_accuracy_se=off.se, offline_pairs=off.n)
    row["best_of"] = _best_of_row(table, evals)
    return row


def _best_of_row(table: dict, evals: dict) -> dict | None:
    """Best-of probe over prompts whose distinct responses (all policies pooled) differ in gold."""
    if any(ev.gold is None for ev in evals.values()):
        return None
    hits, chances = [], []
    first = next(iter(evals.values()))
    groups = [list(zip(ev.groups(ev.responses), ev.groups(ev.gold))) for ev in evals.values()]
    for i, prompt in enumerate(first.prompts[:: first.samples_per_prompt]):
        cand = {}  # response -> gold, first occurrence order
        for g in groups:
            cand.update(zip(*g[i]))
        if len(set(cand.values())) < 2:
            continue  # one response, or all gold-equal: nothing to pick
        hit, chance = best_of([table[(prompt, r)] for r in cand], list(cand.values()))
        hits.append([hit])
        chances.append([chance])
    rate, chance = _est(hits, "hits"), _est(chances, "chances")
    return {
        "rate": rate.mean,
        "rate_se": rate.se,
        "chance": chance.mean,
        "chance_se": chance.se,
        "n_prompts": rate.n,
    }


def _diff(a: dict, b: dict, names: tuple[str, str]) -> dict:
    """Paired differences a - b of per-prompt series, per metric both have."""
    out = {}
    n = 0
    for m in DIFF_METRICS:
        est = paired_diff(a[m], b[m], names) if a.get(m) and b.get(m) else NONE
        out[m], out[f"{m}_se"] = est.mean, est.se
        n = max(n, est.n)
    out["n_prompts"] = n
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _policy_row(ev: PolicyEval, reference, annotate, proxy_name) -> tuple[dict, dict]:
    """A policy's report row and its per-prompt series (for the paired differences)."""
    row = ev.summary()
    series = {}
    if ev.gold is not None:
        series["gold"] = [_mean(g) for g in ev.groups(ev.gold)]
        series["exact"] = [_mean([float(x == 1.0) for x in g]) for g in ev.groups(ev.gold)]
    win = NONE
    if reference is not None:
        groups = win_rates(ev.prompts[:: ev.samples_per_prompt], ev.groups(ev.responses), reference, annotate)
        win = clustered_mean_se(groups, "win_rate")
        series["win_rate"] = [_mean(g) for g in groups]
    row.update(win_rate=win.mean, win_rate_se=win.se)
    row["proxy_reward"] = ev.proxy.get(proxy_name)
    row["proxy_reward_se"] = ev.proxy_se.get(proxy_name)
    return row, series


def _reference_row(reference, prompts: list[str], gold) -> dict | None:
    if reference is None or gold is None:
        return None
    scores = [[float(gold(p, r)) for r in reference[p]] for p in prompts]
    g = clustered_mean_se(scores, "reference")
    e = clustered_mean_se([[float(x == 1.0) for x in row] for row in scores], "reference")
    return {"gold": g.mean, "gold_se": g.se, "exact": e.mean, "exact_se": e.se, "n_prompts": g.n}


def evaluate_policies(
    policies: dict,
    reward_models: dict,
    tokenizer,
    eval_prompts: list[str],
    eval_cfg,
    data_cfg,
    gold,
    *,
    reference: dict[str, list[str]] | None = None,
    annotate: Annotator | None = None,
    proxy_of: dict[str, str] | None = None,
    baseline: str = "sft",
    paired_against: dict[str, str] | None = None,
    heldout_pairs: list[Preference] | None = None,
    seed: int = 0,
    show_progress: bool = False,
    sft: str | None = "sft",
) -> dict:
    """Evaluate every policy and reward model on eval_prompts[:eval_cfg.num_prompts]. -> JSON-able dict

    policies: name -> causal LM, sampled once each (sample(), eval_cfg's temperature/top-k/top-p,
    n = eval_cfg.samples_per_prompt) under torch seed `seed` (global RNG state restored after).
    reward_models: name -> model with .score(input_ids, attention_mask) -> [B] (ScalarHeadModel).
    gold: gold(prompt, response) -> float, or None (no gold figures, no on-policy pairs).
    reference: eval prompt -> reference responses (cycled over a policy's samples) for the win-rate;
    annotate(prompt, y_a, y_b) -> P(y_a beats y_b), by default gold_annotator(gold).
    proxy_of: policy -> the reward model it was optimised against ("proxy_reward").
    baseline / paired_against: paired differences "diff_vs_<baseline>" for every other policy, and
    "diff_vs_<other>" for each policy -> other given; names absent from `policies` are skipped.
    heldout_pairs: preference pairs on held-out prompts for each RM's offline accuracy.
    show_progress: an "eval <policy>" bar over each policy's sampling (the figures are the same).
    sft: the name in `policies` of the SFT policy: every row gets kl_to_sft (per sequence) and
    kl_to_sft_per_token, each with its SE, on the row's own samples (absent / None: no KL figures).

    Returns {"policies", "reward_models", "reference", "eval"}; every figure "x" comes with "x_se"
    (NaN and unmeasured figures are None). See the module docstring for what each one is.
    """
    prompts = list(eval_prompts[: eval_cfg.num_prompts])
    _check_inputs(policies, prompts, eval_cfg, gold, reference, annotate, heldout_pairs)
    ref = policies.get(sft) if sft is not None else None
    evals = {
        name: sample_policy(
            pol, tokenizer, prompts, eval_cfg, data_cfg, gold, seed, show_progress, f"eval {name}", ref
        )
        for name, pol in policies.items()
    }
    keys = [k for ev in evals.values() for k in zip(ev.prompts, ev.responses)]
    keys += [(p.prompt, r) for p in heldout_pairs or () for r in (p.chosen, p.rejected)]
    table = _score_table(reward_models, tokenizer, keys, data_cfg, eval_cfg.batch_size)
    if reference is not None and annotate is None:
        annotate = gold_annotator(gold)
    rows, series = {}, {}
    for name, ev in evals.items():
        _add_proxy(ev, table)
        rows[name], series[name] = _policy_row(ev, reference, annotate, (proxy_of or {}).get(name))
    for name, row in rows.items():
        others = [baseline] if name != baseline else []
        others += [o for o in [(paired_against or {}).get(name)] if o is not None and o not in others]
        for other in others:
            if other in series:
                row[f"diff_vs_{other}"] = _diff(series[name], series[other], (name, other))
    report = {
        "policies": rows,
        "reward_models": {name: _rm_row(t, evals, heldout_pairs) for name, t in table.items()},
        "reference": _reference_row(reference, prompts, gold),
        "eval": {
            "n_prompts": len(prompts),
            "samples_per_prompt": eval_cfg.samples_per_prompt,
            "temperature": eval_cfg.temperature,
            "seed": seed,
            "baseline": baseline,
            "paired_against": dict(paired_against or {}),
        },
    }
    return json_safe(report)


def proxy_of(policy: str) -> str:
    """The reward model `policy` was optimised against: "rm" for SFT, PPO and the oracle (its critic's
    RM), "rm_<variant>" for "rlp_<variant>" (rlp_uml -> rm_uml, rlp_spg_r2 -> rm_spg_r2); the
    ensembles' scorers for theirs (ppo_ens_wco -> rm_ens_wco, rlp_ens -> rm_rlp_ens); grpo_spg: rm_spg."""
    if policy.startswith("ppo_ens_"):
        return "rm_ens_" + policy[len("ppo_ens_") :]
    if policy == "rlp_ens":
        return "rm_rlp_ens"
    if policy == "grpo_spg":
        return "rm_spg"
    return "rm_" + policy[len("rlp_") :] if policy.startswith("rlp_") else "rm"


def _reference(data: TaskData, prompts: list[str], n: int, noise: float, seed: int):
    """The demonstrator that wrote the SFT data, `n` responses per eval prompt: the fixed reference
    of the win-rates (the paper compares with text-davinci-003)."""
    if data.task is None or not hasattr(data.task, "demonstrate"):
        return None
    rng = random.Random(seed * 7919 + 17)
    return {p: [data.task.demonstrate(p, rng, noise) for _ in range(n)] for p in prompts}


def evaluate_all(run, data: TaskData, tokenizer, policies: dict, rms: dict) -> dict:
    """Every policy and reward model (evaluate_policies), then, after all of its draws, the gold-vs-KL
    curves of the policies with snapshots (pipeline/curves.py, its own seed, global RNG kept)."""
    cfg = run.cfg
    prompts = data.eval_prompts[: cfg.eval.num_prompts]
    reference = _reference(data, prompts, cfg.eval.samples_per_prompt, cfg.data.sft_noise, cfg.run.seed)
    report = evaluate_policies(
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
        show_progress=cfg.run.progress,
    )
    evaluate_curves(run, data, tokenizer, policies, report)
    return report
