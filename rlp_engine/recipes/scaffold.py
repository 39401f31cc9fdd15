"""The one training-loop scaffold every recipe shares: resume, non-finite guard, logging, progress,
checkpoints. A recipe supplies the step (its math over a TrainHandle) and its own loop state.

    ctx = TrainContext(stage="sft", seed=0)           # or the pipeline's, one per stage
    last = run_loop(ctx, handle, steps, step_fn, save=..., load=...)

`step_fn(step, guard) -> metrics` does one step (forward, handle.step with `guard`) and returns the
metrics of that step (tensors or floats; only the logged ones are ever read back from the device).
`save() -> dict` is the recipe's loop state (generators, schedulers, data positions) for a checkpoint,
`load(saved)` puts it back on resume; the scaffold adds the step, the guard and the last metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from rlp_engine.algos.sft import warmup_cosine
from rlp_engine.engine.checkpoint import LoopCheckpoint
from rlp_engine.engine.guards import NonFiniteGuard
from rlp_engine.engine.layout import TrainHandle, train_handle
from rlp_engine.engine.metrics import MetricsLogger, Throughput, progress, to_float


@dataclass
class TrainContext:
    """What a recipe's loop needs besides its model, data and hyper-parameters (the pipeline builds
    one per stage, pipeline/run.py `Run.context`)."""

    stage: str = "train"
    seed: int = 0
    log_every: int = 10
    show_progress: bool = False
    logger: MetricsLogger = field(default_factory=MetricsLogger)
    throughput: Throughput = field(default_factory=Throughput)
    ckpt: LoopCheckpoint | None = None  # None: no checkpoints inside the loop
    max_nonfinite_steps: int = 10
    train_backend: str = "fsdp2"  # run.train_backend; "deepspeed": ZeRO-3 under torchrun
    # curve snapshots (eval.curve_points): snapshot(handle, done, steps) after each step count of
    # curve_steps(steps, curve_points), before that step's checkpoint; on every rank (a collective
    # under torchrun). None: no snapshots
    snapshot: Callable[[TrainHandle, int, int], None] | None = None
    curve_points: int = 0


@dataclass(frozen=True)
class Optim:
    """One optimizer's settings, spelled out by the caller from whichever config section it has."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def warmup_cosine_handle(model, cfg, ctx: TrainContext):
    """SFT's optimisation, shared by the offline preference losses: (handle, scheduler, generator) =
    a TrainHandle over `model` as its part "policy" (train_handle: under torchrun a sharded copy),
    AdamW(cfg.lr, cfg.weight_decay) clipped at cfg.max_grad_norm, the warmup-cosine LR schedule
    over cfg.steps (cfg.warmup_steps), and the batch-order generator seeded with ctx.seed; the handle
    in train mode."""
    handle = train_handle(
        {"policy": model},
        lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        max_grad_norm=cfg.max_grad_norm,
        backend=ctx.train_backend,
        copy=True,
        stage=ctx.stage,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        handle.optimizer, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup_steps)
    )
    gen = torch.Generator().manual_seed(ctx.seed)
    handle.train()
    return handle, sched, gen


def curve_steps(steps: int, points: int) -> list[int]:
    """The step counts after which a loop of `steps` steps saves a curve snapshot: floor(k * steps /
    points) for k = 1 .. points - 1, those strictly between 0 and `steps` (the end is the stage's own
    export), without repeats. points 0 or 1: none. curve_steps(100, 4) = [25, 50, 75]."""
    if steps < 0 or points < 0:
        raise ValueError(f"curve_steps: steps and points must be >= 0, got steps={steps}, points={points}")
    return sorted({k * steps // points for k in range(1, points)} - {0, steps}) if points else []


def run_loop(
    ctx: TrainContext,
    handle: TrainHandle,
    steps: int,
    step_fn: Callable[[int, NonFiniteGuard], dict],
    *,
    save: Callable[[], dict] = dict,
    load: Callable[[dict], None] = lambda saved: None,
) -> dict[str, float]:
    """Steps [start, steps) of `step_fn` (start: 0, or the step a checkpoint of this stage saved),
    logging every ctx.log_every steps and the last; returns the last logged metrics. With ctx.ckpt the
    modules, optimizer and loop state are restored first and saved every ckpt.every steps. With
    ctx.snapshot, after the steps of curve_steps(steps, ctx.curve_points) (a resumed loop past one
    does not redo it: its snapshot was written before the checkpoint it resumes from)."""
    guard = NonFiniteGuard(ctx.max_nonfinite_steps, ctx.stage)
    last: dict[str, float] = {}
    start = 0
    modules, optimizers = handle.checkpoint_modules(), [handle.optimizer]
    saved = ctx.ckpt.resume(modules, optimizers) if ctx.ckpt else None
    if saved is not None:
        start, last, guard = saved["step"], saved.get("last", {}), NonFiniteGuard(**saved["guard"])
        load(saved)
    curve = set(curve_steps(steps, ctx.curve_points)) if ctx.snapshot else set()

    def state():
        return modules, optimizers, {**save(), "last": last, "guard": asdict(guard)}

    for step in progress(range(start, steps), desc=ctx.stage, enabled=ctx.show_progress):
        metrics = step_fn(step, guard)
        if step % ctx.log_every == 0 or step == steps - 1:
            last = ctx.logger.log(ctx.stage, step, metrics)
        if step + 1 in curve:
            ctx.snapshot(handle, step + 1, steps)
        if ctx.ckpt:
            ctx.ckpt.step_done(step + 1, steps, state)
    return last


def minibatch_updates(
    handle: TrainHandle,
    guard: NonFiniteGuard,
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    attention_mask: torch.Tensor,
    *,
    epochs: int,
    mini: int,
    generator: torch.Generator,
    throughput: Throughput,
    step: int = 0,
) -> dict[str, float]:
    """`epochs` passes over the rows of a rollout (attention_mask [N, T]) in minibatches of `mini` rows,
    shuffled by `generator` each epoch: loss_fn(idx) -> (loss, metrics), then handle.step. Returns
    the metrics (loss, grad_norm and loss_fn's) averaged over the applied updates (a non-finite one is
    skipped by the guard and left out), grad_norm_max, skipped_updates and nonfinite_steps. The update
    phase of PPO and GRPO/RLOO."""
    n = attention_mask.shape[0]
    sums: dict[str, float] = {}
    count = skipped = 0
    grad_norm_max = 0.0
    with throughput.phase("training") as rec:
        for _ in range(epochs):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, mini):
                idx = perm[start : start + mini].to(attention_mask.device)
                loss, metrics = loss_fn(idx)
                applied, grad_norm = handle.step(loss, guard=guard, step=step)
                rec["tokens"] += int(attention_mask[idx].sum())
                if not applied:
                    skipped += 1
                    continue
                grad_norm_max = max(grad_norm_max, float(grad_norm))
                for k, v in {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + to_float(v)
                count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out.update(
        grad_norm_max=grad_norm_max, skipped_updates=float(skipped), nonfinite_steps=float(guard.count)
    )
    return out
