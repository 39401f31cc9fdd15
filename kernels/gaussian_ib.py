"""Symmetric KL between two diagonal Gaussians (the RLP-UML information bottleneck): Triton kernels,
their launchers, and the pure-torch reference `gaussian_skl_ref`.

Per row (sum over the last dim D), with s^2 = exp(logvar), delta = mu1 - mu2, dl = logvar1 - logvar2:
    SKL = 1/4 sum_d [ (s1^2 + delta^2) / s2^2 + (s2^2 + delta^2) / s1^2 - 2 ]
        = 1/4 sum_d [ (exp(dl/2) - exp(-dl/2))^2 + delta^2 (exp(-logvar1) + exp(-logvar2)) ]
The second form has no "a + 1/a - 2" cancellation when the variances are close. Gradients:
    d/dmu1 = -d/dmu2 = delta / 2 (exp(-logvar1) + exp(-logvar2))
    d/dlogvar1 = 1/4 (exp(dl) - exp(-dl) - delta^2 exp(-logvar1))
    d/dlogvar2 = 1/4 (exp(-dl) - exp(dl) - delta^2 exp(-logvar2))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMS = 4096


def gaussian_skl_ref(
    mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Reference: four [..., D] tensors -> SKL [...], fp32 (fp64 when any input is fp64).
    Differentiable in all four inputs (torch autograd)."""
    fp64 = any(t.dtype == torch.float64 for t in (mu1, logvar1, mu2, logvar2))
    acc = torch.float64 if fp64 else torch.float32
    m1, l1, m2, l2 = (t.to(acc) for t in (mu1, logvar1, mu2, logvar2))
    delta2 = (m1 - m2) ** 2
    h = torch.exp((l1 - l2) / 2)
    term = (h - 1 / h) ** 2 + delta2 * (torch.exp(-l1) + torch.exp(-l2))
    return 0.25 * term.sum(dim=-1)


@triton.jit
def _skl_fwd_kernel(
    m1_ptr, l1_ptr, m2_ptr, l2_ptr, out_ptr, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        m1 = tl.load(m1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        l1 = tl.load(l1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m2 = tl.load(m2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        l2 = tl.load(l2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        delta = m1 - m2
        h = tl.exp((l1 - l2) * 0.5)
        diff = h - 1.0 / h
        term = diff * diff + delta * delta * (tl.exp(-l1) + tl.exp(-l2))
        acc += tl.sum(tl.where(ok, term, 0.0), axis=1)
    tl.store(out_ptr + rows, 0.25 * acc, mask=row_ok)


@triton.jit
def _skl_bwd_kernel(
    g_ptr, m1_ptr, l1_ptr, m2_ptr, l2_ptr, dm1_ptr, dl1_ptr, dm2_ptr, dl2_ptr, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)[:, None]
    for start in range(0, n_cols, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        m1 = tl.load(m1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        l1 = tl.load(l1_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        m2 = tl.load(m2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        l2 = tl.load(l2_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        delta = m1 - m2
        inv1 = tl.exp(-l1)
        inv2 = tl.exp(-l2)
        a = tl.exp(l1 - l2)
        dm1 = g * 0.5 * delta * (inv1 + inv2)
        dl1 = g * 0.25 * (a - 1.0 / a - delta * delta * inv1)
        dl2 = g * 0.25 * (1.0 / a - a - delta * delta * inv2)
        tl.store(dm1_ptr + offs, dm1.to(dm1_ptr.dtype.element_ty), mask=ok)
        tl.store(dm2_ptr + offs, (-dm1).to(dm2_ptr.dtype.element_ty), mask=ok)
        tl.store(dl1_ptr + offs, dl1.to(dl1_ptr.dtype.element_ty), mask=ok)
        tl.store(dl2_ptr + offs, dl2.to(dl2_ptr.dtype.element_ty), mask=ok)


def _blocks(n_cols: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(max(n_cols, 1)), _TILE_ELEMS)
    return max(1, min(128, _TILE_ELEMS // block_d)), block_d


def gaussian_skl_forward(mu1, logvar1, mu2, logvar2) -> torch.Tensor:
    """Four contiguous [M, D] tensors of one dtype -> SKL [M] fp32."""
    m, d = mu1.shape
    out = torch.empty(m, dtype=torch.float32, device=mu1.device)
    if m == 0:
        return out
    block_m, block_d = _blocks(d)
    _skl_fwd_kernel[(triton.cdiv(m, block_m),)](
        mu1, logvar1, mu2, logvar2, out, m, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4
    )
    return out


def gaussian_skl_backward(grad, mu1, logvar1, mu2, logvar2) -> tuple[torch.Tensor, ...]:
    """Upstream grad [M] and the four [M, D] inputs -> their four gradients (inputs' dtype)."""
    m, d = mu1.shape
    grads = tuple(torch.empty_like(t) for t in (mu1, logvar1, mu2, logvar2))
    if m == 0:
        return grads
    block_m, block_d = _blocks(d)
    _skl_bwd_kernel[(triton.cdiv(m, block_m),)](
        grad.float().contiguous(), mu1, logvar1, mu2, logvar2, *grads, m, d,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return grads
