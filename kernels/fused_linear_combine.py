"""Combine of the fused LM-head forward's per-slice partials in one launch.

`_fwd_kernel` (kernels/fused_linear_logprobs.py) writes, for each of S vocab slices and each row n,
part[0] = m (max logit), part[1] = s = sum exp(z - m), part[2] = t = sum exp(z - m) z, part[3] = z[y]
(0 outside the label's slice): part is [4, S, N] fp32. Per row:

  top = max_s m,  w_s = exp(m_s - top),  total = sum_s s_s w_s,  lse = top + log(total),
  logprob = sum_s zy_s - lse,  entropy = lse - sum_s t_s w_s / total   (0 on ignored rows).

Written in torch this was about 15 small launches and [S, N] temporaries per forward; here one
program reads a block of rows of all four [S, N] planes (coalesced along N) and writes the three
[N] results. Predicted: 60-100 us less per forward call on H100 (about 5% of a N=1024, H=4096,
V=131072 bf16 forward, under 0.5% at N=16384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one [S, rows] plane per program: 4096 over 4 warps is 32 registers a plane a thread.
_TILE = 4096


@triton.jit
def _combine_kernel(
    part_ptr, y_ptr, lp_ptr, ent_ptr, lse_ptr, N, ignore_index,
    S: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr, HAS_ENT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    sl = tl.arange(0, BLOCK_S)
    both = (sl < S)[:, None] & ok[None, :]
    idx = sl.to(tl.int64)[:, None] * N + rows[None, :]  # [BLOCK_S, BLOCK] offsets in one plane
    m = tl.load(part_ptr + idx, mask=both, other=float("-inf"))
    s = tl.load(part_ptr + S * N + idx, mask=both, other=0.0)
    zy = tl.load(part_ptr + 3 * S * N + idx, mask=both, other=0.0)
    top = tl.max(m, axis=0)
    top = tl.where(ok, top, 0.0)  # rows past N (not stored): keep the arithmetic finite
    w = tl.where(both, tl.exp(m - top[None, :]), 0.0)
    total = tl.where(ok, tl.sum(s * w, axis=0), 1.0)
    lse = top + tl.log(total)
    y = tl.load(y_ptr + rows, mask=ok, other=ignore_index)
    keep = y != ignore_index
    tl.store(lse_ptr + rows, lse, mask=ok)
    tl.store(lp_ptr + rows, tl.where(keep, tl.sum(zy, axis=0) - lse, 0.0), mask=ok)
    if HAS_ENT:
        t = tl.load(part_ptr + 2 * S * N + idx, mask=both, other=0.0)
        ent = lse - tl.sum(t * w, axis=0) / total
        tl.store(ent_ptr + rows, tl.where(keep, ent, 0.0), mask=ok)


def combine_partials(part: torch.Tensor, labels: torch.Tensor, ignore_index: int, need_entropy: bool):
    """part [4, S, N] fp32 contiguous, labels [N] int64 -> (logprob [N], entropy [N] | None, lse [N])."""
    _, n_slices, n = part.shape
    lp, lse = (torch.empty(n, dtype=torch.float32, device=part.device) for _ in range(2))
    ent = torch.empty_like(lse) if need_entropy else None
    if n == 0:
        return lp, ent, lse
    block_s = triton.next_power_of_2(n_slices)
    block = max(1, min(_TILE // block_s, triton.next_power_of_2(n)))
    _combine_kernel[(triton.cdiv(n, block),)](
        part, labels, lp, lse if ent is None else ent, lse, n, ignore_index,
        S=n_slices, BLOCK_S=block_s, BLOCK=block, HAS_ENT=need_entropy, num_warps=4,
    )  # fmt: skip
    return lp, ent, lse
