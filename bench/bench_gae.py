"""GAE (+ returns, + advantage whitening): compute_gae against the Python time-loop that verl
(compute_gae_advantage_return; mask_mode "carry") or OpenRLHF (get_advantages_and_returns; "zero")
run today, in eager torch, same run; and against a vectorised torch GAE (no time loop: the recurrence
unrolled as a float64 reverse cumsum, what a user writes to avoid the loop).

Floor. GAE reads r, V (fp32) and the mask (bool) and writes advantages and returns (fp32): 17 bytes a
token; whitening the advantages reads them and the mask twice and writes them once: about 25 bytes a
token in all (DESIGN "Floors"). GPU, B=256, T=4096 (1.05M tokens): 26 MB, about 8 us at 3.35 TB/s
(H100 SXM), 5.5 us at 4.8 TB/s (H200). CPU: the time loop is a serial chain per row (one FMA a step),
so the C++ op is bound by latency, about 5 ns a token per core, not by bandwidth.

Prediction. CPU, B=64, T=2048: the eager loop costs about T x 8 small ops (about 60 ms); the C++ op
about 0.6 ms on one core: about 100x. GPU, B=256, T=4096: the loop is about 4096 x 10 kernel
launches (200+ ms); the Triton scan is one launch, 10-20 us (within 3x of the floor): above 1000x.
Vectorised torch: about 15 eager passes over [B, T] in float64 (~0.3 KB a token of traffic), so on
CPU about 10x the C++ op's time (measured 48x, one thread, load average 9), on GPU about 20
launches (~100-200 us): ours 5-10x faster.

Usage: python bench/bench_gae.py [--device cuda] [--B 64 --T 2048] [--mask-mode carry] [--threads 1]
       [--no-csv | --csv PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH
from common import (  # noqa: E402
    GPU_PEAKS,
    add_csv_args,
    add_threads_arg,
    device_name,
    peak_memory_mb,
    print_table,
    save_rows,
    set_threads,
    time_stats,
)

from rlp_engine.ops import compute_gae, masked_whiten  # noqa: E402

BYTES_PER_TOKEN_GAE = 17  # r, V fp32 in; mask bool in; advantages, returns fp32 out
BYTES_PER_TOKEN_E2E = 25  # + whitening: read advantages and mask for the statistics, write once


def verl_loop(r, values, m, gamma, lam):
    """verl's compute_gae_advantage_return (unwhitened), as users run it today."""
    m = m.to(values.dtype)
    nextvalues, lastgaelam = 0, 0
    adv_rev = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        adv_rev.append(lastgaelam)
    adv = torch.stack(adv_rev[::-1], dim=1)
    return adv, adv + values


def openrlhf_loop(r, values, m, gamma, lam):
    """OpenRLHF's get_advantages_and_returns ("zero" semantics), as users run it today."""
    m = m.to(values.dtype)
    values, r = values * m, r * m
    T = r.shape[1]
    lastgaelam, adv_rev = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        adv_rev.append(lastgaelam)
    adv = torch.stack(adv_rev[::-1], dim=1)
    return adv, adv + values


LOOPS = {"carry": ("verl", verl_loop), "zero": ("OpenRLHF", openrlhf_loop)}


def vectorised_gae(r, values, m, gamma, lam, mask_mode):
    """GAE with no time loop, in eager torch. Both modes are G_t = a_t G_{t+1} + c_t, so G_t =
    P_t^-1 sum_{k>=t} P_k c_k with P_k = (g l)^(steps before k that decay): a reverse cumsum. In
    float64, exact while T |ln(g l)| < ~700 (T ~ 11k at g l = 0.94); needs g l > 0.
    carry (verl): a_t = g l where m_t else 1, c_t = m_t (r_t + g N_{t+1} - V_t), N_{t+1} the value at
    the next masked-in step; zero (OpenRLHF): r, V masked, a_t = g l, c_t = r_t + g V_{t+1} - V_t."""
    on = m.bool()
    r64 = torch.where(on, r.double(), 0.0)
    v64 = torch.where(on, values.double(), 0.0)
    T = v64.shape[1]
    if mask_mode == "zero":
        c = r64 + gamma * F.pad(v64[:, 1:], (0, 1)) - v64
        expo = torch.arange(T, dtype=torch.float64, device=v64.device).expand_as(v64)
    else:
        mf = on.double()
        expo = torch.cumsum(mf, 1) - mf  # masked-in steps before t
        idx = torch.where(on, torch.arange(T, device=v64.device), T)
        first = torch.cummin(idx.flip(1), 1).values.flip(1)  # first masked-in step >= t (T: none)
        n_next = F.pad(v64, (0, 1)).gather(1, F.pad(first[:, 1:], (0, 1), value=T))
        c = mf * (r64 + gamma * n_next - v64)
    p = torch.pow(gamma * lam, expo)
    adv = ((p * c).flip(1).cumsum(1).flip(1) / p).float()
    return adv, adv + (values if mask_mode == "carry" else v64.float())


