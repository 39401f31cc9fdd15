"""RLP's math (stages 4 and 5 refine the reward model on the policy's samples P); the loops that
sample P and train the refined reward models are rlp_engine/recipes/rlp.py.

RLP-UML: Bradley-Terry on D + lam * L_M on P, where L_M is the multi-view information-bottleneck
loss between two different sampled responses to the same prompt (Gaussian encoder heads on the
reward model's final hidden state).
RLP-SPG: cluster each prompt's n responses by a pluggable equivalence; confidence = |largest| / n;
prompts with confidence >= gamma and a non-empty rest give a synthetic pair (y_w: the largest
cluster's member with the highest current reward; y_l: a uniform draw from the other clusters'
members); Bradley-Terry on D plus these pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from rlp_engine import ops
from rlp_engine.data.batch import Encoded
from rlp_engine.data.records import Preference
from rlp_engine.data.task import extract_answer
from rlp_engine.models.heads import ScalarHeadModel


@dataclass
class PolicySamples:
    """The set P: prompts[i] with its n responses responses[i] (stage 4)."""

    prompts: list[str]
    responses: list[list[str]]


def final_answer_key(response: str, index: int) -> Hashable:
    """Exact match of the extracted final answer; a response without one is its own cluster."""
    answer = extract_answer(response)
    return ("answer", answer) if answer is not None else ("none", index)


def exact_key(response: str, index: int) -> Hashable:
    return ("text", response.strip())


EQUIVALENCES: dict[str, Callable[[str, int], Hashable]] = {
    "final_answer": final_answer_key,
    "answer": final_answer_key,  # the leading integer; the pipeline passes the task's own answer() key
    "exact": exact_key,
}


def cluster(responses: list[str], key: Callable[[str, int], Hashable]) -> list[list[int]]:
    """Indices of `responses` grouped by `key(response, index)`, largest cluster first (ties: the
    cluster seen first comes first)."""
    groups: dict[Hashable, list[int]] = {}
    for i, r in enumerate(responses):
        groups.setdefault(key(r, i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def spg_pair(
    prompt: str,
    responses: list[str],
    rewards: list[float],
    clusters: list[list[int]],
    gamma: float,
    rng: random.Random,
) -> Preference | None:
    """A synthetic preference for one prompt, or None when confidence |largest| / n < gamma or every
    response is in the largest cluster. y_w: the largest cluster's member with the highest reward
    (first on ties); y_l: uniform over the members of the other clusters."""
    largest = clusters[0]
    confidence = len(largest) / len(responses)
    rest = [i for c in clusters[1:] for i in c]
    if confidence < gamma or not rest:
        return None
    w = max(largest, key=lambda i: (rewards[i], -i))
    lose = rest[rng.randrange(len(rest))]
    return Preference(prompt, responses[w], responses[lose])


def synthetic_preferences(
    samples: PolicySamples,
    rewards: list[list[float]],
    gamma: float,
    equivalence: str | Callable[[str, int], Hashable] = "final_answer",
    seed: int = 0,
) -> tuple[list[Preference], dict[str, float]]:
    """SPG pairs over P and statistics (kept: share of prompts kept; confidence: mean confidence)."""
    key = EQUIVALENCES[equivalence] if isinstance(equivalence, str) else equivalence
    rng = random.Random(seed)
    pairs, confidences = [], []
    for prompt, responses, r in zip(samples.prompts, samples.responses, rewards):
        clusters = cluster(responses, key)
        confidences.append(len(clusters[0]) / len(responses))
        pair = spg_pair(prompt, responses, r, clusters, gamma, rng)
        if pair is not None:
            pairs.append(pair)
    n = max(1, len(samples.prompts))
    return pairs, {"kept": len(pairs) / n, "confidence": sum(confidences) / n, "pairs": len(pairs)}


class MultiViewData:
    """Pairs of views for L_M: for each prompt of P with two distinct responses, tokenised once."""

    def __init__(self, tokenizer, samples: PolicySamples, data_cfg, seed: int = 0):
        rng = random.Random(seed)
        prompts, v1, v2 = [], [], []
        for prompt, responses in zip(samples.prompts, samples.responses):
            distinct = list(dict.fromkeys(responses))
            if len(responses) < 2:
                continue
            # Two different sampled responses; the same text twice only when the policy never varies.
            a, b = rng.sample(distinct, 2) if len(distinct) >= 2 else (responses[0], responses[1])
            prompts.append(prompt)
            v1.append(a)
            v2.append(b)
        if len(prompts) < 2:
            raise ValueError("rlp_uml: P needs at least two prompts with two responses each")
        self.view1 = Encoded(tokenizer, prompts, v1, data_cfg)
        self.view2 = Encoded(tokenizer, prompts, v2, data_cfg)

    def __len__(self) -> int:
        return len(self.view1)

    def split(self, heldout_frac: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, held-out) pair indices, sorted int64: a seeded random heldout_frac of the prompts
        (rounded, at least 2 when heldout_frac > 0, so the MI bound has a negative) is held out;
        none when that would leave fewer than 2 to train on."""
        if not 0.0 <= heldout_frac < 1.0:
            raise ValueError(f"MultiViewData.split: heldout_frac must be in [0, 1), got {heldout_frac}")
        n = len(self)
        k = max(2, round(heldout_frac * n)) if heldout_frac > 0 else 0
        if n - k < 2:
            k = 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[k:].sort().values, perm[:k].sort().values


