"""Information-bottleneck pieces of RLP-UML (../DESIGN "Information bottleneck"): the closed-form
symmetric KL between two diagonal Gaussians (fused kernels: rlp_engine.kernels.gaussian_ib and
csrc/gaussian_ib.cpp), the Jensen-Shannon mutual-information lower bound, and the multi-view loss
L_M = -I_JSD + beta * SKL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlp_engine.kernels.gaussian_ib import gaussian_skl_backward, gaussian_skl_forward, gaussian_skl_ref
from rlp_engine.ops._backend import cpp_available, cpp_ops, select
from rlp_engine.ops._checks import check_same_shape, check_tensor


def _check_gaussians(op: str, mu1, logvar1, mu2, logvar2) -> None:
    named = {"mu1": mu1, "logvar1": logvar1, "mu2": mu2, "logvar2": logvar2}
    for name, t in named.items():
        check_tensor(op, name, t)
    if mu1.dim() < 1 or mu1.shape[-1] < 1:
        raise ValueError(f"{op}: mu1 must be [..., D] with D >= 1, got shape {tuple(mu1.shape)}")
    check_same_shape(op, "mu1", mu1, logvar1=logvar1, mu2=mu2, logvar2=logvar2)
    for name, t in named.items():
        if t.dtype != mu1.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but mu1 has dtype {mu1.dtype}")


class _TritonSKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu1, logvar1, mu2, logvar2):
        ctx.save_for_backward(mu1, logvar1, mu2, logvar2)
        return gaussian_skl_forward(mu1, logvar1, mu2, logvar2)

    @staticmethod
    def backward(ctx, grad):
        return gaussian_skl_backward(grad, *ctx.saved_tensors)


def gaussian_symmetric_kl(
    mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Symmetric KL (the mean of KL(1||2) and KL(2||1)) between N(mu1, exp(logvar1)) and
    N(mu2, exp(logvar2)), diagonal, summed over the last dim: four [..., D] tensors of one float
    dtype -> fp32 [...]. Differentiable in all four inputs (gradients in the inputs' dtype)."""
    op = "gaussian_symmetric_kl"
    _check_gaussians(op, mu1, logvar1, mu2, logvar2)
    be = select(op, mu1)
    if be == "torch":
        # the reference computes in the inputs' dtype (fp64 for the tests); the op's result is fp32
        return gaussian_skl_ref(mu1, logvar1, mu2, logvar2).float()
    lead, d = mu1.shape[:-1], mu1.shape[-1]
    rows = [t.reshape(-1, d).contiguous() for t in (mu1, logvar1, mu2, logvar2)]
    out = cpp_ops().gaussian_skl_fwd(*rows) if be == "cpp" else _TritonSKL.apply(*rows)
    return out.view(lead)


