"""GAE (generalised advantage estimation) as a parallel scan over time, and its time-loop reference.

Recurrence (reverse over t; DESIGN "Op semantics"), with V', r' = V, r zeroed where m == 0 (by `where`,
so NaN/inf outside the mask never leaks in):

  carry (verl):   N_t = (1 - m_t) N_{t+1} + m_t V'_t                      (the carried next value)
                  G_t = (m_t g l + 1 - m_t) G_{t+1} + m_t g N_{t+1} + m_t (r'_t - V'_t)
  zero (OpenRLHF, TRL, V' r' also scaled by m):
                  G_t = g l G_{t+1} + r'_t + g V'_{t+1} - V'_t

(g = gamma, l = lam, G_T = N_T = 0). Each step is an affine map of the state: in "carry" the state
(G, N) goes through x -> A_t x + c_t with A_t = [[alpha, beta], [0, delta]] upper triangular, so
the step is five numbers (alpha, beta, delta, cg, cn); in "zero" it is the scalar pair (a, b).
Affine maps compose associatively, so each chunk of BLOCK_T steps is one `tl.associative_scan`
(reverse=True), and the state at the chunk's first step is carried into the chunk before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def gae_ref(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask_mode: str = "carry",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time-loop GAE in the inputs' dtype (float64 for references). [B, T] x3 -> (adv, ret) [B, T].

    The same loop as verl's compute_gae_advantage_return ("carry", unwhitened) and OpenRLHF's
    get_advantages_and_returns ("zero"), except that masked-out r and V are replaced with `where`.
    """
    dtype = torch.promote_types(token_rewards.dtype, values.dtype)
    m = mask.to(dtype)
    on = mask != 0
    zero = torch.zeros((), dtype=dtype, device=values.device)
    r = torch.where(on, token_rewards.to(dtype), zero)
    v = torch.where(on, values.to(dtype), zero)
    if mask_mode == "zero":
        r, v = r * m, v * m
    B, T = v.shape
    adv = torch.empty(B, T, dtype=dtype, device=v.device)
    nextvalues = torch.zeros(B, dtype=dtype, device=v.device)
    lastgaelam = torch.zeros(B, dtype=dtype, device=v.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nextvalues - v[:, t]
        new = delta + gamma * lam * lastgaelam
        if mask_mode == "carry":
            nextvalues = v[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
            lastgaelam = new * m[:, t] + (1 - m[:, t]) * lastgaelam
        else:
            nextvalues = v[:, t]
            lastgaelam = new
        adv[:, t] = lastgaelam
    returns = adv + (values.to(dtype) if mask_mode == "carry" else v)
    return adv, returns


@triton.jit
def _affine_combine(a_l, b_l, a_r, b_r):
    # A reverse scan calls combine(acc, x) with acc the composite of the later steps (Triton flips,
    # scans forward and flips back), so the result is x o acc: y -> a_r (a_l y + b_l) + b_r.
    return a_r * a_l, a_r * b_l + b_r


@triton.jit
def _triangular_combine(al_l, be_l, de_l, cg_l, cn_l, al_r, be_r, de_r, cg_r, cn_r):
    # Composition R o L of x -> [[al, be], [0, de]] x + (cg, cn), L being the later steps.
    return (
        al_r * al_l,
        al_r * be_l + be_r * de_l,
        de_r * de_l,
        al_r * cg_l + be_r * cn_l + cg_r,
        de_r * cn_l + cn_r,
    )


@triton.jit
def _gae_kernel(
    r_ptr,
    v_ptr,
    m_ptr,
    adv_ptr,
    ret_ptr,
    B,
    T,
    gamma,
    lam,
    CARRY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    base = rows * T  # int64: B * T may pass 2**31
    cols = tl.arange(0, BLOCK_T)
    gl = gamma * lam
    g_carry = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_carry = tl.zeros([BLOCK_B], dtype=tl.float32)
    # Chunks aligned to t = 0, walked from the last (possibly partial) one to the first.
    n_chunks = tl.cdiv(T, BLOCK_T)
    for k in range(n_chunks):
        t = (n_chunks - 1 - k) * BLOCK_T + cols
        ok = row_ok[:, None] & (t < T)[None, :]
        offs = base[:, None] + t[None, :]
        m = tl.load(m_ptr + offs, mask=ok, other=0).to(tl.float32)
        on = m != 0
        r = tl.where(on, tl.load(r_ptr + offs, mask=ok, other=0).to(tl.float32), 0.0)
        v_raw = tl.load(v_ptr + offs, mask=ok, other=0).to(tl.float32)
        v = tl.where(on, v_raw, 0.0)
        if CARRY:
            # Steps past T and masked-out steps are the identity map (alpha = delta = 1, rest 0).
            al = m * gl + (1.0 - m)
            be = m * gamma
            de = 1.0 - m
            cg = m * (r - v)
            cn = m * v
            al, be, de, cg, cn = tl.associative_scan(
                (al, be, de, cg, cn), axis=1, combine_fn=_triangular_combine, reverse=True
            )
            g = al * g_carry[:, None] + be * n_carry[:, None] + cg
            n = de * n_carry[:, None] + cn
            n_carry = tl.sum(tl.where(cols[None, :] == 0, n, 0.0), axis=1)
            ret = g + v_raw
        else:
            ok1 = row_ok[:, None] & (t + 1 < T)[None, :]
            m1 = tl.load(m_ptr + offs + 1, mask=ok1, other=0).to(tl.float32)
            v1 = tl.where(m1 != 0, tl.load(v_ptr + offs + 1, mask=ok1, other=0).to(tl.float32), 0.0)
            r = r * m
            v = v * m
            a = tl.where(ok, gl, 1.0)
            b = tl.where(ok, r + gamma * (v1 * m1) - v, 0.0)
            a, b = tl.associative_scan((a, b), axis=1, combine_fn=_affine_combine, reverse=True)
            g = a * g_carry[:, None] + b
            ret = g + v
        g_carry = tl.sum(tl.where(cols[None, :] == 0, g, 0.0), axis=1)
        tl.store(adv_ptr + offs, g, mask=ok)
        tl.store(ret_ptr + offs, ret, mask=ok)


def _blocks(B: int, T: int, block_t: int | None) -> tuple[int, int]:
    # A chunk of up to 1024 steps per row; short rows are packed several to a program so that each
    # program still scans about 1024 elements (a scan step is a few FLOPs: keep programs busy).
    if block_t is None:
        block_t = min(triton.next_power_of_2(max(T, 1)), 1024)
    block_b = min(max(1024 // block_t, 1), triton.next_power_of_2(max(B, 1)))
    return block_b, block_t


def gae_forward(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    carry: bool,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the scan. Contiguous [B, T] inputs (any float dtype; mask bool/int/float), fp32
    outputs (advantages, returns); computed in fp32. `block_t` (a power of two) overrides the
    chunk length, e.g. to test the carry between chunks on short rows."""
    B, T = values.shape
    adv = torch.empty(B, T, dtype=torch.float32, device=values.device)
    ret = torch.empty_like(adv)
    if B * T == 0:
        return adv, ret
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # loads as 0/1 bytes
    block_b, block_t = _blocks(B, T, block_t)
    grid = (triton.cdiv(B, block_b),)  # grid dim 0 allows 2**31 - 1 programs
    _gae_kernel[grid](
        token_rewards,
        values,
        mask,
        adv,
        ret,
        B,
        T,
        float(gamma),
        float(lam),
        CARRY=carry,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
    )
    return adv, ret
