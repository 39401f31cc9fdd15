"""Phase offload: move training state to host memory before generation and back after.

Optimizer state and gradients (and parameters when asked) move to CPU (pinned on CUDA, so the
copies back are asynchronous) in place: the same optimizer and model objects keep working after
`reload`. When the state already lives on the CPU there is nothing to free: the record says so
(`noop=True`) and no tensor is touched, unless `force=True` (copies anyway; used by the tests to
exercise the swap logic on CPU-only machines).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

log = logging.getLogger("rlp_engine.engine")


@dataclass
class OffloadRecord:
    direction: str  # "offload" or "reload"
    seconds: float
    bytes: int
    tensors: int
    noop: bool
    what: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class OffloadState:
    """What was moved, so `reload` can put it back where it was."""

    device: torch.device
    what: tuple[str, ...]
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    records: list[OffloadRecord] = field(default_factory=list)


def _move(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """A copy of t on device. DTensors (FSDP2 state) move their local shard via DTensor.to;
    plain tensors headed for the host land in pinned memory when pin is set."""
    if isinstance(t, DTensor):
        return t.to(device, non_blocking=True, copy=True)
    if pin and device.type == "cpu":
        host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to(device, non_blocking=True, copy=True)


def _nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[dict, str]]:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # 0-d step counters stay put
                yield state, key


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return (p.to_local() if isinstance(p, DTensor) else p).device


def _swap(model, optimizer, what, device, pin, grads_store) -> tuple[int, int]:
    """Move the selected state to device; grads go into grads_store (offload only). Returns
    (bytes, tensors)."""
    moved = count = 0
    if "optimizer" in what and optimizer is not None:
        for state, key in _state_tensors(optimizer):
            moved += _nbytes(state[key])
            state[key] = _move(state[key], device, pin)
            count += 1
    if "grads" in what and grads_store is not None:
        for p in model.parameters():
            if p.grad is not None:  # kept aside: a grad must live on its parameter's device
                moved += _nbytes(p.grad)
                grads_store[id(p)] = _move(p.grad, device, pin)
                p.grad = None
                count += 1
    if "params" in what:
        params = list(model.parameters())
        moved += sum(_nbytes(p) for p in params)
        count += len(params)
        # Module._apply: FSDP2 overrides it to re-register its sharded parameters after the move
        model._apply(lambda t: _move(t, device, pin=False))
    return moved, count


def _restore_grads(model, state: OffloadState, device) -> tuple[int, int]:
    moved = count = 0
    for p in model.parameters():
        g = state.grads.pop(id(p), None)
        if g is not None:
            moved += _nbytes(g)
            p.grad = _move(g, device, pin=False)
            count += 1
    return moved, count


def offload(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    params: bool = False,
    grads: bool = True,
    force: bool = False,
) -> OffloadState:
    """Move optimizer state and grads (and params if asked) of a (possibly FSDP2) model to the CPU."""
    what = tuple(
        w for w, on in (("optimizer", optimizer is not None), ("grads", grads), ("params", params)) if on
    )
    device = _device_of(model)
    state = OffloadState(device, what)
    t0 = time.perf_counter()
    if device.type == "cpu" and not force:
        state.records.append(OffloadRecord("offload", 0.0, 0, 0, True, what))
        log.info("offload: state already on cpu, nothing moved")
        return state
    pin = device.type == "cuda"
    moved, count = _swap(model, optimizer, what, torch.device("cpu"), pin, state.grads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the pinned copies must land before the device memory is reused
        torch.cuda.empty_cache()
    record = OffloadRecord("offload", time.perf_counter() - t0, moved, count, False, what)
    state.records.append(record)
    log.info("offload: %s", record.as_dict())
    return state


def reload(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: OffloadState) -> OffloadRecord:
    """Put back what `offload` moved, on the device it came from."""
    t0 = time.perf_counter()
    if state.records and state.records[0].noop:
        record = OffloadRecord("reload", 0.0, 0, 0, True, state.what)
    else:
        what = tuple(w for w in state.what if w != "grads")
        moved, count = _swap(model, optimizer, what, state.device, False, None)
        if "grads" in state.what:
            g_bytes, g_count = _restore_grads(model, state, state.device)
            moved, count = moved + g_bytes, count + g_count
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
        record = OffloadRecord("reload", time.perf_counter() - t0, moved, count, False, state.what)
    state.records.append(record)
    log.info("reload: %s", record.as_dict())
    return record


@contextmanager
def offloaded(model, optimizer=None, params: bool = False, grads: bool = True, force: bool = False):
    """`with offloaded(model, opt) as state:` generation runs inside; state.records has both records."""
    state = offload(model, optimizer, params=params, grads=grads, force=force)
    try:
        yield state
    finally:
        reload(model, optimizer, state)
