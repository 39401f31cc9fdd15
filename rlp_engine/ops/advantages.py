"""Outcome advantage estimators: GRPO (Dr.GRPO without the std), RLOO, REINFORCE++ (and its
group-baseline variant), ReMax. Semantics follow verl 0.9.1's `core_algos` (rlp_engine.compat.verl
gives verl's exact signatures and dtypes).

Pure torch, no kernel: each estimator is O(B*T) elementwise work plus one per-group reduction over
B scalars (`index_add_` into G group slots), which torch already runs at memory bandwidth; verl's
per-row Python loop is what this replaces. REINFORCE++'s discounted return is GAE with V = 0 and
lam = 1, so it reuses the compute_gae kernels.

Shapes: scores [B] (one outcome score per sequence), token_rewards [B, T], mask [B, T] (bool,
integer or floating 0/1), index: B group ids (a 1-D integer tensor, grouped by value, or any
sequence of hashables, e.g. verl's numpy array of uid strings, grouped as a dict groups them).
Outputs are fp32 (fp64 for fp64 inputs), never require grad (they are training targets), and are
0 where mask == 0 (a NaN score or reward there never leaks in), except ReMax's reverse sums, which
are nonzero in a mask hole that has response tokens after it (as in verl).
"""

from __future__ import annotations

import numbers

import torch

from rlp_engine.ops import reduce
from rlp_engine.ops._checks import check_mask, check_tensor
from rlp_engine.ops.gae import compute_gae


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_scores(op: str, scores, mask) -> torch.Tensor:
    check_tensor(op, "scores", scores, ndim=1)
    check_tensor(op, "mask", mask, floating=False, ndim=2)
    if mask.shape[0] != scores.shape[0] or mask.device != scores.device:
        raise ValueError(
            f"{op}: mask has shape {tuple(mask.shape)} on {mask.device} but scores has shape "
            f"{tuple(scores.shape)} on {scores.device}; expected [B, T] with B = len(scores), same device"
        )
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool, integer or floating, got {mask.dtype}")
    return scores.detach().to(_compute_dtype(scores))


def _check_nonneg(op: str, name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) < float("inf"):
        raise ValueError(f"{op}: {name} must be a finite float >= 0, got {x!r}")
    return float(x)


def _group_ids(op: str, index, batch: int, device) -> tuple[torch.Tensor, int]:
    """Dense group ids [B] (int64) and the number of groups G. A tensor index is grouped by value
    (torch.unique); any other sequence by hashing its elements (as verl's dict does)."""
    if isinstance(index, torch.Tensor):
        if index.dim() != 1 or index.shape[0] != batch or index.is_floating_point() or index.is_complex():
            raise ValueError(
                f"{op}: index must be a 1-D integer tensor of length {batch}, got {index.dtype} "
                f"of shape {tuple(index.shape)}"
            )
        uniq, ids = torch.unique(index, return_inverse=True)
        return ids.to(device), uniq.numel()
    try:
        n = len(index)
        if n != batch:
            raise ValueError(f"{op}: index has {n} entries but there are {batch} sequences")
        table: dict = {}
        ids = [table.setdefault(k, len(table)) for k in index]
    except TypeError as err:
        raise ValueError(f"{op}: index must be a sequence of {batch} hashable group ids ({err})") from None
    return torch.tensor(ids, dtype=torch.int64, device=device), len(table)


def _group_stats(x: torch.Tensor, ids: torch.Tensor, groups: int, var: bool = False):
    """Per-row group size n, group mean and (unbiased, NaN for singletons) group variance, [B] each."""
    zeros = torch.zeros(groups, dtype=x.dtype, device=x.device)
    n = zeros.index_add(0, ids, torch.ones_like(x))[ids]  # (B,)
    mean = (zeros.index_add(0, ids, x)[ids]) / n  # (B,)
    if not var:
        return n, mean, None
    sq = zeros.index_add(0, ids, (x - mean) ** 2)[ids]
    return n, mean, sq / (n - 1)