def make_inputs(B, T, device):
    r = torch.randn(B, T, device=device) * 0.1
    v = torch.randn(B, T, device=device)
    t = torch.arange(T, device=device)
    length = torch.randint(T // 2, T + 1, (B, 1), device=device)
    mask = (t < length) & (torch.rand(B, T, device=device) < 0.95)  # padding plus some holes
    return r, v, mask


def run(args) -> list[dict]:
    device = args.device
    B, T = args.B, args.T
    r, v, mask = make_inputs(B, T, device)
    gamma, lam = 0.99, 0.95
    ours = lambda: compute_gae(r, v, mask, gamma, lam, args.mask_mode)
    ours_e2e = lambda: masked_whiten(ours()[0], mask)
    who, loop = LOOPS[args.mask_mode]
    base = lambda: loop(r, v, mask, gamma, lam)
    base_e2e = lambda: masked_whiten(base()[0], mask)
    vec = lambda: vectorised_gae(r, v, mask, gamma, lam, args.mask_mode)
    for fn in (ours, vec):  # same numbers as the loop users run
        for got, want in zip(fn(), base()):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    shape = f"B={B} T={T} {args.mask_mode}"
    backend = "triton" if torch.device(device).type == "cuda" else "cpp"
    variants = [
        (f"{who} time-loop (eager)", base, None),
        ("vectorised torch (fp64 reverse cumsum)", vec, f"{who} time-loop (eager)"),
        (f"compute_gae ({backend})", ours, f"{who} time-loop (eager)"),
        (f"{who} loop + masked_whiten", base_e2e, None),
        (f"compute_gae ({backend}) + masked_whiten", ours_e2e, f"{who} loop + masked_whiten"),
    ]
    times, rows = {}, []
    for name, fn, baseline in variants:
        reps = 3 if fn in (base, base_e2e) else 21
        st = time_stats(fn, device, warmup=1 if reps == 3 else 3, reps=reps)
        ms = times[name] = st["median_ms"]
        row = dict(variant=name, shape=shape, **st, peak_mb=peak_memory_mb(fn, device))
        row["ratio"] = times[baseline] / ms if baseline else 1.0
        rows.append(row)
    return rows


def floor_rows(rows: list[dict], tokens: int, device) -> None:
    """Print the achieved bytes/s of our two variants against the bandwidth floors (H100 SXM, H200),
    and compute_gae against the vectorised torch GAE."""
    ours = [r for r in rows if r["variant"].startswith("compute_gae")]
    for row, per_token in zip(ours, (BYTES_PER_TOKEN_GAE, BYTES_PER_TOKEN_E2E)):
        gbs = tokens * per_token / (row["median_ms"] * 1e-3) / 1e9
        line = f"{row['variant']}: {per_token} B/token -> {gbs:.1f} GB/s"
        if torch.device(device).type == "cuda":
            for gpu, peak in GPU_PEAKS.items():
                floor_us = tokens * per_token / peak["hbm_bytes_per_s"] * 1e6
                line += f"; {gpu} floor {floor_us:.1f} us ({row['median_ms'] * 1e3 / floor_us:.1f}x)"
        print(line)
    vec = next(r for r in rows if r["variant"].startswith("vectorised"))
    print(f"{ours[0]['variant']}: {vec['median_ms'] / ours[0]['median_ms']:.1f}x the vectorised torch GAE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--B", type=int, default=None)
    parser.add_argument("--T", type=int, default=None)
    parser.add_argument("--mask-mode", default="carry", choices=("carry", "zero"))
    add_threads_arg(parser)
    add_csv_args(parser)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.B = args.B or (256 if cuda else 64)
    args.T = args.T or (4096 if cuda else 2048)
    set_threads(args)
    torch.manual_seed(0)
    rows = run(args)
    print_table(f"GAE ({args.mask_mode}) on {device_name(args.device)}", rows)
    floor_rows(rows, args.B * args.T, args.device)
    save_rows(args, "gae", args.device, rows)


if __name__ == "__main__":
    main()