def encoder_spread(mu: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much the encoder's means vary across inputs, mu [N, D] -> detached 0-dim tensors:
    mu_std (the std over rows, unbiased, averaged over the D dims) and mu_norm (mean |mu| entry, the
    same per-dim scale). mu_std << mu_norm: the means are near-constant (a collapsed bottleneck)."""
    mu = mu.detach().float()
    return {"mu_std": mu.std(0).mean(), "mu_norm": mu.abs().mean()}


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """The SKL weight at `step`: linear from 0 (step 0) to beta at warmup_steps, then beta."""
    return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)


def encode_views(rm, views: MultiViewData, idx, device):
    """(mu1, logvar1, mu2, logvar2) [n, D] of both views of the pairs `idx` under rm's encoder."""
    b1, b2 = views.view1.batch(idx).to(device), views.view2.batch(idx).to(device)
    mu1, logvar1 = rm.encoder(rm.final_hidden(b1.input_ids, b1.attention_mask))
    mu2, logvar2 = rm.encoder(rm.final_hidden(b2.input_ids, b2.attention_mask))
    return mu1, logvar1, mu2, logvar2


@torch.no_grad()
def uml_diagnostics(
    rm: ScalarHeadModel,
    views: MultiViewData,
    idx,
    *,
    negatives: str = "all",
    seed: int = 0,
    draws: int = 8,
    batch_size: int = 64,
) -> dict[str, float]:
    """The information bottleneck of a trained `rm` on the view pairs `idx` (held out: pairs it never
    trained on): {"mi": the JSD bound over all of them at once (N(N-1) negatives with "all"), "skl",
    "mu_std", "mu_norm", "pairs"} as floats; mi is the mean over `draws` draws of the latents' noise
    (from a generator seeded with `seed`). A collapsed term reads mi = -2 ln 2 = -1.386 (an
    uninformative critic) and mu_std << mu_norm. Eval mode, no gradients."""
    idx = [int(i) for i in idx]
    if len(idx) < 2:
        raise ValueError(f"uml_diagnostics: needs at least 2 view pairs, got {len(idx)}")
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    parts = [encode_views(rm, views, idx[i : i + batch_size], device) for i in range(0, len(idx), batch_size)]
    mu1, logvar1, mu2, logvar2 = (torch.cat(t) for t in zip(*parts))
    noise = torch.Generator(device).manual_seed(seed)
    # the bound averaged over `draws` noise draws: a single draw is noisy on a few dozen pairs
    mis = []
    for _ in range(draws):
        _, m = ops.multiview_ib_loss(
            mu1,
            logvar1,
            mu2,
            logvar2,
            rm.encoder.critic,
            beta=0.0,
            generator=noise,
            negatives=negatives,
            critic_matrix=rm.encoder.critic_matrix,
        )
        mis.append(m["mi"])
    mi = torch.stack(mis).mean()
    skl = ops.gaussian_symmetric_kl(mu1, logvar1, mu2, logvar2).mean()
    rm.train(was_training)
    spread = encoder_spread(torch.cat([mu1, mu2]))
    return {"mi": float(mi), "skl": float(skl), **{k: float(v) for k, v in spread.items()}, "pairs": len(idx)}
