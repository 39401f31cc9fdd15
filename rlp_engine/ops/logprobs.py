"""Token log-probs and entropy from logits (verl's `logprobs_from_logits` / `entropy_from_logits`,
fused). Semantics: ../DESIGN "Log-probs"; kernels: rlp_engine.kernels.logprobs (Triton + reference)
and csrc/logprobs.cpp (C++).

Labels outside [0, V) other than ignore_index raise on CPU (the C++ op checks them; the torch backend
checks them on CPU tensors only). On CUDA nothing is checked, because that would need a host sync:
the Triton kernel writes NaN log-probs for such rows instead.
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


def _check_label_range_cpu(op: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # CPU only: on CUDA `.any()` would sync the host with the device in the hot path.
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        value = int(labels[bad][0])
        raise ValueError(
            f"{op}: label {value} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
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
        _check_label_range_cpu(op, labels, logits.shape[-1], ignore_index)
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
