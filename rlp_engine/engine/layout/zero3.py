"""DeepSpeed ZeRO-3: the other training layout (optional; deepspeed is imported lazily).

`zero3_config` builds the config dict, `initialize` wraps a model and optimizer, and
`iter_zero3_params` gathers the partitioned parameters module by module
(`deepspeed.zero.GatheredParameters`) so that `sync_zero3` streams them into the generation side
through the same buckets as FSDP2 (rlp_engine.engine.reshard): one module's parameters are whole
at a time, never the model.

Setup (tests/test_deepspeed.py runs it on CPU with 2 processes): join the process group first
(rlp_engine.engine.distributed.init_distributed; `deepspeed.initialize` adopts an existing group, gloo
on CPU, where DS_ACCELERATOR=cpu and no oneCCL is needed) and wrap the policy as the pipeline trains it,
`CausalLMLogprobs(lm)`, with a plain torch optimizer. The fused log-prob op reads the LM head's weight
outside `lm_head`'s forward; ZeRO-3 notices the access to a partitioned parameter during the wrapper's
forward, gathers it and registers it as an external parameter of the wrapper, so nothing is needed for it.

The pipeline's ZeRO-3 layout (run.train_backend=deepspeed under torchrun): `prepare_zero3` wraps the
modules one optimizer trains (SFT's policy, a reward model, PPO's actor and critic together, so one clip
covers both as in the FSDP2 path) in one engine and hands the loop a `Route` per module. Every call of a
route goes through the engine's forward: that is where DeepSpeed hooks the start of backward (a call of
the bare module would skip it). `guarded_step` is guards.guarded_step for an engine, `save_engines` /
`load_engines` are the loop checkpoints (DeepSpeed's own per-rank files: same world size to resume).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from rlp_engine.engine import reshard
from rlp_engine.engine.checkpoint import LAYOUT_FILE
from rlp_engine.engine.distributed import rank_and_world
from rlp_engine.engine.guards import NonFiniteGuard, combine_flags, record_skip
from rlp_engine.models.policy import CausalLMLogprobs, unwrap_lm


def import_deepspeed():
    """The deepspeed module, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(
            "the ZeRO-3 backend needs DeepSpeed (pip install 'rlp-engine[deepspeed]'; on CPU its first "
            "process group compiles the deepspeed_shm_comm op once, about 100 s of CPU); "
            "FSDP2 (rlp_engine.engine.layout.fsdp) needs nothing extra"
        ) from err


def zero3_config(
    micro_batch_size: int,
    grad_accum: int = 1,
    bf16: bool | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    grad_clip: float | None = 1.0,
) -> dict:
    """A ZeRO-3 config. bf16 defaults to on with CUDA, off on CPU; offloads go to pinned host memory."""
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(
            f"zero3_config: micro_batch_size and grad_accum must be >= 1, "
            f"got {micro_batch_size}, {grad_accum}"
        )
    bf16 = torch.cuda.is_available() if bf16 is None else bf16
    host = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "offload_optimizer": host if offload_optimizer else {"device": "none"},
            "offload_param": host if offload_params else {"device": "none"},
            # weights for generation are gathered by sync_zero3, not at save time
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # our optimizers are plain torch ones
        "wall_clock_breakdown": False,
    }
    if grad_clip is not None:
        config["gradient_clipping"] = grad_clip
    return config


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize on an already-created model and optimizer; returns the engine."""
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def iter_zero3_params(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter of a ZeRO-3 model, gathered one module at a time.
    Each tensor is valid only until the next one is requested (the module is re-partitioned after)."""
    deepspeed = import_deepspeed()
    model = getattr(model, "module", model)  # a DeepSpeedEngine wraps the model
    for mod_name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        # modifier_rank=None: read-only gather on every rank (a collective: all ranks iterate alike)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, p in params:
                yield (f"{mod_name}.{name}" if mod_name else name), p.data


def sync_zero3(model: nn.Module, sink, bucket_mb: float = 256.0, name_map=None) -> reshard.SwitchRecord:
    """Stream a ZeRO-3 model's weights into sink (ModuleSink, VLLMEngine.load_bucket) in buckets."""
    return reshard.sync_weights(model, sink, bucket_mb, name_map, named_tensors=iter_zero3_params(model))


# ---------------------------------------------------------------- the pipeline's ZeRO-3 layout


