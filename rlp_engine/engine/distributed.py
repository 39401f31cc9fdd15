"""Process launch for the SPMD engine: one process per device under torchrun, or a single process.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT). Without it the run is single-process and no process group is created. The backend
is NCCL when CUDA is available and gloo otherwise; each rank gets the device of its local rank.

Failure handling: collectives time out after `timeout_s`, and an excepthook (installed by
`init_distributed`) prints which rank failed, tears the process group down and exits non-zero, so
one rank's exception never leaves the others waiting forever (torchrun then stops the rest; ranks
started another way leave their next collective by timeout).

Data parallelism for the pipeline (explicit, no wrapper): `shard` gives a rank its contiguous share
of a global batch, `all_reduce_grads` averages gradients in one flat all-reduce, `mean_over_ranks`
and `gather_lists` combine metrics and samples, `check_replicas` verifies the ranks' weights agree.
All are no-ops (or local results) single-process.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when single-process (no process group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"init_distributed: environment variable {name}={value!r} is not an integer"
        ) from None


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(local_rank: int) -> torch.device:
    """The device of a local rank: cuda:<local_rank> when CUDA is available, else cpu."""
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (or stay single-process) and pick this rank's device.

    timeout_s bounds every collective: a rank whose peer died raises instead of hanging.
    Calling it again returns the current state."""
    if not timeout_s > 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0, got {timeout_s!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: RANK={rank} is outside WORLD_SIZE={world_size}")
    device = device_for(local_rank)
    if world_size == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, device, None)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_distributed: WORLD_SIZE={world_size} but {missing} not set (launch with torchrun)"
        )
    backend = backend or default_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    install_failure_handler()
    return DistInfo(rank, world_size, local_rank, device, dist.get_backend())


def install_failure_handler() -> None:
    """Replace sys.excepthook so an uncaught exception on any rank is reported with the rank and
    ends the process at once (after tearing the group down) instead of waiting in atexit handlers."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
        sys.stderr.write(f"[rank {rank}] failed with {exc_type.__name__}: {exc}\n")
        sys.stderr.write("".join(traceback.format_exception(exc_type, exc, tb)))
        sys.stderr.flush()
        abort_process_group()
        if previous not in (sys.__excepthook__, hook):
            previous(exc_type, exc, tb)
        os._exit(1)

    sys.excepthook = hook


def abort_process_group() -> None:
    """Tear down the default group without waiting for peers (best effort: errors are ignored,
    because this runs while the process is already failing)."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "nccl":
            # destroy_process_group can block on a hung NCCL communicator; abort does not
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as err:  # the process exits right after: report, do not raise
        sys.stderr.write(f"abort_process_group: {err!r}\n")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Clean exit: destroy the process group if one exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(code: int = 0) -> int:
    """End the process of a finished run. Single process: return `code`. Under torchrun: flush and
    leave at once (os._exit), skipping interpreter teardown. Every output file is closed and
    fsync'ed by then; the teardown of the gloo group's threads at interpreter exit was seen to abort
    a finished worker ("terminate called without an active exception", once in a CI run), which
    torchrun reports as a failed job although the run was complete."""
    if not dist.is_initialized():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Data-parallel helpers for the pipeline's stages. Every function is the identity (or a plain
# local result) without a process group, so single-process code paths stay unchanged.


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def comm_device() -> torch.device:
    """Where small host values go for a collective: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of n items (sizes differ by at most one)."""
    rank, world = rank_and_world()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items):
    """This rank's contiguous share of a list or tensor (the whole thing single-process)."""
    start, end = shard_bounds(len(items))
    return items[start:end]


def all_reduce_grads(params) -> None:
    """Average the gradients of `params` over ranks in one flat all-reduce (explicit data
    parallelism: every rank then applies the same update to identical weights). A parameter
    without a gradient on this rank counts as zero, so every rank sends the same layout.
    Sharded (DTensor) parameters are skipped: FSDP2 already reduce-scattered and averaged their
    gradients in backward (reducing them again would be wrong, and each rank holds another shard)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Mean of each float over ranks (keys must be the same on every rank; sorted for the order)."""
    if rank_and_world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.cpu().tolist())}


def gather_lists(items: list) -> list:
    """Concatenation of every rank's list in rank order (inverse of `shard` on a list)."""
    if rank_and_world()[1] == 1:
        return list(items)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def check_replicas(model, what: str = "model") -> None:
    """Raise if this rank's replicated weights differ from rank 0's (explicit data parallelism keeps
    them bitwise equal; a mismatch means a rank trained on something else). One float64 checksum.
    Sharded (DTensor) parameters are not replicas (each rank owns a different shard, and FSDP2 keeps
    one copy of each value): they are left out; a fully sharded model has nothing to compare."""
    if rank_and_world()[1] == 1:
        return
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64)
        for i, p in enumerate(model.parameters()):
            if not isinstance(p, DTensor):
                total += (p.detach().double() * (i % 7 + 1)).sum().cpu()
        mine = torch.tensor([float(total)], dtype=torch.float64, device=comm_device())
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(mine, ref):
        raise RuntimeError(
            f"{what}: weights on rank {dist.get_rank()} differ from rank 0 "
            f"(checksum {mine.item()!r} vs {ref.item()!r}; ranks must start and train identically)"
        )
