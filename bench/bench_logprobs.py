"""Token log-probs + entropy from logits: logprobs_from_logits(..., return_entropy=True), forward and
forward+backward, against verl's eager torch (logprobs_from_logits_naive: log_softmax + gather;
entropy_from_logits: logsumexp(z) - sum(softmax(z) * z)), same run, same inputs.

Floor. Forward reads the logits once (a row of 32000 fp32 is 128 KB: the second pass hits cache) and
backward reads them again and writes the gradient: 3 N V elements of traffic. GPU, N=8192,
V=131072 bf16: 6.4 GB, about 1.9 ms at 3.35 TB/s (H100 SXM), 1.3 ms at 4.8 TB/s (H200). CPU, N=4096,
V=32000 fp32: 1.6 GB of traffic, but two exp() a logit (one forward, one backward) dominate: a
~15-flop polynomial on 4-wide vectors over 2 cores is about 50 ms forward and 60 ms backward.

Prediction. CPU (2 cores): C++ forward about 100 ms, forward+backward about 250 ms; verl's eager
code materialises 4-5 [N, V] fp32 temporaries (log_softmax, softmax, softmax * z, and their
gradients): 4-6x slower and 3 GB more peak memory. GPU: the Triton kernels near 2x the floor;
eager torch several times slower, with [N, V] fp32 temporaries.

Measured (2-core AMD EPYC, N=4096 V=32000 fp32, 2 threads, load average 6.5: this process got about
a quarter of the machine, so absolute times are about 4x the idle figures; the ratios hold):
verl eager fwd 6262 ms (1.5 GB peak) vs C++ 728 ms (7 MB): 8.6x; fwd+bwd 17625 ms (4.0 GB) vs
2619 ms (510 MB, the gradient itself): 6.7x. The backward's extra cost over the forward is mostly
first-touch page faults on the fresh 512 MB gradient (sys time), which any implementation pays.

Usage: python bench/bench_logprobs.py [--device cuda] [--N 4096 --V 32000] [--dtype bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

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

from rlp_engine.ops import logprobs_from_logits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def verl_eager(logits, labels, temperature):
    """verl 0.9's CPU path: logits /= temperature; log_softmax + gather; lse - sum(softmax * z)."""
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pd = torch.softmax(z, dim=-1)
    entropy = torch.logsumexp(z, dim=-1) - torch.sum(pd * z, dim=-1)
    return logp, entropy


def ours(logits, labels, temperature):
    return logprobs_from_logits(logits, labels, temperature, return_entropy=True)


def fwd_bwd(fn, logits, labels, temperature, g_lp, g_ent):
    """A closure running fn forward and backward (random upstream grads, like a loss would give)."""

    def step():
        x = logits.detach().requires_grad_()
        lp, ent = fn(x, labels, temperature)
        torch.autograd.backward((lp, ent), (g_lp.to(lp.dtype), g_ent.to(ent.dtype)))
        return x.grad

    return step


def run(args) -> list[dict]:
    device, n, v = args.device, args.N, args.V
    dtype = DTYPES[args.dtype]
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    labels = torch.randint(0, v, (n,), device=device)
    g_lp, g_ent = torch.randn(n, device=device), torch.randn(n, device=device)
    t = 0.7
    for got, want in zip(ours(logits, labels, t), verl_eager(logits.float(), labels, t)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the same numbers
    backend = "triton" if torch.device(device).type == "cuda" else "cpp"
    shape = f"N={n} V={v} {args.dtype}"
    variants = [
        ("verl eager fwd", lambda: verl_eager(logits, labels, t), None),
        (f"logprobs_from_logits ({backend}) fwd", lambda: ours(logits, labels, t), "verl eager fwd"),
        ("verl eager fwd+bwd", fwd_bwd(verl_eager, logits, labels, t, g_lp, g_ent), None),
        (f"logprobs_from_logits ({backend}) fwd+bwd", fwd_bwd(ours, logits, labels, t, g_lp, g_ent),
         "verl eager fwd+bwd"),
    ]  # fmt: skip
    times, rows = {}, []
    for name, fn, baseline in variants:
        reps = args.reps if baseline else max(3, args.reps // 2)  # the eager baseline is the slow one
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            st = time_stats(fn, device, warmup=1, reps=reps)
        ms = times[name] = st["median_ms"]
        row = dict(variant=name, shape=shape, **st, peak_mb=peak_memory_mb(fn, device))
        row["ratio"] = times[baseline] / ms if baseline else 1.0
        rows.append(row)
    return rows


def floor_lines(rows: list[dict], args) -> None:
    """Achieved logits bandwidth of our two variants (1 N V read forward; 3 N V forward+backward)."""
    elem = DTYPES[args.dtype].itemsize
    for row, passes in zip(rows[1::2], (1, 3)):
        nbytes = passes * args.N * args.V * elem
        line = (
            f"{row['variant']}: {nbytes / 1e9:.2f} GB -> {nbytes / (row['median_ms'] * 1e-3) / 1e9:.1f} GB/s"
        )
        if torch.device(args.device).type == "cuda":
            for gpu, peak in GPU_PEAKS.items():
                floor_ms = nbytes / peak["hbm_bytes_per_s"] * 1e3
                line += f"; {gpu} floor {floor_ms:.2f} ms ({row['median_ms'] / floor_ms:.1f}x)"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--N", type=int, default=None)
    parser.add_argument("--V", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    parser.add_argument("--reps", type=int, default=None)
    add_threads_arg(parser)
    add_csv_args(parser)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.N = args.N or (8192 if cuda else 4096)
    args.V = args.V or (131072 if cuda else 32000)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.reps = args.reps or (21 if cuda else 5)
    set_threads(args)
    torch.manual_seed(0)
    rows = run(args)
    print_table(f"log-probs + entropy on {device_name(args.device)} (ratio = verl ms / variant ms)", rows)
    floor_lines(rows, args)
    save_rows(args, "logprobs", args.device, rows)


if __name__ == "__main__":
    main()