def jsd_mi_lower_bound(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon lower bound on mutual information from critic scores:
    mean(-softplus(-scores_pos)) - mean(softplus(scores_neg)). Any shapes (each non-empty) ->
    fp32 scalar. softplus is torch's (linear above 20), stable for large |scores|."""
    op = "jsd_mi_lower_bound"
    check_tensor(op, "scores_pos", scores_pos)
    check_tensor(op, "scores_neg", scores_neg)
    for name, t in (("scores_pos", scores_pos), ("scores_neg", scores_neg)):
        if t.numel() == 0:
            raise ValueError(f"{op}: {name} is empty; the bound needs at least one score")
    return (-F.softplus(-scores_pos.float())).mean() - F.softplus(scores_neg.float()).mean()


def _critic_scores(op: str, critic, z1: torch.Tensor, z2: torch.Tensor, what: str) -> torch.Tensor:
    scores = critic(z1, z2)
    if not isinstance(scores, torch.Tensor) or scores.numel() != z1.shape[0]:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{op}: critic must return {z1.shape[0]} scores for the {what} pairs, got {shape}")
    return scores.reshape(-1)


def _critic_matrix(op: str, critic, critic_matrix, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """S [N, N] with S[i, j] = T(z1[i], z2[j]): one `critic_matrix` call, or else one `critic` call
    on the N^2 pairs laid out row-major (any pairwise critic; N^2 x D memory)."""
    n = z1.shape[0]
    if critic_matrix is None:
        scores = _critic_scores(op, critic, z1.repeat_interleave(n, 0), z2.repeat(n, 1), f"{n} x {n}")
        return scores.view(n, n)
    scores = critic_matrix(z1, z2)
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n, n):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{op}: critic_matrix must return a ({n}, {n}) score matrix, got {shape}")
    return scores


NEGATIVES = ("all", "roll")


def multiview_ib_loss(
    mu1: torch.Tensor,
    logvar1: torch.Tensor,
    mu2: torch.Tensor,
    logvar2: torch.Tensor,
    critic,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    negatives: str = "all",
    critic_matrix=None,
):
    """RLP-UML's multi-view information-bottleneck loss L_M = -I_JSD(z1; z2) + beta * mean(SKL).

    mu*, logvar* [N, D] (N >= 2): the two views' diagonal-Gaussian posteriors. z_i = mu_i +
    exp(logvar_i / 2) * eps_i with eps ~ N(0, I) drawn from `generator` (reparameterised, so the
    loss is differentiable in all four). `critic(z1, z2)` -> [N] scores of row-aligned pairs.
    Positives pair row n of z1 with row n of z2. Negatives:
      "all" (default): z1[i] against every z2[j], j != i: N(N-1) negatives, the critic evaluated as
        an [N, N] matrix S[i, j] = T(z1[i], z2[j]) (positives on the diagonal). `critic_matrix(z1,
        z2) -> [N, N]` computes it in one call (a separable critic: g(z1) @ g(z2).T); without it,
        `critic` is called once on the N^2 pairs (z1.repeat_interleave(N), z2.repeat(N)).
      "roll": z1[n] against z2[n - 1] (one negative per sample; the op's original behaviour).
    Both keep the JSD bound: mean over positives of -softplus(-T) minus mean over negatives of
    softplus(T). Returns (loss, metrics) with metrics {"mi": I_JSD, "skl": mean SKL} as detached
    0-dim fp32 tensors (no host sync).
    """
    op = "multiview_ib_loss"
    _check_gaussians(op, mu1, logvar1, mu2, logvar2)
    if mu1.dim() != 2:
        raise ValueError(f"{op}: mu1 must be [N, D], got shape {tuple(mu1.shape)}")
    if mu1.shape[0] < 2:
        raise ValueError(f"{op}: needs N >= 2 samples to form negatives, got N = {mu1.shape[0]}")
    if not callable(critic):
        raise TypeError(f"{op}: critic must be callable, got {type(critic).__name__}")
    if negatives not in NEGATIVES:
        raise ValueError(f"{op}: unknown negatives {negatives!r}; expected one of {NEGATIVES}")
    if critic_matrix is not None and not callable(critic_matrix):
        raise TypeError(f"{op}: critic_matrix must be callable, got {type(critic_matrix).__name__}")
    eps1 = torch.randn(mu1.shape, generator=generator, dtype=mu1.dtype, device=mu1.device)
    eps2 = torch.randn(mu2.shape, generator=generator, dtype=mu2.dtype, device=mu2.device)
    z1 = mu1 + torch.exp(0.5 * logvar1) * eps1
    z2 = mu2 + torch.exp(0.5 * logvar2) * eps2
    if negatives == "roll":
        pos = _critic_scores(op, critic, z1, z2, "positive")
        neg = _critic_scores(op, critic, z1, torch.roll(z2, 1, dims=0), "negative")
    else:
        scores = _critic_matrix(op, critic, critic_matrix, z1, z2)  # [N, N]
        eye = torch.eye(z1.shape[0], dtype=torch.bool, device=scores.device)
        pos, neg = scores.diagonal(), scores[~eye]
    mi = jsd_mi_lower_bound(pos, neg)
    skl = gaussian_symmetric_kl(mu1, logvar1, mu2, logvar2).mean()
    loss = -mi + beta * skl
    return loss, {"mi": mi.detach(), "skl": skl.detach()}


def _register_cpp_autograd() -> None:
    """Autograd and fake implementations for torch.ops.rlp.gaussian_skl_fwd / gaussian_skl_bwd."""

    @torch.library.register_fake("rlp::gaussian_skl_fwd")
    def _(mu1, logvar1, mu2, logvar2):
        return mu1.new_empty(mu1.shape[0], dtype=torch.float32)

    @torch.library.register_fake("rlp::gaussian_skl_bwd")
    def _(grad, mu1, logvar1, mu2, logvar2):
        return tuple(torch.empty_like(t) for t in (mu1, logvar1, mu2, logvar2))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        return tuple(torch.ops.rlp.gaussian_skl_bwd(grad.float().contiguous(), *ctx.saved_tensors))

    torch.library.register_autograd("rlp::gaussian_skl_fwd", backward, setup_context=setup_context)


if cpp_available():
    _register_cpp_autograd()
