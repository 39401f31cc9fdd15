"""Token log-probs and entropy from logits (verl's `logprobs_from_logits` / `entropy_from_logits`,
fused). Semantics: ../DESIGN "Log-probs"; kernels: rlp_engine.kernels.logprobs (Triton + reference)
and csrc/logprobs.cpp (C++).

Labels outside [0, V) other than ignore_index raise ValueError on every backend and device
(`check_label_range`: one min/max reduction and one host sync per call, before any work).
"""

from __future__ import annotations

import torch

from rlp_engine.kernels.logprobs import logprobs_backward, logprobs_forward, logprobs_ref
from rlp_engine.ops._backend import cpp_available, cpp_ops, select
from rlp_engine.ops._checks import check_tensor

_LABEL_DTYPES = (torch.int64, torch.int32)


def _check_args(op: str, logits, labels, temperature) -> None:
    check_tensor(op, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"{op}: labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: labels has shape {tuple(labels.shape)} but logits has shape {tuple(logits.shape)}; "
            "expected labels.shape == logits.shape[:-1]"
        )
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels is on {labels.device} but logits is on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def check_label_range(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ValueError naming `op`, `labels` and the value when a label is outside [0, vocab) and is
    not ignore_index. A label out of range would otherwise give a plausible wrong number (chunked
    torch path), a C++ error that does not name the op, or NaN (Triton)."""
    if labels.numel() == 0:
        return
    y = labels.to(torch.int64)
    # one min/max reduction and one host sync per call (a few microseconds next to the [N, V] work);
    # ignored rows count as label 0
    lo, hi = torch.where(y == ignore_index, 0, y).aminmax()
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo < 0 or hi >= vocab:
        value = lo if lo < 0 else hi
        raise ValueError(
            f"{op}: labels: {value} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
        )


class _TritonLogprobs(torch.autograd.Function):
    """Triton forward/backward; saves logits, labels, lse and entropy (O(N) beyond the logits)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index):
        lp, ent, lse = logprobs_forward(logits, labels, temperature, ignore_index)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        dx = logprobs_backward(grad_lp, grad_ent, logits, labels, lse, ent, ctx.temperature, ctx.ignore_index)
        return dx, None, None, None


def _rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] logits and [...] labels -> contiguous [N, V] and int64 [N] (copies only when needed)."""
    x = logits.reshape(-1, logits.shape[-1]).contiguous()
    return x, labels.reshape(-1).to(torch.int64).contiguous()


def _dispatch(op, logits, labels, temperature, ignore_index, with_entropy):
    be = select(op, logits)
    if be == "torch":
        return logprobs_ref(logits, labels, temperature, ignore_index)
    x, y = _rows(logits, labels)
    if be == "cpp":
        lp, ent, _ = cpp_ops().logprobs_fwd(x, y, float(temperature), int(ignore_index), with_entropy)
    else:
        lp, ent = _TritonLogprobs.apply(x, y, float(temperature), int(ignore_index))
    return lp.view(labels.shape), ent.view(labels.shape)


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Log-probs of `labels` under softmax(logits / temperature), and optionally the entropy.

    logits [..., V] fp32/bf16/fp16; labels [...] int64 or int32. Returns fp32 logprobs [...], or
    (logprobs, entropy) when return_entropy. Rows whose label == ignore_index give 0 for both and no
    gradient. Differentiable in logits through both outputs (the gradient has the logits' dtype).
    """
    op = "logprobs_from_logits"
    _check_args(op, logits, labels, temperature)
    check_label_range(op, labels, logits.shape[-1], ignore_index)
    lp, ent = _dispatch(op, logits, labels, temperature, ignore_index, return_entropy)
    return (lp, ent) if return_entropy else lp


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row: logits [..., V] -> fp32 [...], differentiable."""
    op = "entropy_from_logits"
    check_tensor(op, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    # Label 0 is always in range; its log-prob is computed and dropped (its gradient is 0).
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return _dispatch(op, logits, labels, 1.0, -100, True)[1]


def _register_cpp_autograd() -> None:
    """Autograd and fake (meta) implementations for torch.ops.rlp.logprobs_fwd / logprobs_bwd."""

    @torch.library.register_fake("rlp::logprobs_fwd")
    def _(logits, labels, temperature, ignore_index, with_entropy):
        n = logits.shape[0]
        return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("rlp::logprobs_bwd")
    def _(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        logits, labels, temperature, ignore_index, with_entropy = inputs
        _, ent, lse = output
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.args = (temperature, ignore_index, with_entropy)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_lp, grad_ent, _grad_lse):
        logits, labels, lse, ent = ctx.saved_tensors
        temperature, ignore_index, with_entropy = ctx.args
        g_ent = grad_ent.float().contiguous() if with_entropy else None
        dx = torch.ops.rlp.logprobs_bwd(
            grad_lp.float().contiguous(), g_ent, logits, labels, lse, ent, temperature, ignore_index
        )
        return dx, None, None, None, None

    torch.library.register_autograd("rlp::logprobs_fwd", backward, setup_context=setup_context)


if cpp_available():
    _register_cpp_autograd()
