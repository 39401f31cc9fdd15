"""Metrics: JSONL lines (and TensorBoard scalars when the package is present), the curves kept in
memory for the report's plot, per-phase token throughput (generation, scoring, training), and
`masked_stats` (mean, std, min, max of a masked tensor, for rewards, advantages, returns, values).

Console output goes through the standard `logging` module: `MetricsLogger(console=True)` logs each
step's `console_line` at INFO on the "rlp_engine.engine.metrics" logger. The library adds no handler
(rlp_engine/__init__.py attaches a NullHandler, so nothing prints unless the application asks);
the CLI calls engine.console.log_to_console, which prints rlp_engine's INFO records to stdout as
bare lines, above any tqdm bar."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from rlp_engine.engine.console import progress  # noqa: F401  (re-exported: the recipes' bars)
from rlp_engine.engine.distributed import comm_device, mean_over_ranks, rank_and_world

log = logging.getLogger(__name__)


def to_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


STAT_NAMES = ("mean", "std", "min", "max")


def masked_stats(
    x: torch.Tensor, mask: torch.Tensor | None = None, prefix: str = "", *, across_ranks: bool = False
) -> dict[str, torch.Tensor]:
    """Mean, std, min and max of `x` over the entries where `mask` is nonzero (all entries when
    mask is None), as 0-dim fp32 tensors keyed "<prefix>_mean", ... ("mean", ... with no prefix).
    No host sync (the values stay on x's device until logged).

    x: any floating shape; mask: the same shape (bool, int or float; nonzero selects). Entries
    outside the mask never matter, even NaN or inf; a NaN inside it makes the statistics NaN (which
    is what a log should show). std is the population std (divides by the count, so one entry gives
    0, not NaN). An empty mask gives 0 for all four (documented value, never NaN or inf).
    across_ranks: statistics of the union over ranks under torchrun (every rank must call it with
    the same prefix; three small all-reduces in fp64: count and sum, squared deviations from the
    global mean, max and -min); every rank gets the same values. Single-process it changes nothing.
    Without it each rank's own statistics are returned (MetricsLogger then averages them)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"masked_stats({prefix!r}): x must be a floating-point tensor, got {got}")
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.shape != x.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"masked_stats({prefix!r}): mask must have x's shape {tuple(x.shape)}, got {got}")
    keep = mask.to(x.device) != 0
    reduce = across_ranks and rank_and_world()[1] > 1
    # fp32 locally; fp64 when partial sums from several ranks are combined
    xf = x.detach().to(torch.float64 if reduce else torch.float32)
    zero = torch.zeros((), dtype=xf.dtype, device=x.device)
    inf = torch.full((), math.inf, dtype=xf.dtype, device=x.device)
    n = keep.sum().to(xf.dtype)
    total = torch.where(keep, xf, zero).sum()
    hi = torch.where(keep, xf, -inf).amax() if x.numel() else -inf  # amax of an empty tensor raises
    lo = torch.where(keep, xf, inf).amin() if x.numel() else inf
    if reduce:
        n, total = _all_reduce_on(x.device, torch.stack([n, total]), "sum")
    mean = total / n.clamp_min(1)
    ssd = torch.where(keep, xf - mean, zero).square().sum()  # two passes: no cancellation
    if reduce:
        (ssd,) = _all_reduce_on(x.device, ssd.reshape(1), "sum")
        hi, neg_lo = _all_reduce_on(x.device, torch.stack([hi, -lo]), "max")
        lo = -neg_lo
    std = (ssd / n.clamp_min(1)).sqrt()
    empty = n == 0
    values = {
        "mean": mean,
        "std": std,
        "min": torch.where(empty, zero, lo),
        "max": torch.where(empty, zero, hi),
    }
    sep = "_" if prefix else ""
    return {f"{prefix}{sep}{k}": values[k].float() for k in STAT_NAMES}


def _all_reduce_on(device: torch.device, t: torch.Tensor, op: str) -> torch.Tensor:
    """All-reduce (sum or max) of a small 1-D tensor via the communication device, back on `device`."""
    import torch.distributed as dist

    buf = t.to(comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return buf.to(device)


# What `MetricsLogger(console=True)` prints of each logged step, when present.
CONSOLE_KEYS = ("loss", "acc", "score", "kl", "gold", "grad_norm")


def console_line(stage: str, step: int, values: dict[str, float]) -> str:
    """One short line per logged step, a dict like TRL's: {'stage': 'ppo', 'step': 3, 'loss': 0.1234, ...}
    (4 significant digits)."""
    shown = {k: float(f"{values[k]:.4g}") for k in CONSOLE_KEYS if k in values}
    return str({"stage": stage, "step": step, **shown})


class MetricsLogger:
    """`log(stage, step, {name: value})` appends a JSON line `{"stage", "step", name: value, ...}` to
    DIR/metrics.jsonl, writes TensorBoard scalars `stage/name` under DIR/tb, and keeps the curves;
    with `console` it also logs `console_line` (the key metrics) at INFO through `logging` (the CLI
    prints those records to stdout: engine.console.log_to_console).
    With `out_dir=None` it only keeps the curves (for the Python API and tests).
    Under torchrun every rank calls `log` at the same steps: the values are averaged over ranks
    (one all-reduce) and only the logger given an out_dir (rank 0's) writes them."""

    def __init__(self, out_dir: str | Path | None = None, tensorboard: bool = False, console: bool = False):
        self.curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        self.console = console
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
        if self.console and log.isEnabledFor(logging.INFO):
            log.info(console_line(stage, step, values))
        return values

    def replay(self, records: list[dict]) -> None:
        """Reload lines an earlier process of this run logged (resume: metrics.jsonl already holds
        them) into the curves and TensorBoard, without writing them to metrics.jsonl again."""
        for rec in records:
            stage, step = rec["stage"], rec["step"]
            for k, v in rec.items():
                if k not in ("stage", "step"):
                    self.curves[stage][k].append((step, v))
                    if self._tb is not None:
                        self._tb.add_scalar(f"{stage}/{k}", v, step)

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

    def counts(self) -> dict:
        """A JSON-able copy of the counters (for checkpoints): {"tokens": {phase: n}, "seconds": {...}}."""
        return {"tokens": dict(self.tokens), "seconds": dict(self.seconds)}

    def since(self, start: dict) -> dict:
        """What each phase gained since `start` (a `counts()` copy), as counts; phases that did not
        run since are left out."""
        out = Throughput().counts()
        for phase, secs in self.seconds.items():
            gained = secs - start["seconds"].get(phase, 0.0)
            if gained > 0:
                out["seconds"][phase] = gained
                out["tokens"][phase] = self.tokens[phase] - start["tokens"].get(phase, 0.0)
        return out

    @classmethod
    def from_counts(cls, counts: dict, phases: list[str]) -> Throughput:
        """A Throughput holding `counts` for each of `phases` (0 where counts lack one)."""
        tp = cls()
        for phase in phases:
            tp.tokens[phase] = counts["tokens"].get(phase, 0.0)
            tp.seconds[phase] = counts["seconds"].get(phase, 0.0)
        return tp

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