def _per_token(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """adv [B] -> adv[:, None] * mask [B, T], exactly 0 (never NaN) where mask == 0."""
    m = mask.to(adv.dtype)
    return torch.where(mask.bool(), adv[:, None] * m, torch.zeros((), dtype=adv.dtype, device=adv.device))


def grpo_advantages(
    scores: torch.Tensor, mask: torch.Tensor, index, *, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantage [B, T]: A_i = (s_i - mean_g) / (std_g + eps) on every response token
    of row i, where g is row i's group, std the unbiased (n - 1) standard deviation; without
    `norm_by_std` (Dr.GRPO) A_i = s_i - mean_g. A group of one sequence has mean 0 and std 1 (verl's
    convention), so its advantage is s_i / (1 + eps), or s_i."""
    op = "grpo_advantages"
    x = _check_scores(op, scores, mask)
    eps = _check_nonneg(op, "eps", eps)
    with torch.no_grad():
        ids, groups = _group_ids(op, index, x.shape[0], x.device)
        n, mean, var = _group_stats(x, ids, groups, var=norm_by_std)
        single = n == 1
        adv = x - torch.where(single, 0.0, mean)
        if norm_by_std:
            adv = adv / (torch.where(single, 1.0, var.sqrt()) + eps)
        return _per_token(adv, mask)


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor, index) -> torch.Tensor:
    """RLOO advantage [B, T]: A_i = s_i - mean of the other n - 1 scores of row i's group
    = n/(n-1) * (s_i - mean_g); a group of one sequence keeps its raw score (verl's convention)."""
    op = "rloo_advantages"
    x = _check_scores(op, scores, mask)
    with torch.no_grad():
        ids, groups = _group_ids(op, index, x.shape[0], x.device)
        n, mean, _ = _group_stats(x, ids, groups)
        loo = x * n / (n - 1) - mean * n / (n - 1)
        return _per_token(torch.where(n > 1, loo, x), mask)


def _whiten(op: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8) over the mask (unbiased var), times the mask. Host sync: the
    token count is checked on the host (at least 2 needed)."""
    count = float(mask.to(x.dtype).sum())
    if count < 2:
        raise ValueError(f"{op}: mask selects {count:g} tokens; whitening needs at least 2")
    white = (x - reduce.masked_mean(x, mask)) * torch.rsqrt(reduce.masked_var(x, mask) + 1e-8)
    return _per_token_mat(white, mask)


def _per_token_mat(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x * mask.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))


def reinforce_pp_baseline_advantages(scores: torch.Tensor, mask: torch.Tensor, index) -> torch.Tensor:
    """REINFORCE++-baseline advantage [B, T]: c_i = s_i - mean_g (0 baseline for a group of one),
    put on every response token, then whitened over all response tokens of the batch:
    A = (c - mu) / sqrt(var + 1e-8) * mask, mu and the unbiased var taken over the mask (so a row
    weighs by its length). ValueError when the mask has fewer than two tokens."""
    op = "reinforce_pp_baseline_advantages"
    x = _check_scores(op, scores, mask)
    with torch.no_grad():
        ids, groups = _group_ids(op, index, x.shape[0], x.device)
        n, mean, _ = _group_stats(x, ids, groups)
        centred = _per_token(x - torch.where(n == 1, 0.0, mean), mask)  # (B, T)
        return _whiten(op, centred, mask)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (no critic): discounted returns G_t = m_t (r_t + gamma G'_{t+1}), where G' is
    carried unchanged across masked-out steps (their rewards dropped), then advantages
    A = whiten(G over the mask) * mask. token_rewards, mask [B, T]; gamma in [0, 1]. Returns
    (advantages, returns), [B, T]. ValueError when the mask has fewer than two tokens. The returns
    are GAE's carried recurrence with V = 0, lam = 1 (the compute_gae kernels; fp32 inside)."""
    op = "reinforce_pp_advantages"
    check_tensor(op, "token_rewards", token_rewards, ndim=2)
    check_mask(op, mask, token_rewards, "token_rewards")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"{op}: gamma must be a float in [0, 1], got {gamma!r}")
    dt = _compute_dtype(token_rewards)
    with torch.no_grad():
        r = token_rewards.detach()
        g, _ = compute_gae(r, torch.zeros_like(r), mask, gamma=float(gamma), lam=1.0, mask_mode="carry")
        returns = _per_token_mat(g.to(dt), mask)
        return _whiten(op, returns, mask), returns


def remax_advantages(
    token_rewards: torch.Tensor, baselines: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax: returns G_t = sum_{s >= t} m_s r_s (undiscounted reverse cumsum of the response
    rewards), A_t = G_t - b * m_t with b [B] the greedy rollout's score. For an outcome score at the
    last response token, G = s on every response token before it. token_rewards, mask [B, T];
    baselines [B]. Returns (advantages, returns), [B, T]."""
    op = "remax_advantages"
    check_tensor(op, "token_rewards", token_rewards, ndim=2)
    check_tensor(op, "baselines", baselines, ndim=1)
    check_mask(op, mask, token_rewards, "token_rewards")
    if baselines.shape[0] != token_rewards.shape[0] or baselines.device != token_rewards.device:
        raise ValueError(
            f"{op}: baselines has shape {tuple(baselines.shape)} on {baselines.device}; expected "
            f"[{token_rewards.shape[0]}] on {token_rewards.device}"
        )
    dt = _compute_dtype(token_rewards, baselines)
    with torch.no_grad():
        r = _per_token_mat(token_rewards.detach().to(dt), mask)
        returns = r.flip(-1).cumsum(-1).flip(-1)  # (B, T)
        return returns - _per_token(baselines.detach().to(dt), mask), returns
