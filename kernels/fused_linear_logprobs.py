"""Fused LM-head log-probs and entropy: logprob_n = z_n[y_n] - logsumexp(z_n), entropy_n =
logsumexp(z_n) - sum_v softmax(z_n)_v z_n[v], with z = (h W^T + b) / temperature, without ever
holding the [N, V] logits.

Three implementations with one interface (`*_forward`, `*_backward`, `*_fused_pass`):
- Triton (GPU; CPU under TRITON_INTERPRET=1): the forward is a matmul whose epilogue is an online
  logsumexp; each program owns a block of rows and one slice of the vocab and writes per-row partial
  (max, sum exp, sum exp*z, z[y]), combined over the slices by one small kernel
  (kernels/fused_linear_combine.py). The backward recomputes logit tiles and writes dz = g_lp
  (onehot - p) - g_H p (log p + H) for a chunk of rows into a [C, V] buffer; grad_hidden = dz W and
  grad_weight += dz^T h run as cuBLAS GEMMs (fusing them means a read-modify-write of a [BLOCK, H]
  fp32 slab per tile, ~0.5 TB at N=16k V=131k, vs writing dz once, N V 2 B = 4 GB in bf16).
- Chunked torch (the CPU path, also any device): forward and backward walk [R, Vc] tiles (all rows
  while the scratch budget leaves >= 256 vocab columns) with an online logsumexp across vocab chunks,
  so the GEMMs keep a large M and grad_weight is written once per row block. The fused pass (row
  gradients known as soon as a row's log-prob is, as in a PPO loss) takes rows in chunks of the full
  vocab and differentiates from the logits in hand: 3 GEMMs instead of 4.
- `fused_linear_logprobs_ref`: plain materialising torch, float64-capable (tests only).

Conventions: labels equal to `ignore_index` give logprob 0, entropy 0 and no gradient. Row gradients
g_lp, g_ent [N] passed to the backward must already be 0 on ignored rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlp_engine.kernels.fused_linear_combine import combine_partials

# Bytes per [C, V] scratch buffer (CPU: one or two; GPU: one dz buffer). CPU 32 MiB (256 rows of a 32k
# vocab): peak memory near a tenth of the materialising path's, GEMMs at most of their rate; GPU 1 GiB
# (4096 rows of a 131k vocab in bf16): full-rate GEMMs.
CPU_SCRATCH_BYTES = 32 << 20
GPU_SCRATCH_BYTES = 1 << 30


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(n_rows: int, vocab: int, bytes_per_row_elem: int, device: torch.device) -> int:
    """Rows per chunk so that the [C, V] scratch stays within the device's budget (at least 1)."""
    budget = GPU_SCRATCH_BYTES if device.type == "cuda" else CPU_SCRATCH_BYTES
    return max(1, min(n_rows, budget // max(1, vocab * bytes_per_row_elem)))


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def fused_linear_logprobs_ref(
    hidden, weight, labels, temperature=1.0, bias=None, return_entropy=False, ignore_index=-100
):
    """Materialising reference. hidden [..., H], weight [V, H], bias [V] | None, labels [...] int64.
    Computes in fp32 (fp64 for fp64 inputs); returns logprob [...] (and entropy [...])."""
    dt = _compute_dtype(hidden.dtype)
    b = None if bias is None else bias.to(dt)
    logp = torch.nn.functional.linear(hidden.to(dt), weight.to(dt), b).div(temperature).log_softmax(-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    zero = torch.zeros((), dtype=dt, device=hidden.device)
    lp = torch.where(ignored, zero, logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1))
    if not return_entropy:
        return lp
    ent = torch.where(ignored, zero, -(logp.exp() * logp).sum(-1))
    return lp, ent


# ----------------------------------------------------------------------------------------------
# Chunked torch (CPU path)
# ----------------------------------------------------------------------------------------------


def _chunk_logits(h, weight, bias, inv_t, out):
    """out[C, V] (fp32/fp64) = (h W^T + b) * inv_t, written in place (no [C, V] allocation for fp32)."""
    if h.dtype == out.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:  # bf16/fp16 GEMM (fp32 accumulation inside), widened once
        out.copy_(torch.nn.functional.linear(h, weight, bias))
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _row_dot(a, b):
    """sum(a * b, dim=1) without a [C, V] temporary (a batched GEMV)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _shifted_exp(z, e):
    """z -= rowmax, e = exp(z); returns (rowmax, sum e) as [C, 1]."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    torch.exp(z, out=e)
    return m, e.sum(dim=1, keepdim=True)


def _chunk_dlogits(logp, p, safe, ent, g_lp, g_ent, inv_t):
    """dz/temperature = (g_lp (onehot - p) - g_ent p (log p + H)) * inv_t, in place over logp."""
    if g_ent is None:  # p's buffer becomes dz; logp may be None
        dz = p.mul_((-inv_t * g_lp).unsqueeze(1))
    else:
        dz = logp.add_(ent.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(g_lp.unsqueeze(1))
        dz.mul_(p).mul_(-inv_t)
    return dz.scatter_add_(1, safe.unsqueeze(1), (inv_t * g_lp).unsqueeze(1))


class _Grads:
    """Accumulators of the chunked backward: grad_hidden rows, fp32 grad_weight and grad_bias."""

    def __init__(self, hidden, weight, bias, dt):
        self.gh = torch.empty_like(hidden)
        self.gw = torch.zeros(weight.shape, dtype=dt, device=weight.device)
        self.gb = None if bias is None else torch.zeros(bias.shape, dtype=dt, device=bias.device)

    def add(self, s, e, h, weight, dz):
        low = dz.to(weight.dtype) if weight.dtype != dz.dtype else dz
        torch.mm(low, weight, out=self.gh[s:e])
        self.gw.addmm_(dz.t(), h.to(dz.dtype))  # fp32 accumulation over chunks
        if self.gb is not None:
            self.gb.add_(dz.sum(dim=0))

    def result(self, weight, bias):
        gb = None if self.gb is None else self.gb.to(bias.dtype)
        return self.gh, self.gw.to(weight.dtype), gb


def _scratch(n, vocab, hidden, n_buffers):
    """Rows per chunk and `n_buffers` [C, V] fp32 (fp64) buffers, reused by every chunk (a fresh
    32 MB allocation per chunk would page-fault its way in each time)."""
    dt = _compute_dtype(hidden.dtype)
    c = rows_per_chunk(n, vocab, torch.finfo(dt).bits // 8, hidden.device)
    return c, [torch.empty(c, vocab, dtype=dt, device=hidden.device) for _ in range(n_buffers)]


def _tiles(n, vocab, hidden):
    """(rows R, columns Vc) of the [R, Vc] scratch tiles of the chunked forward and backward: all the
    rows when the budget still leaves >= 256 columns, so every GEMM has a large M (or K) and
    grad_weight is written once per row block; measured on 2 cores, 256-row chunks of the full vocab
    ran the GEMMs at about half the rate of 4096-row ones."""
    elem = torch.finfo(_compute_dtype(hidden.dtype)).bits // 8
    budget = (GPU_SCRATCH_BYTES if hidden.device.type == "cuda" else CPU_SCRATCH_BYTES) // elem
    vc = min(vocab, max(256, budget // max(n, 1)))
    return max(1, min(n, budget // vc)), vc


def _local(labels, v0, c):
    """Column of each row's label inside vocab columns [v0, v0 + c) (clamped) and whether it is there."""
    idx = labels - v0
    hit = (idx >= 0) & (idx < c)
    return idx.clamp(0, c - 1).unsqueeze(1), hit


def _tile(buf, r, c):
    return buf[: r * c].view(r, c)  # contiguous, so GEMMs can write into it


def chunked_forward(hidden, weight, bias, labels, inv_t, ignore_index, need_entropy):
    """hidden [N, H], weight [V, H], labels [N] -> (logprob [N], entropy [N] | None, lse [N]).
    Online logsumexp over vocab chunks of each row block; one [R, Vc] buffer (two with entropy)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, vc = _tiles(n, vocab, hidden)
    dt = _compute_dtype(hidden.dtype)
    bufs = [torch.empty(rows * vc, dtype=dt, device=hidden.device) for _ in range(1 + need_entropy)]
    lse, lp = (torch.empty(n, dtype=dt, device=hidden.device) for _ in range(2))
    ent = torch.empty_like(lse) if need_entropy else None
    for r0 in range(0, n, rows):
        sl = slice(r0, min(n, r0 + rows))
        h, y, r = hidden[sl], labels[sl], min(rows, n - r0)
        m = torch.full((r,), float("-inf"), dtype=dt, device=hidden.device)
        s, t, zy = (torch.zeros(r, dtype=dt, device=hidden.device) for _ in range(3))
        for v0 in range(0, vocab, vc):
            c = min(vc, vocab - v0)
            b = None if bias is None else bias[v0 : v0 + c]
            z = _chunk_logits(h, weight[v0 : v0 + c], b, inv_t, _tile(bufs[0], r, c))
            idx, hit = _local(y, v0, c)
            zy += torch.where(hit, z.gather(1, idx).squeeze(1), 0.0)
            m_new = torch.maximum(m, z.amax(dim=1))
            alpha = torch.exp(m - m_new)
            z.sub_(m_new.unsqueeze(1))
            e = torch.exp(z, out=_tile(bufs[1], r, c)) if need_entropy else z.exp_()
            e_sum = e.sum(dim=1)
            if need_entropy:  # t = sum exp(z - m) z, rescaled like s
                t = t * alpha + _row_dot(e, z) + m_new * e_sum
            s = s * alpha + e_sum
            m = m_new
        lse[sl] = m + s.log()
        lp[sl] = zy - lse[sl]
        if need_entropy:
            ent[sl] = lse[sl] - t / s
    ignored = labels == ignore_index
    lp.masked_fill_(ignored, 0.0)
    if need_entropy:
        ent.masked_fill_(ignored, 0.0)
    return lp, ent, lse


def chunked_backward(hidden, weight, bias, labels, lse, ent, g_lp, g_ent, inv_t, ignore_index):
    """Recomputes [R, Vc] logit tiles; per tile grad_weight[Vc] += dz^T h and grad_hidden[R] += dz W[Vc]
    (fp32 accumulators; bf16 operands widened per tile). Returns (grad_hidden, grad_weight, grad_bias)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows, vc = _tiles(n, vocab, hidden)
    dt = _compute_dtype(hidden.dtype)
    bufs = [torch.empty(rows * vc, dtype=dt, device=hidden.device) for _ in range(1 + (g_ent is not None))]
    gh = torch.empty_like(hidden)
    gw = torch.zeros(weight.shape, dtype=dt, device=weight.device)
    gb = None if bias is None else torch.zeros(vocab, dtype=dt, device=weight.device)
    for r0 in range(0, n, rows):
        sl = slice(r0, min(n, r0 + rows))
        h, y, r = hidden[sl], labels[sl], min(rows, n - r0)
        h_acc, gh_acc = h.to(dt), torch.zeros(r, hidden.shape[1], dtype=dt, device=hidden.device)
        a = g_lp[sl] * inv_t
        for v0 in range(0, vocab, vc):
            c = min(vc, vocab - v0)
            w = weight[v0 : v0 + c]
            b = None if bias is None else bias[v0 : v0 + c]
            logp = _chunk_logits(h, w, b, inv_t, _tile(bufs[0], r, c)).sub_(lse[sl].unsqueeze(1))
            if g_ent is None:  # dz = -a p + a onehot, in p's buffer
                dz = logp.exp_().mul_(-a.unsqueeze(1))
            else:  # dz = -p (a + g_ent/T (log p + H)) + a onehot
                p = torch.exp(logp, out=_tile(bufs[1], r, c))
                dz = logp.add_(ent[sl].unsqueeze(1)).mul_((g_ent[sl] * inv_t).unsqueeze(1))
                dz = dz.add_(a.unsqueeze(1)).mul_(p).neg_()
            idx, hit = _local(y, v0, c)
            dz.scatter_add_(1, idx, torch.where(hit, a, 0.0).unsqueeze(1))
            gh_acc.addmm_(dz, w.to(dt))
            gw[v0 : v0 + c].addmm_(dz.t(), h_acc)
            if gb is not None:
                gb[v0 : v0 + c] += dz.sum(dim=0)
        gh[sl] = gh_acc
    return gh, gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype)


def chunked_fused_pass(hidden, weight, bias, labels, inv_t, ignore_index, row_grads):
    """One pass that also differentiates: per chunk, logits -> (lp, entropy) -> row_grads(s, e, lp,
    ent) = (g_lp, g_ent | None) -> dz from the same logits -> grads. No recompute (3 GEMMs, not 4).
    Returns (logprob, entropy, grad_hidden, grad_weight, grad_bias | None)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    c, (z, p) = _scratch(n, vocab, hidden, 2)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels)
    lp, ent = (torch.empty(n, dtype=z.dtype, device=z.device) for _ in range(2))
    grads = _Grads(hidden, weight, bias, z.dtype)
    for s in range(0, n, c):
        r, sl = min(c, n - s), slice(s, s + min(c, n - s))
        logp = _chunk_logits(hidden[sl], weight, bias, inv_t, z[:r])
        _, total = _shifted_exp(logp, p[:r])
        logp.sub_(total.log())
        pc = p[:r].div_(total)
        keep = ~ignored[sl]
        lp[sl] = logp.gather(1, safe[sl].unsqueeze(1)).squeeze(1) * keep
        ent[sl] = -_row_dot(pc, logp) * keep
        g_lp, g_ent = row_grads(s, s + r, lp[sl], ent[sl])
        g_lp = g_lp * keep
        g_ent = None if g_ent is None else g_ent * keep
        dz = _chunk_dlogits(logp, pc, safe[sl], ent[sl], g_lp, g_ent, inv_t)
        grads.add(s, s + r, hidden[sl], weight, dz)
    return (lp, ent, *grads.result(weight, bias))


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, N, V, H, stride_h, stride_w, inv_t, tiles_per_split,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Split fastest: the ~SM-count programs running together share a few row blocks and walk the
    # same vocab tiles, so both h and W stay in L2.
    pid = tl.program_id(0)
    split = pid % SPLITS
    rows = (pid // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v0 = split * tiles_per_split * BLOCK_V
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v0, BLOCK_V))  # every split has >= 1 tile
    for i in range(0, n_tiles):
        cols = v0 + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        # The logits tile (h W^T + b) * inv_t, written inline: a nested jit call costs ~10 ms per
        # call in the interpreter.
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :], other=0.0)
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < H)[None, :], other=0.0)
            if UPCAST:  # the interpreter: no bf16 arithmetic; input_precision ignored, so tf32 is
                h = h.to(tl.float32)  # emulated as the tensor core does it: 13 mantissa bits dropped
                w = w.to(tl.float32)
                if PRECISION == "tf32":
                    h = (h.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
                    w = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
        if HAS_BIAS:
            z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = z * inv_t
        z = tl.where(col_ok[None, :], z, 0.0)  # padding columns: finite here, excluded below
        m_new = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * z, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + SPLITS * N, s, mask=row_ok)
    tl.store(out + 2 * SPLITS * N, t, mask=row_ok)
    tl.store(out + 3 * SPLITS * N, zy, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V, H,
    stride_h, stride_w, stride_dz, inv_t,
    HAS_BIAS: tl.constexpr, HAS_ENT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Grouped order (as in a tiled GEMM): GROUP row blocks sweep the vocab together, for L2 reuse.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tl.cdiv(V, BLOCK_V)
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    pid_n = first + (pid % per_group) % size
    pid_v = (pid % per_group) // size
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):  # the same logits tile as in _fwd_kernel
        ks = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & (ks < H)[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < H)[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
            if PRECISION == "tf32":  # as in _fwd_kernel
                h = (h.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
                w = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = z * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0) * inv_t
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    coef = g_lp[:, None] + tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0) * inv_t
        coef += g_ent[:, None] * (logp + ent[:, None])
    dz = tl.where(cols[None, :] == y[:, None], g_lp[:, None], 0.0) - p * coef
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Tiles per generation (capability major; newer take 9, older 8): (BLOCK_N, BLOCK_V, BLOCK_H bf16, fp32,
# warps, stages), from the AOT compile, untimed. sm_90: 194-203 registers, 96 KB shared; sm_80: 128x128
# spilled at 255 (bf16 8 B, IEEE fp32 200 B), 128x64x4: 181, 72 KB. Predicted A100 bf16: 0.9-1.1x.
GPU_TILES = {9: (128, 128, 64, 32, 8, 3), 8: (128, 64, 64, 32, 8, 4)}
# fp32 inputs on GPU: tf32 operands (truncated by the tensor core: the PTX passes raw fp32 bits), fp32
# accumulation, not IEEE FFMA; ~1e-3 relative error per logit (tests: TOL_TF32). Predicted 3-5x the
# IEEE forward on H100 (FFMA 67 TFLOP/s, tf32 wgmma 495). "ieee": exact; "tf32x3": near fp32 at 1/3
# the tf32 rate. The interpreter ignores input_precision: INTERPRET_PRECISION "tf32" (tests) makes the
# kernels truncate the operands themselves.
FP32_PRECISION = "tf32"
INTERPRET_PRECISION = "ieee"
# SMs per capability where no device can be asked (the AOT compile); a real device reports its own.
SM_COUNT = {90: 132, 80: 108, 86: 84, 89: 128, 100: 148}


def _device_info(device: torch.device) -> tuple[int | None, int | None]:
    """(compute capability as 90/80/..., SM count) of a CUDA device; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor, torch.cuda.get_device_properties(device).multi_processor_count


def _config(dtype: torch.dtype, arch: int | None) -> dict:
    """Tile config: small tiles for the CPU interpreter (arch None), GPU_TILES by generation."""
    if arch is None:
        return dict(BLOCK_N=32, BLOCK_V=256, BLOCK_H=64, UPCAST=True, PRECISION=INTERPRET_PRECISION,
                    num_warps=4)  # fmt: skip
    bn, bv, bh16, bh32, warps, stages = GPU_TILES[min(max(arch // 10, 8), 9)]
    fp32 = dtype == torch.float32  # bf16/fp16 dots ignore PRECISION
    prec = FP32_PRECISION if fp32 else "tf32"
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh32 if fp32 else bh16, UPCAST=False, PRECISION=prec,
                num_warps=warps, num_stages=stages)  # fmt: skip


def _splits(n_tiles: int, n_rows: int, block_n: int, sms: int | None) -> int:
    """Vocab slices per row block. GPU: >= 16, so the ~SM-count programs running together cover ~8 row
    blocks x 16 slices and h and W stay in L2 (~24 MB at H=4096 bf16); more when rows are few, to fill
    two waves of SMs (N=512: 64 programs on 132 SMs became 264; predicted 1.8-2x the forward at N <=
    1024 on H100, same from N=2048); fewer for millions of rows ([4, S, N] fp32 partials <= 256 MB).
    CPU (sms None): 3, so that the tests exercise the combine."""
    if sms is None:
        return min(n_tiles, 3)
    fill = triton.cdiv(2 * sms, triton.cdiv(max(n_rows, 1), block_n))
    return max(1, min(n_tiles, max(16, fill), (1 << 26) // (4 * max(n_rows, 1))))


def triton_forward(hidden, weight, bias, labels, inv_t, ignore_index, need_entropy):
    """hidden [N, H], weight [V, H] (same dtype, last dim contiguous), labels [N] int64
    -> (logprob [N] fp32, entropy [N] fp32 | None, lse [N] fp32)."""
    (n, h_dim), vocab = hidden.shape, weight.shape[0]
    arch, sms = _device_info(hidden.device)
    cfg = _config(hidden.dtype, arch)
    n_tiles = triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = _splits(n_tiles, n, cfg["BLOCK_N"], sms)
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)  # no empty slice
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]) * splits,)
    _fwd_kernel[grid](
        hidden, weight, weight if bias is None else bias, labels, part, n, vocab, h_dim,
        hidden.stride(0), weight.stride(0), inv_t, per_split, SPLITS=splits, HAS_BIAS=bias is not None,
        **cfg,
    )  # fmt: skip
    return combine_partials(part, labels, ignore_index, need_entropy)  # one launch, not ~15 in torch


def triton_backward(hidden, weight, bias, labels, lse, ent, g_lp, g_ent, inv_t, ignore_index):
    """dz per chunk of rows from the Triton tile kernel, then two GEMMs per chunk.
    Returns (grad_hidden, grad_weight, grad_bias | None)."""
    (n, h_dim), vocab = hidden.shape, weight.shape[0]
    cfg = _config(hidden.dtype, _device_info(hidden.device)[0])
    block = cfg["BLOCK_N"]  # whole row blocks per chunk: a partial block would waste the tile
    c = min(n, max(block, rows_per_chunk(n, vocab, hidden.element_size(), hidden.device) // block * block))
    dz = torch.empty(c, vocab, dtype=hidden.dtype, device=hidden.device)
    gh = torch.empty_like(hidden)
    single = c >= n  # one chunk: the GEMM writes grad_weight directly (no fp32 accumulator)
    gw = None if single else torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    gb = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=weight.device)
    has_ent = g_ent is not None
    for s in range(0, n, c):
        r, sl = min(c, n - s), slice(s, s + min(c, n - s))
        grid = (triton.cdiv(r, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)
        _dlogits_kernel[grid](
            hidden[sl], weight, weight if bias is None else bias, labels[sl], lse[sl],
            ent[sl] if has_ent else lse[sl], g_lp[sl], g_ent[sl] if has_ent else g_lp[sl], dz,
            r, vocab, h_dim, hidden.stride(0), weight.stride(0), dz.stride(0), inv_t,
            HAS_BIAS=bias is not None, HAS_ENT=has_ent, GROUP=8, **cfg,
        )  # fmt: skip
        d = dz[:r]
        torch.mm(d, weight, out=gh[sl])
        if single:
            gw = torch.mm(d.t(), hidden[sl])
        elif d.dtype == gw.dtype:
            gw.addmm_(d.t(), hidden[sl])
        elif gw.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):  # torch >= 2.8
            # cuBLAS adds into fp32 gw: no rounded bf16 [V, H] temporary per chunk (1 GB at V=131k
            # H=4096) and its add pass. Predicted: backward 3-8% faster at N=16k (4 chunks).
            torch.addmm(gw, d.t(), hidden[sl], out_dtype=gw.dtype, out=gw)
        else:
            gw.add_(torch.mm(d.t(), hidden[sl]))
        if gb is not None:
            gb.add_(d.sum(dim=0, dtype=torch.float32))
    return gh, gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype)


def triton_fused_pass(hidden, weight, bias, labels, inv_t, ignore_index, row_grads):
    """Forward kernel, row gradients over all rows, backward kernels (the logits are recomputed
    once). Returns (logprob, entropy, grad_hidden, grad_weight, grad_bias | None)."""
    lp, ent, lse = triton_forward(hidden, weight, bias, labels, inv_t, ignore_index, True)
    g_lp, g_ent = row_grads(0, hidden.shape[0], lp, ent)
    keep = labels != ignore_index
    g_lp = g_lp * keep
    g_ent = None if g_ent is None else g_ent * keep
    grads = triton_backward(hidden, weight, bias, labels, lse, ent, g_lp, g_ent, inv_t, ignore_index)
    return (lp, ent, *grads)
