"""Fused-linear DPO and SimPO losses (ops.fused_linear_dpo_loss / fused_linear_simpo_loss) against
the materialised-logits torch code (the ops' _ref: F.linear -> log_softmax -> gather -> masked sums ->
ops.dpo_loss / simpo_loss -> mean) and Liger-Kernel's LigerFusedLinearDPOLoss / SimPOLoss
(liger_kernel.chunked_loss, pure torch, so it runs on CPU; eager, compiled=False: its default
torch.compile is timed with --liger-compiled), forward + backward, in the same run.

Floors (written before measuring). CPU, one thread, fp32. Shape "base": B=4 pairs, T=256 tokens per
response, H=512, V=32768: N = 2 B T = 2048 rows; one [N, H] x [H, V] GEMM is 2 N H V = 68.7 GFLOP
(the `matmul` row times it in the run: floor of fwd+bwd = 3 of those; ours with recompute needs 4).
Shape "wide": B=1, T=256, V=131072: the same FLOPs, a 4x larger vocab (a pair's logits 256 MiB).
Memory floors: grad_weight [V, H] fp32 (64 MiB base, 256 MiB wide) and grad_hidden (4 / 1 MiB).

Predictions. Time: every variant is GEMM-bound; materialised, Liger and our one-pass path do 3 GEMMs,
so 0.9-1.1x the materialised time for ours one-pass and Liger within 1.0-1.3x of ours (M = 512-row
chunks, several out-of-place [512, V] passes); ours recompute (4 GEMMs) 0.7-0.8x. Peak memory (base):
materialised ~1 GiB (logits, log-softmax and their gradients, [N, V] fp32 = 256 MiB each); Liger
~300-400 MiB (per pair: logits, log-softmax, 2 gradients, 64 MiB each, plus a second [V, H]
grad_weight); ours one-pass ~140 MiB (one 64 MiB pair buffer + grad_weight), recompute ~100 MiB.
Wide: materialised ~2 GiB, Liger ~1.3 GiB, ours one-pass ~520 MiB, recompute ~300 MiB.

Each variant's runs are interleaved with the others' (one warm-up each, then round-robin), so the
load of the shared machine drifts over all of them alike; the median of --reps runs is reported.
Usage: OMP_NUM_THREADS=1 python bench/bench_preference.py [--shapes base,wide] [--losses dpo,simpo]
Rows go to a CSV outside the tree unless --csv bench/results.csv is given (or --no-csv).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, also under PYTHONSAFEPATH
from common import (  # noqa: E402
    CSV_PATH,
    add_csv_args,
    add_threads_arg,
    device_name,
    peak_memory_mb,
    print_table,
    save_rows,
    set_threads,
    spread,
)

import rlp_engine.ops.fused_preference as FP  # noqa: E402

SHAPES = {
    "base": dict(b=4, t=256, h=512, v=32768),
    "wide": dict(b=1, t=256, h=512, v=131072),
    "tiny": dict(b=2, t=16, h=32, v=256),  # a smoke run of the script
}
BETA = {"dpo": 0.1, "simpo": 2.0}


def inputs(b, t, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    hc, hr = (torch.randn(b, t, h, generator=g).requires_grad_() for _ in range(2))
    w = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    labels = []
    for _ in range(2):
        y = torch.randint(0, v, (b, t), generator=g)
        y[:, : t // 4] = -100  # the prompt part, as TRL masks it
        labels.append(y)
    refs = [-torch.rand(b, generator=g) * 3 * t for _ in range(2)]
    return hc, hr, w, labels[0], labels[1], refs


def ours(loss, one_pass):
    fn = FP.fused_linear_dpo_loss if loss == "dpo" else FP.fused_linear_simpo_loss

    def call(hc, hr, w, yc, yr, refs):
        limit = FP.PAIR_SCRATCH_BYTES["cpu"]
        FP.PAIR_SCRATCH_BYTES["cpu"] = limit if one_pass else 0  # 0: always the recomputing path
        try:
            extra = refs if loss == "dpo" else ()
            return fn(hc, hr, w, yc, yr, *extra, beta=BETA[loss])[0]
        finally:
            FP.PAIR_SCRATCH_BYTES["cpu"] = limit

    return call


def materialised(loss):
    fn = FP.fused_linear_dpo_loss_ref if loss == "dpo" else FP.fused_linear_simpo_loss_ref
    return lambda hc, hr, w, yc, yr, refs: fn(hc, hr, w, yc, yr, *(refs if loss == "dpo" else ()))[0]


def liger(loss, compiled):
    """Liger's module on [chosen; rejected] (its layout); DPO without a reference model (ref logps 0:
    our ref log-probs are inputs, Liger would run a second LM head for them)."""
    try:
        chunked = importlib.import_module("liger_kernel.chunked_loss")
    except ImportError:
        return None
    if loss == "dpo":
        mod = chunked.LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=compiled)
    else:
        mod = chunked.LigerFusedLinearSimPOLoss(
            beta=2.0, gamma=1.0, compute_nll_loss=False, compiled=compiled
        )
    return lambda hc, hr, w, yc, yr, refs: mod(w, torch.cat([hc, hr]), torch.cat([yc, yr]))[0]


def variants(loss, liger_compiled):
    out = {"materialised": materialised(loss), "ours one-pass": ours(loss, True)}
    out["ours recompute"] = ours(loss, False)
    for name, compiled in (("liger eager", False), ("liger compiled", True)):
        if compiled and not liger_compiled:
            continue
        fn = liger(loss, compiled)
        if fn is None:
            print(f"note: liger-kernel is not importable here ({name} skipped): pip install -e '.[bench]'")
        else:
            out[name] = fn
    return out


def time_interleaved(fns, warmup, reps):
    """{min_ms, median_ms, max_ms, reps} of each fn, the variants' runs interleaved round-robin so
    that the load of the shared machine drifts over all of them alike (run in turn, a load swing
    over the minutes of one variant would bias the ratios)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: spread(v) for k, v in times.items()}