def is_engine(obj) -> bool:
    """A DeepSpeedEngine (False without importing deepspeed when it was never imported)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(obj, deepspeed.DeepSpeedEngine)


class Members(nn.Module):
    """The modules one engine trains, called by name: forward(name, *args, **kwargs) is
    parts[name](*args, **kwargs), so a call of any of them is a call of the engine's forward."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def forward(self, name: str, *args, **kwargs):
        return self.parts[name](*args, **kwargs)


class Route:
    """What a training loop holds for one module of a ZeRO-3 engine: calls go through the engine.
    `module` is the partitioned module itself (for gathers, never to be called directly)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    @property
    def module(self) -> nn.Module:
        return self.engine.module.parts[self.name]

    def __call__(self, *args, **kwargs):
        return self.engine(self.name, *args, **kwargs)

    # ScalarHeadModel's methods, each one forward call (as its own methods do)
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self(input_ids, attention_mask, output="score")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self(input_ids, attention_mask, output="values")

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self(input_ids, attention_mask, output="final_hidden")

    def train(self, mode: bool = True) -> Route:
        self.engine.train(mode)
        return self


def prepare_zero3(
    parts: dict[str, nn.Module], make_optimizer: Callable, max_grad_norm: float
) -> tuple[dict[str, Route], object, torch.optim.Optimizer]:
    """One ZeRO-3 engine over `parts` (name -> module; a causal LM is wrapped in CausalLMLogprobs) and
    `make_optimizer(params)` (a plain torch optimizer over all their parameters, in the parts' order).
    The modules are partitioned in place (pass copies to keep full ones); rank 0's weights are
    broadcast by DeepSpeed. Gradients are averaged over ranks, and clipped by DeepSpeed at
    max_grad_norm over all partitions (torch's factor min(1, max / (norm + 1e-6)) up to rounding: DeepSpeed
    divides by its inverse; none when <= 0 or inf).
    Returns ({name: Route}, engine, the torch optimizer: give it the LR scheduler)."""
    wrapped = {}
    for name, m in parts.items():
        is_lm = not isinstance(m, CausalLMLogprobs) and hasattr(m, "get_output_embeddings")
        wrapped[name] = CausalLMLogprobs(m) if is_lm else m
    members = Members(wrapped)
    optimizer = make_optimizer(members.parameters())
    clip = float(max_grad_norm) if 0 < float(max_grad_norm) < math.inf else None
    engine = initialize(members, optimizer, zero3_config(1, grad_clip=clip))
    return {name: Route(engine, name) for name in parts}, engine, optimizer


def _lm_names(route: Route):
    """The name map from the routed module's names to the plain model's (CausalLMLogprobs adds "lm.")."""
    if isinstance(route.module, CausalLMLogprobs):
        return lambda n: n.removeprefix("lm.")
    return None


def sync_route_to_module(route: Route, dst: nn.Module, bucket_mb: float = 256.0) -> reshard.SwitchRecord:
    """Collective: a routed module's full weights into the plain model `dst` (every parameter of
    `dst` must be written), in buckets, one module's parameters gathered at a time."""
    sink = reshard.ModuleSink(unwrap_lm(dst))
    record = sync_zero3(route.module, sink, bucket_mb, name_map=_lm_names(route))
    sink.check_complete()
    return record


