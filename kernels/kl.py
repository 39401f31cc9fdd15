"""Per-token KL estimators: Triton forward/backward kernels, launchers and the pure-torch `kl_penalty_ref`.

r = logprob - ref_logprob. Kinds (verl's names, DESIGN "Op semantics"): k1 r, abs |r|, k2 r^2/2,
k3 clamp(exp(k) - k - 1, -10, 10) with k = clamp(-r, -20, 20), k1_nonneg clamp(r, min=0); a `+`
suffix keeps the value and takes k2's gradient (straight-through). The kernels compute in the output
dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlp_engine.op_names import KL_ALIASES
from rlp_engine.op_names import KL_BASE_KINDS as BASE_KINDS


def parse_kind(kind: str) -> tuple[int, bool]:
    """(base-kind code into BASE_KINDS, straight-through flag). k2+ is k2: its gradient already is k2's."""
    plus = kind.endswith("+")
    base = kind.rstrip("+")
    code = BASE_KINDS.index(KL_ALIASES.get(base, base))
    return code, plus and code != 2


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the dtype every kernel computes and returns in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _k3_parts(r: torch.Tensor):
    """k = clamp(-r, -20, 20), exp(k) and the unclamped estimate exp(k) - k - 1 (k3 = its clamp)."""
    k = torch.clamp(-r, min=-20, max=20)
    ek = torch.exp(k)
    return k, ek, ek - k - 1


def kl_value(r: torch.Tensor, kind: str) -> torch.Tensor:
    """The estimator's value at r = logprob - ref_logprob (a "+" suffix does not change it), as a
    differentiable torch expression: kl_penalty_ref and the fused-linear PPO loss both evaluate this."""
    base = BASE_KINDS[parse_kind(kind)[0]]
    if base == "k1":
        return r
    if base == "abs":
        return r.abs()
    if base == "k2":
        return 0.5 * r.square()
    if base == "k3":
        return torch.clamp(_k3_parts(r)[2], min=-10, max=10)
    return torch.clamp(r, min=0)


def kl_value_grad(r: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl_value(r, kind), its derivative in r) without autograd, for fused passes that form gradients
    themselves. The derivative follows torch autograd's conventions (clamp passes the gradient on its
    closed interval, abs has sign(r)), so it equals the gradient of kl_penalty_ref; "+" kinds: r."""
    code, plus = parse_kind(kind)
    base = BASE_KINDS[code]
    value = kl_value(r, kind)
    if plus or base == "k2":
        return value, r
    if base == "k1":
        return value, torch.ones_like(r)
    if base == "abs":
        return value, r.sign()
    if base == "k1_nonneg":
        return value, (r >= 0).to(r.dtype)
    _, ek, raw = _k3_parts(r)
    return value, -(ek - 1.0) * ((r.abs() <= 20.0) & (raw <= 10.0) & (raw >= -10.0))


def kl_penalty_ref(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Plain torch autograd composite as verl writes it, in fp32 (fp64 for fp64 inputs). Any shape."""
    dt = compute_dtype(logprob, ref_logprob)
    r = logprob.to(dt) - ref_logprob.to(dt)
    value = kl_value(r, kind)
    if not parse_kind(kind)[1]:
        return value
    k2 = 0.5 * r.square()
    return k2 - k2.detach() + value.detach()


@triton.jit
def _kl_value(r, KIND: tl.constexpr):
    if KIND == 0:
        v = r
    elif KIND == 1:
        v = tl.abs(r)
    elif KIND == 2:
        v = 0.5 * r * r
    elif KIND == 3:
        k = tl.minimum(tl.maximum(-r, -20.0), 20.0)
        v = tl.minimum(tl.exp(k) - k - 1.0, 10.0)  # exp(k) - k - 1 >= 0: the lower clamp never acts
    else:
        v = tl.maximum(r, 0.0)
    return v


@triton.jit
def _kl_dvalue(r, KIND: tl.constexpr, PLUS: tl.constexpr):
    # d value / d r with torch's conventions: clamp passes the gradient on its closed interval,
    # abs has gradient sign(r) (0 at 0).
    if PLUS or KIND == 2:
        d = r
    elif KIND == 0:
        d = tl.zeros_like(r) + 1.0
    elif KIND == 1:
        d = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    elif KIND == 3:
        k = -r
        ek = tl.exp(tl.minimum(tl.maximum(k, -20.0), 20.0))
        kc = tl.minimum(tl.maximum(k, -20.0), 20.0)
        inside = (k >= -20.0) & (k <= 20.0) & (ek - kc - 1.0 <= 10.0)
        d = tl.where(inside, 1.0 - ek, 0.0)
    else:
        d = tl.where(r >= 0, 1.0, 0.0)
    return d


@triton.jit
def _kl_fwd_kernel(lp_ptr, ref_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    cdt = out_ptr.dtype.element_ty
    r = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(cdt) - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(
        cdt
    )
    tl.store(out_ptr + offs, _kl_value(r, KIND).to(cdt), mask=ok)


@triton.jit
def _kl_bwd_kernel(
    g_ptr, lp_ptr, ref_ptr, out_ptr, n, KIND: tl.constexpr, PLUS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    cdt = out_ptr.dtype.element_ty
    r = tl.load(lp_ptr + offs, mask=ok, other=0.0).to(cdt) - tl.load(ref_ptr + offs, mask=ok, other=0.0).to(
        cdt
    )
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(cdt)
    tl.store(out_ptr + offs, (g * _kl_dvalue(r, KIND, PLUS)).to(cdt), mask=ok)


_BLOCK = 1024


def kl_penalty_forward(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str) -> torch.Tensor:
    """Estimator per token. Inputs: same shape, floating; output fp32 (fp64 for fp64 inputs)."""
    code, _ = parse_kind(kind)
    lp, ref = logprob.contiguous(), ref_logprob.contiguous()
    out = torch.empty(lp.shape, dtype=compute_dtype(lp, ref), device=lp.device)
    n = lp.numel()
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](lp, ref, out, n, KIND=code, BLOCK=_BLOCK)
    return out


def kl_penalty_backward(
    grad: torch.Tensor, logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str
) -> torch.Tensor:
    """grad * d value / d logprob (the gradient to ref_logprob is its negation), in the compute dtype."""
    code, plus = parse_kind(kind)
    lp, ref = logprob.contiguous(), ref_logprob.contiguous()
    out = torch.empty(lp.shape, dtype=compute_dtype(lp, ref), device=lp.device)
    n = lp.numel()
    if n:
        g = grad.contiguous()
        _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, lp, ref, out, n, KIND=code, PLUS=plus, BLOCK=_BLOCK)
    return out