def run_shape(name, loss, args, reps):
    s = SHAPES[name]
    shape = f"{loss} {name}: B={s['b']} T={s['t']}+{s['t']} H={s['h']} V={s['v']} fp32"
    hc, hr, w, yc, yr, refs = inputs(s["b"], s["t"], s["h"], s["v"])
    fns = {}
    if loss == "dpo":  # the GEMM floor once per shape
        h2 = torch.cat([hc, hr], 1).detach().reshape(-1, s["h"])
        wd = w.detach()
        fns["matmul [N,H]x[H,V] (floor: fwd+bwd = 3x)"] = lambda: h2 @ wd.t()
    for label, f in variants(loss, args.liger_compiled).items():

        def fwd_bwd(f=f):
            f(hc, hr, w, yc, yr, refs).backward()
            hc.grad = hr.grad = w.grad = None

        fns[f"{label} fwd+bwd"] = fwd_bwd
    stats = time_interleaved(fns, **reps)
    base = stats["materialised fwd+bwd"]["median_ms"]
    rows = []
    for label, f in fns.items():  # ratio: materialised time / this time (above 1: faster)
        ms = stats[label]["median_ms"]
        ratio = None if label.startswith("matmul") else base / ms
        rows.append({"variant": label, "shape": shape, **stats[label], "ratio": ratio})
        rows[-1]["peak_mb"] = peak_memory_mb(f)
        print(f"  {label}: {ms:.0f} ms, {rows[-1]['peak_mb']:.0f} MB", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"The default CSV is {CSV_PATH} (outside the tree); "
        "record a run with --csv bench/results.csv.",
    )
    parser.add_argument("--shapes", default="base,wide", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--losses", default="dpo,simpo", help="comma list of: dpo, simpo")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed runs per variant (median), after 1 warm-up"
    )
    parser.add_argument("--liger-compiled", action="store_true", help="also time Liger with torch.compile")
    add_threads_arg(parser)
    add_csv_args(parser)
    args = parser.parse_args()
    set_threads(args)
    torch.manual_seed(0)
    rows = []
    for loss in args.losses.split(","):
        for name in args.shapes.split(","):
            if loss == "simpo" and name == "wide":
                continue  # the same passes as DPO's wide row; keeps the run within a few minutes
            print(f"{loss} {name}", flush=True)
            rows += run_shape(name, loss, args, dict(warmup=1, reps=args.reps))
    print_table(f"fused-linear preference losses on {device_name('cpu')}", rows)
    save_rows(args, "preference", "cpu", rows)
    if not args.no_csv:
        print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
