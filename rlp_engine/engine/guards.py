"""Numerical guards for the training loops: one optimizer step that skips a non-finite loss or
gradient instead of applying it, counts the skips, and stops the run past a configured limit.

`guarded_step` replaces the loops' `zero_grad; backward; all_reduce_grads; clip_grad_norm_; step`.
Order and reasons:

1. zero_grad, backward, `all_reduce_grads` (explicit data parallelism; no-op single-process and
   for FSDP2's sharded parameters, whose gradients backward already averaged).
2. The total gradient norm (2-norm over every gradient, in the gradients' dtype as torch computes
   it; FSDP2's sharded gradients count whole). It is the norm before clipping, what
   `clip_grad_norm_` returns, and is returned for logging.
3. The decision, BEFORE optimizer.step(): AdamW folds a NaN gradient into its moments, and from then
   on every update of that parameter is NaN; a skipped step must leave parameters and optimizer
   state bitwise unchanged. A step is bad when the loss or the gradient norm is not finite (a NaN or
   inf anywhere in a gradient makes the norm non-finite; an overflowing norm counts too).
   Under torchrun every rank must decide the same, or the replicas diverge: each rank's loss flag
   goes into its slot of a (world + 1,) vector (the last slot: the gradient flag) and one
   all-reduce (MAX) combines them, so a NaN loss on one rank makes every rank skip (even when its
   gradients stay finite), and the message can say which ranks saw one. Cost of the common
   path: that one tiny collective and ONE host sync (`bool(...)` on the combined flag); an
   .item()-free step would need the optimizer update itself to be masked, which torch's AdamW
   cannot do without a copy of its state.
4. A good step: clip (scale by min(1, max_grad_norm / (norm + 1e-6)), torch's formula) when
   0 < max_grad_norm < inf, optimizer.step(), then scheduler.step() when given.
   A bad step: gradients set to None, no optimizer step and NO scheduler step: the schedule
   counts applied updates, like AdamW's own step counter, so a skipped batch is as if it never
   came (the schedule ends at most `limit` updates short of its last value).
   The guard counts it, rank 0 prints one line, and when the count exceeds the limit every rank
   raises NonFiniteError (all ranks saw the same count, so all raise at the same step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from rlp_engine.engine.distributed import all_reduce_grads, comm_device, rank_and_world

CONFIG_KEY = "run.max_nonfinite_steps"


class NonFiniteError(RuntimeError):
    """More non-finite steps in one stage than run.max_nonfinite_steps allows."""


@dataclass
class NonFiniteGuard:
    """Counter of the skipped (non-finite) steps of one stage. `limit`: how many may be skipped;
    one more raises NonFiniteError (0: the first one raises). `count` and `last_step` are plain
    ints, so `dataclasses.asdict(guard)` goes into a checkpoint and `NonFiniteGuard(**d)` back."""

    limit: int
    stage: str
    count: int = 0
    last_step: int | None = None  # the loop step of the latest skip

    def __post_init__(self):
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise ValueError(f"NonFiniteGuard: limit ({CONFIG_KEY}) must be an int >= 0, got {self.limit!r}")


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """2-norm over the gradients of `params` (those without one are skipped): a 0-dim plain tensor
    on the gradients' device, 0 when none has a gradient. FSDP2's sharded (DTensor) gradients give
    a norm over the whole gradient (torch reduces it over the shards; a collective every rank makes,
    like the step itself); plain and sharded gradients together (a partly sharded model) combine as
    sqrt(a^2 + b^2). With one kind only it is exactly what clip_grad_norm_ computes."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        device = params[0].device if params else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=device)
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    norms = []
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0))
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, norm_type=2.0)  # a replicated DTensor
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) == 1:
        return norms[0]
    a, b = norms[0], norms[1].to(device=norms[0].device, dtype=norms[0].dtype)
    return torch.linalg.vector_norm(torch.stack([a, b]))


def clip_grads(params: list[torch.Tensor], max_grad_norm: float, total_norm: torch.Tensor) -> None:
    """Scale every gradient by min(1, max_grad_norm / (total_norm + 1e-6)) (torch's clip_grad_norm_
    formula and code). Plain and sharded (DTensor) gradients go in separate calls: one foreach
    multiply cannot mix the two kinds."""
    plain = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    sharded = [p for p in params if p.grad is not None and isinstance(p.grad, DTensor)]
    for group in (plain, sharded):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_grad_norm, total_norm)


