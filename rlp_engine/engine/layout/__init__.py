"""Training layouts: how the modules one optimizer trains are laid out over the ranks and stepped.

A recipe (rlp_engine/recipes) never asks which backend runs: it builds a `TrainHandle` with
`train_handle(parts, make_optimizer, ...)` and then only

    handle.parts[name](...)        calls a trained module (a causal LM part is called through
                                   models.policy.response_logprobs; a ScalarHeadModel part through
                                   score / values / final_hidden)
    handle.step(loss, ...)         backward, non-finite guard, clip, optimizer (and scheduler) step
    handle.checkpoint_modules()    what LoopCheckpoint saves and restores
    handle.offloaded(name)         training state off the device while the generator runs
    handle.full_weights(name)      (HF name, full tensor) pairs of a trained part, gathered one at a
                                   time: what a rollout engine loads each iteration
    handle.load_full_weights(name, dst)   the trained weights into a plain model at the end

Two builders make one: fsdp.fsdp_handle (single process, or FSDP2 under torchrun) and
zero3.zero3_handle (run.train_backend=deepspeed under torchrun: one DeepSpeed ZeRO-3 engine over all
parts). They are the only files that know the backend; `frozen` prepares the modules a loop only
reads (PPO's reference and reward model), which both layouts keep on FSDP2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from rlp_engine.engine.distributed import rank_and_world
from rlp_engine.engine.guards import NonFiniteGuard

BACKENDS = ("fsdp2", "deepspeed")


class TrainHandle(Protocol):
    """What a training loop holds (see the module docstring); built by `train_handle`."""

    parts: dict[str, object]
    optimizer: torch.optim.Optimizer

    def train(self, mode: bool = True) -> None: ...

    def step(
        self, loss: torch.Tensor, *, guard: NonFiniteGuard, step: int, scheduler=None
    ) -> tuple[bool, torch.Tensor]: ...

    def checkpoint_modules(self) -> dict[str, nn.Module]: ...

    def offloaded(self, name: str) -> AbstractContextManager: ...

    def full_weights(self, name: str) -> Iterator[tuple[str, torch.Tensor]]: ...

    def load_full_weights(self, name: str, dst: nn.Module) -> None: ...


def uses_zero3(backend: str) -> bool:
    """run.train_backend=deepspeed under torchrun (more than one rank); single-process the loops train
    plain modules whatever the backend."""
    if backend not in BACKENDS:
        raise ValueError(f"run.train_backend: expected one of {BACKENDS}, got {backend!r}")
    return backend == "deepspeed" and rank_and_world()[1] > 1


def train_handle(
    parts: dict[str, nn.Module],
    make_optimizer: Callable,
    *,
    max_grad_norm: float,
    backend: str = "fsdp2",
    copy: bool = False,
    calls_outside_forward: bool = False,
    stage: str = "train",
) -> TrainHandle:
    """A TrainHandle over `parts` (name -> causal LM or ScalarHeadModel, one optimizer for all,
    `make_optimizer(params)` over their parameters in the parts' order; gradients clipped at
    max_grad_norm over all of them). copy=True trains copies and leaves `parts` as they are (under
    torchrun; single-process FSDP2 trains the modules themselves, as before).

    calls_outside_forward: the loop calls submodules outside the parts' forward (RLP-UML's encoder):
    ZeRO-3 hooks only calls through the engine's forward, so such a loop stays on FSDP2 (said once)."""
    from rlp_engine.engine.layout import fsdp, zero3

    if uses_zero3(backend) and calls_outside_forward:
        if rank_and_world()[0] == 0:
            print(
                f"[rlp-engine] {stage}: run.train_backend=deepspeed; this stage trains under FSDP2",
                flush=True,
            )
        backend = "fsdp2"
    if uses_zero3(backend):
        return zero3.zero3_handle(parts, make_optimizer, max_grad_norm, copy=copy)
    return fsdp.fsdp_handle(parts, make_optimizer, max_grad_norm, copy=copy)


def frozen(module: nn.Module, copy: bool = False) -> nn.Module:
    """A module a loop only reads (no optimizer): FSDP2-sharded under torchrun (each is as large as
    the actor, and sharded only one unit is gathered at a time), `module` itself single-process."""
    from rlp_engine.engine.layout.fsdp import prepare_for_training

    return prepare_for_training(module, copy=copy)
