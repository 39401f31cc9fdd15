"""Token log-probs and entropy from logits: Triton kernels, their launchers, and the pure-torch
reference `logprobs_ref`.

Per row n (z = logits / temperature, y = label):
    logprob_n = z[y] - logsumexp(z)        entropy_n = logsumexp(z) - sum_v softmax(z)_v z_v
Rows whose label == ignore_index give 0 for both and no gradient.

The kernels walk vocab tiles with an online logsumexp that carries, relative to the running max m,
s = sum exp(z - m) and t = sum exp(z - m) (z - m). Then lse = m + log s and entropy = log s - t / s:
the entropy never subtracts two numbers of the size of the logits (lse - sum p z loses every digit
when the logits are about 1e4). Backward recomputes each tile's softmax from the saved lse:
    dlogits = (g_lp (onehot - p) - g_H p (log p + H)) / temperature
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Under the interpreter every tile is a numpy array: bigger tiles mean fewer Python iterations.
_TILE_ELEMS = 4096


def logprobs_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: logits [..., V] (any float dtype), labels [...] integer -> (logprob, entropy) [...],
    fp32 (fp64 when logits are fp64). Differentiable in logits through both outputs (torch autograd)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = labels != ignore_index
    # Ignored rows are zeroed first: NaN/inf there must reach neither the outputs nor the gradient.
    z = torch.where(valid.unsqueeze(-1), logits.to(acc), torch.zeros((), dtype=acc, device=logits.device))
    logp = torch.log_softmax(z / temperature, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    zero = torch.zeros((), dtype=acc, device=z.device)
    # p log p -> 0 where p == 0, also for -inf logits (top-k/top-p masked): log p is replaced before
    # the product, so neither the value nor its gradient meets 0 * -inf.
    ent = -(p * torch.where(p > 0, logp, zero)).sum(dim=-1)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    y_ptr,
    lp_ptr,
    ent_ptr,
    lse_ptr,
    n_rows,
    n_cols,
    stride_row,
    inv_t,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < n_cols)
    row_base = x_ptr + rows * stride_row  # [BLOCK_N] pointers, int64 offsets (N*V may pass 2**31)
    # A finite start for the running max keeps (m_old - m_new) * s finite on the first tile.
    m = tl.full((BLOCK_N,), -3.0e38, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(row_base[:, None] + cols[None, :], mask=ok, other=float("-inf"))
        z = x.to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = tl.where(ok, z - m_new[:, None], 0.0)  # padding would give 0 * -inf below
        e = tl.where(ok, tl.exp(d), 0.0)
        alpha = tl.exp(m - m_new)
        # d is clamped in e * d: a -inf logit has e = 0, and 0 * -inf would be nan.
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.maximum(d, -100.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    s = tl.where(s > 0, s, 1.0)  # only rows past n_rows (all masked) have s == 0
    log_s = tl.log(s)
    lse = m + log_s
    ent = log_s - t / s
    safe_y = tl.where(valid & in_range, y, 0)
    zy = tl.load(row_base + safe_y, mask=valid & in_range, other=0.0).to(tl.float32) * inv_t
    # Out-of-range labels cannot raise inside a GPU kernel without a host sync: they give NaN.
    lp = tl.where(in_range, zy - lse, float("nan"))
    tl.store(lp_ptr + rows, tl.where(valid, lp, 0.0), mask=row_ok)
    tl.store(ent_ptr + rows, tl.where(valid, ent, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr,
    y_ptr,
    lse_ptr,
    ent_ptr,
    g_lp_ptr,
    g_ent_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    stride_row,
    stride_dx,
    inv_t,
    ignore_index,
    HAS_G_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # Ignored rows get zero coefficients, so their gradient is exactly 0 (even for inf logits).
    g_lp = tl.where(valid, tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
    if HAS_G_ENT:
        g_h = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0), 0.0) * inv_t
        h = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + cols0
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :], mask=ok, other=0.0)
        # Padding columns get logp = -100 (p = 0): 0 - lse could overflow exp when lse < -88.
        logp = tl.where(ok, x.to(tl.float32) * inv_t - lse[:, None], -100.0)
        p = tl.exp(logp)
        onehot = cols[None, :] == y[:, None]
        g = g_lp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
        if HAS_G_ENT:
            g -= g_h[:, None] * p * (tl.maximum(logp, -100.0) + h[:, None])  # p = 0 at -inf logits
        g = tl.where(valid[:, None], g, 0.0)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], g.to(dx_ptr.dtype.element_ty), mask=ok)


def _blocks(n_cols: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V): a vocab tile of up to 4096 columns, and as many rows per program as fill
    a 4096-element tile when the vocab is small (V = 7 would otherwise waste most of each program)."""
    block_v = min(triton.next_power_of_2(max(n_cols, 1)), _TILE_ELEMS)
    block_n = max(1, min(64, _TILE_ELEMS // block_v))
    return block_n, block_v


def logprobs_forward(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, V] (unit column stride), labels [N] int64 -> (logprob, entropy, lse), each [N] fp32."""
    n, v = logits.shape
    out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if n == 0:
        return tuple(out)
    block_n, block_v = _blocks(v)
    grid = (triton.cdiv(n, block_n),)  # dim 0 allows 2**31 - 1 programs: N in the millions is fine
    _logprobs_fwd_kernel[grid](
        logits, labels, *out, n, v, logits.stride(0), 1.0 / temperature, ignore_index,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=8,
    )  # fmt: skip
    return tuple(out)


def logprobs_backward(
    grad_lp: torch.Tensor,
    grad_ent: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """dlogits [N, V] in logits' dtype from the upstream grads [N] (grad_ent None: no entropy term)."""
    n, v = logits.shape
    dx = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return dx
    block_n, block_v = _blocks(v)
    has_ent = grad_ent is not None
    g_ent = grad_ent.float().contiguous() if has_ent else grad_lp
    _logprobs_bwd_kernel[(triton.cdiv(n, block_n),)](
        logits, labels, lse, entropy, grad_lp.float().contiguous(), g_ent, dx, n, v,
        logits.stride(0), dx.stride(0), 1.0 / temperature, ignore_index,
        HAS_G_ENT=has_ent, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=8,
    )  # fmt: skip
    return dx