def combine_flags(loss_bad: torch.Tensor, grad_bad: torch.Tensor) -> tuple[bool, list[int]]:
    """(skip or not, the ranks whose loss is non-finite) from this rank's 0-dim bool flags.
    Under torchrun one all-reduce (MAX) of a (world + 1,) vector: slot r is rank r's loss flag, the
    last slot the gradient flag (after all_reduce_grads every rank holds the same gradients, so it
    agrees anyway; MAX makes that certain). Then one host sync; single-process only the sync."""
    rank, world = rank_and_world()
    if world == 1:
        flags = torch.stack([loss_bad, grad_bad.to(loss_bad.device)]).cpu()  # the one host sync
        return bool(flags.any()), [0] if bool(flags[0]) else []
    flags = torch.zeros(world + 1, dtype=torch.float32, device=comm_device())
    flags[rank] = loss_bad.to(device=flags.device, dtype=flags.dtype)
    flags[world] = grad_bad.to(device=flags.device, dtype=flags.dtype)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    flags = flags.cpu()  # the one host sync of the common path
    return bool((flags > 0).any()), [r for r in range(world) if flags[r] > 0]


def _fmt(x: torch.Tensor) -> str:
    return f"{float(x):.6g}"


def guarded_step(
    loss: torch.Tensor,
    params,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float,
    guard: NonFiniteGuard,
    step: int,
    scheduler=None,
) -> tuple[bool, torch.Tensor]:
    """Backward `loss` (a scalar) and apply one optimizer step on `params` unless the loss or the
    gradient norm is non-finite on any rank (see the module docstring for the order and reasons).

    params: model.parameters() (read after backward) or the optimizer's parameters; not a list made
    between forward and backward (under FSDP2 it would hold unsharded copies without gradients).
    max_grad_norm: clip threshold; <= 0 or inf means no clipping (the norm is still computed).
    guard: this stage's counter. step: the loop step, for the message. scheduler: stepped only
    after an applied update. Returns (applied, grad_norm), grad_norm the total norm before clipping
    (0-dim tensor; non-finite when the step was skipped for its gradient). Raises NonFiniteError
    on every rank when the skip count exceeds guard.limit."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"guarded_step ({guard.stage}): loss must be a 0-dim tensor, got {shape}")
    max_grad_norm = float(max_grad_norm)
    if math.isnan(max_grad_norm):
        raise ValueError(f"guarded_step ({guard.stage}): max_grad_norm is NaN")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # read `params` only now, and once (model.parameters() is a one-shot generator): under FSDP2 the
    # root module holds its unsharded parameters from forward until backward, and the gradients
    # land on the sharded ones
    params = [p for p in params if p.requires_grad]
    all_reduce_grads(params)
    grad_norm = total_grad_norm(params)

    loss_d = loss.detach()
    bad, bad_loss_ranks = combine_flags(~torch.isfinite(loss_d), ~torch.isfinite(grad_norm))

    if not bad:
        if 0 < max_grad_norm < math.inf:
            clip_grads(params, max_grad_norm, grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return True, grad_norm

    # skipped: no update anywhere, gradients dropped so nothing downstream reads them
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None
    record_skip(guard, step, loss_d, grad_norm, bad_loss_ranks)
    return False, grad_norm


def record_skip(
    guard: NonFiniteGuard, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, bad_ranks
) -> None:
    """Count a skipped step in `guard`, say so from rank 0 (naming the ranks whose loss was
    non-finite), and raise NonFiniteError on every rank once the count exceeds the limit."""
    guard.count += 1
    guard.last_step = step
    rank, world = rank_and_world()
    if rank == 0:
        where = f" (non-finite loss on ranks {bad_ranks})" if world > 1 and bad_ranks else ""
        print(
            f"[rlp-engine] {guard.stage} step {step}: non-finite loss={_fmt(loss)} "
            f"grad_norm={_fmt(grad_norm)}{where}; skipped ({guard.count} of {guard.limit})",
            flush=True,
        )
    if guard.count > guard.limit:
        raise NonFiniteError(
            f"{guard.stage}: {guard.count} steps with a non-finite loss or gradient (latest at step "
            f"{step}), more than {CONFIG_KEY}={guard.limit}; lower the learning rate or check the data "
            f"and model, or raise {CONFIG_KEY}"
        )
