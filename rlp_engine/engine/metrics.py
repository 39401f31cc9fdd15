"""Metrics: JSONL lines (and TensorBoard scalars when the package is present), the curves kept in
memory for the report's plot, and per-phase token throughput (generation, scoring, training)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from rlp_engine.engine.distributed import comm_device, mean_over_ranks, rank_and_world


def to_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class MetricsLogger:
    """`log(stage, step, {name: value})` appends a JSON line `{"stage", "step", name: value, ...}` to
    DIR/metrics.jsonl, writes TensorBoard scalars `stage/name` under DIR/tb, and keeps the curves.
    With `out_dir=None` it only keeps the curves (for the Python API and tests).
    Under torchrun every rank calls `log` at the same steps: the values are averaged over ranks
    (one all-reduce) and only the logger given an out_dir (rank 0's) writes them."""

    def __init__(self, out_dir: str | Path | None = None, tensorboard: bool = False):
        self.curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        self._file = None
        self._tb = None
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            self._file = (out_dir / "metrics.jsonl").open("a", encoding="utf-8")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(str(out_dir / "tb"))

    def log(self, stage: str, step: int, metrics: dict) -> dict[str, float]:
        values = mean_over_ranks({k: to_float(v) for k, v in metrics.items()})
        values = {k: values[k] for k in metrics}  # the caller's order, not the reduction's
        for k, v in values.items():
            self.curves[stage][k].append((step, v))
            if self._tb is not None:
                self._tb.add_scalar(f"{stage}/{k}", v, step)
        if self._file is not None:
            self._file.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
            self._file.flush()
        return values

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Tokens and seconds per phase: `with tp.phase("generation") as rec: ...; rec["tokens"] = n`."""

    def __init__(self):
        self.tokens: dict[str, float] = defaultdict(float)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        rec = {"tokens": 0}
        start = time.perf_counter()
        try:
            yield rec
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.tokens[name] += rec["tokens"]

    def across_ranks(self) -> Throughput:
        """The whole job's figures under torchrun (tokens summed over ranks, seconds the slowest
        rank's); every rank must call it, with the same phases. Itself single-process."""
        if rank_and_world()[1] == 1:
            return self
        import torch.distributed as dist

        names = sorted(self.seconds)
        tokens = torch.tensor([self.tokens[n] for n in names], dtype=torch.float64, device=comm_device())
        seconds = torch.tensor([self.seconds[n] for n in names], dtype=torch.float64, device=comm_device())
        dist.all_reduce(tokens)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        total = Throughput()
        for n, t, s in zip(names, tokens.tolist(), seconds.tolist()):
            total.tokens[n], total.seconds[n] = t, s
        return total

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "tokens": self.tokens[name],
                "seconds": round(self.seconds[name], 3),
                "tokens_per_s": round(self.tokens[name] / max(self.seconds[name], 1e-9), 1),
            }
            for name in self.seconds
        }


def progress(iterable, *, desc: str, enabled: bool, total: int | None = None):
    """tqdm over `iterable` when enabled (and tqdm is installed), else the iterable itself."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