def guarded_step(
    loss: torch.Tensor, engine, *, guard: NonFiniteGuard, step: int, scheduler=None
) -> tuple[bool, torch.Tensor]:
    """guards.guarded_step for a ZeRO-3 engine (clipping: the engine's gradient_clipping).

    A non-finite loss on any rank (one all-reduced flag) skips the step BEFORE backward: no gradient
    is reduced and the engine is not stepped. A non-finite gradient is found by DeepSpeed itself in
    engine.step(): its global norm over all partitions (all-reduced, so every rank agrees) is not
    finite, and ZeRO-3 then drops the gradients without touching the weights or the optimizer state
    and reports the norm as inf. Either way the guard counts the skip on every rank and raises
    NonFiniteError past its limit; the scheduler steps only after an applied update.
    Returns (applied, grad_norm before clipping as a 0-dim fp32 tensor)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"guarded_step ({guard.stage}): loss must be a 0-dim tensor, got {shape}")
    loss_d = loss.detach()
    no_grad_flag = torch.zeros((), dtype=torch.bool)
    bad, bad_loss_ranks = combine_flags(~torch.isfinite(loss_d), no_grad_flag)
    if bad:
        record_skip(guard, step, loss_d, torch.tensor(float("nan")), bad_loss_ranks)
        return False, torch.tensor(float("nan"))
    engine.backward(loss)
    engine.step()
    grad_norm = torch.tensor(float(engine.get_global_grad_norm()), dtype=torch.float32)
    if not torch.isfinite(grad_norm):  # ZeRO-3 skipped it (overflow): nothing was applied
        record_skip(guard, step, loss_d, grad_norm, [])
        return False, grad_norm
    if scheduler is not None:
        scheduler.step()
    return True, grad_norm


class Zero3Checkpoint:
    """What a ZeRO-3 loop hands engine.checkpoint: DeepSpeed's own files of its engines (weights and
    optimizer state, every rank its own partition), on the same world size only."""

    def __init__(self, engines: dict):
        self.engines = engines

    def save_state(self, path: Path) -> None:
        save_engines(path, self.engines)

    def load_state(self, path: Path) -> None:
        load_engines(path, self.engines)


class Zero3Handle:
    """TrainHandle (engine/layout/__init__.py) over one ZeRO-3 engine: `parts` are Routes, the step is
    the engine's (its own clipping and overflow check), checkpoints are DeepSpeed's own files."""

    def __init__(self, routes: dict[str, Route], engine, optimizer: torch.optim.Optimizer):
        self.parts, self.engine, self.optimizer = routes, engine, optimizer

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def step(
        self, loss: torch.Tensor, *, guard: NonFiniteGuard, step: int, scheduler=None
    ) -> tuple[bool, torch.Tensor]:
        return guarded_step(loss, self.engine, guard=guard, step=step, scheduler=scheduler)

    def checkpoint_modules(self) -> Zero3Checkpoint:
        return Zero3Checkpoint({"_".join(self.parts): self.engine})

    def offloaded(self, name: str) -> AbstractContextManager:
        return nullcontext()  # gathered module by module when synced; nothing to move aside

    def full_weights(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """HF names (CausalLMLogprobs' "lm." dropped), one module's parameters gathered at a time."""
        route = self.parts[name]
        rename = reshard.make_name_map(_lm_names(route))
        return ((rename(n), t) for n, t in iter_zero3_params(route.module))

    def load_full_weights(self, name: str, dst: nn.Module) -> None:
        sync_route_to_module(self.parts[name], dst)


def zero3_handle(
    parts: dict[str, nn.Module], make_optimizer: Callable, max_grad_norm: float, copy: bool = False
) -> Zero3Handle:
    """`prepare_zero3` over `parts` (deep copies with copy=True: the partitioning is in place)."""
    import copy as copy_module

    if copy:
        parts = {name: copy_module.deepcopy(m) for name, m in parts.items()}
    routes, engine, optimizer = prepare_zero3(parts, make_optimizer, max_grad_norm)
    return Zero3Handle(routes, engine, optimizer)


# ---------------------------------------------------------------- loop checkpoints

INFO_FILE = LAYOUT_FILE  # {"layout": "DeepSpeed ZeRO-3", "world_size", "tags"}


def save_engines(path: Path, engines: dict) -> None:
    """Collective: each engine's DeepSpeed checkpoint (weights and optimizer state, every rank its own
    partition files) under `path`, tag = its name, plus INFO_FILE with the world size."""
    rank, world = rank_and_world()
    for name, engine in engines.items():
        engine.save_checkpoint(str(path), tag=name, save_latest=False)
    if rank == 0:
        info = {
            "layout": "DeepSpeed ZeRO-3 (run.train_backend=deepspeed)",
            "world_size": world,
            "tags": list(engines),
        }
        (Path(path) / INFO_FILE).write_text(json.dumps(info))


def load_engines(path: Path, engines: dict) -> None:
    """Collective: load a `save_engines` directory into the engines (weights and optimizer state).
    ZeRO-3's partition files fit only the world size that wrote them: another one is refused."""
    info_path = Path(path) / INFO_FILE
    if not info_path.is_file():
        raise ValueError(
            f"resume: {path} is not a DeepSpeed checkpoint (no {INFO_FILE}) but run.train_backend is "
            "deepspeed; resume with the backend that wrote it"
        )
    info = json.loads(info_path.read_text())
    world = rank_and_world()[1]
    if info["world_size"] != world or sorted(info["tags"]) != sorted(engines):
        raise ValueError(
            f"resume: {path} holds DeepSpeed ZeRO-3 state of {info['tags']} written on {info['world_size']} "
            f"ranks; it loads only into the same modules on the same number of ranks (this run: "
            f"{sorted(engines)} on {world}). Resume with that world size, or from a stage boundary"
        )
    for name, engine in engines.items():
        load_path, _ = engine.load_checkpoint(
            str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"resume: DeepSpeed found no checkpoint {name!r} under {path}")
