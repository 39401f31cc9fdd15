"""Crash-safe checkpoints and exact resume.

Layout under <output_dir>/resume/ (internal state; the HF exports users load are in checkpoints/):

    ckpt-000007/            one complete checkpoint; the highest number is the newest
        meta.pt             pipeline state: config, finished stages and their small results
                            (samples, statistics, seconds), the current stage's loop state (step,
                            scheduler, data generators and position), metrics.jsonl length, throughput
        rng-rank<r>.pt      each rank's torch (CPU and CUDA), numpy and python RNG states

meta.pt and rng-rank<r>.pt hold only plain types and tensors, so they load with
`torch.load(..., weights_only=True)`: dataclass records (samples, preference pairs) are stored as
tagged dicts and rebuilt on load (only dataclasses defined in rlp_engine), numpy's RNG state as lists.
The DCP directories (state/ below) are checked by dcp_check.check_dcp_dir before DCP reads them
(it unpickles `.metadata` and non-tensor entries unrestricted).
        state/              the current stage's models and optimizers: torch.distributed.checkpoint
                            (DCP) files, written by every rank in parallel, loadable on any world size;
                            a layout with its own files writes those instead and a layout.json
                            (ZeRO-3: DeepSpeed's per-rank files, engine/layout/zero3.py)
    stages/<name>/          a finished stage's output models (DCP), kept for the run's lifetime
    .tmp-*                  under construction: never read, removed by the next save

Atomicity: a checkpoint is written into a `.tmp-` sibling, every file fsync'ed, then renamed to its
final name (rename is atomic on POSIX) and the parent directory fsync'ed. A process killed at any
moment leaves either the old set of complete checkpoints or the old set plus the new one. Only the
last `keep` complete checkpoints are kept (older ones are deleted after the new one is in place).

Every function here is a collective under torchrun (all ranks call it in the same order); single
process it needs no process group.

Ctrl-C and SIGTERM: engine/interrupts.py (`LoopCheckpoint.step_done` saves and raises `Interrupted`
there).

Fault injection: a caller may pass a `Hook`, called as hook(event, stage, step) at fixed points of
a run (`LoopCheckpoint.hook`; the pipeline also calls it at each stage's start). The tests' hook
(tests/fault_runner.py) SIGKILLs a rank or raises there; production code passes none, reads no
environment variable for it and kills nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rlp_engine.config import ConfigError
from rlp_engine.engine.dcp_check import check_dcp_dir
from rlp_engine.engine.distributed import barrier, rank_and_world
from rlp_engine.engine.interrupts import SIGINT, Interrupted

CKPT_RE = re.compile(r"^ckpt-(\d{6})$")

# The points of a run a `Hook` sees (every rank calls it), with the `step` it gets:
#   "stage_start"  a stage that is not replayed from a checkpoint starts; step: where it starts
#                  (0, or the loop step a resumed stage continues from)
#   "step_done"    right after loop step `step` (1-based count of finished steps) and its
#                  checkpoint, if any, was written
#   "saving"       in the middle of writing loop step `step`'s checkpoint: this rank's files are
#                  written, the rename that makes them a checkpoint is not done
Event = Literal["stage_start", "step_done", "saving"]
Hook = Callable[[Event, str, int], None]


# ---------------------------------------------------------------- files, fsync and atomic rename


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes its entries - renames - durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, children before parents."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def save_file(obj, path: Path) -> None:
    """torch.save + fsync (the file is complete on disk when this returns)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- plain types for weights_only loads

_TAG = "__dataclass__"
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def to_plain(obj, where: str = "meta"):
    """`obj` with every dataclass instance replaced by {_TAG: "module.Class", "fields": {...}} and
    numpy scalars by Python numbers, so that torch.load(weights_only=True) reads it back. Anything
    else that is not a plain type or a tensor raises TypeError here, when saving, naming its place."""
    if isinstance(obj, np.generic):  # before _PLAIN: np.float64 is a float but pickles as numpy
        return obj.item()
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = {
            f.name: to_plain(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)
        }
        return {_TAG: f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    raise TypeError(
        f"checkpoint: {where} is a {type(obj).__name__}; store plain types, tensors or dataclasses"
    )


def _record_class(name: str) -> type:
    """The dataclass `name` ("rlp_engine.x.y.Class"); nothing outside rlp_engine is imported."""
    module, _, qualname = name.rpartition(".")
    if not module.startswith("rlp_engine."):
        raise ValueError(f"checkpoint: record type {name!r} is not an rlp_engine dataclass")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ValueError(f"checkpoint: record type {name!r} is not an rlp_engine dataclass")
    return cls


def from_plain(obj):
    """Inverse of `to_plain`: the tagged dicts become their dataclasses again (built as pickle does,
    without calling __init__, so frozen records come back too)."""
    if isinstance(obj, dict):
        if _TAG in obj and set(obj) == {_TAG, "fields"}:
            cls = _record_class(obj[_TAG])
            rec = cls.__new__(cls)
            for k, v in obj["fields"].items():
                object.__setattr__(rec, k, from_plain(v))
            return rec
        return {k: from_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def load_plain(path: Path):
    """A meta or RNG file, read with weights_only=True (plain types and tensors only)."""
    try:
        return from_plain(torch.load(path, weights_only=True))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"resume: {path} cannot be read with torch.load(weights_only=True) ({first}); it was written "
            "by an older rlp-engine or is not one of its checkpoints: resume it with the version that "
            "wrote it, or choose another --output-dir"
        ) from err


def publish(tmp: Path, final: Path) -> None:
    """Make the finished directory `tmp` visible as `final` in one atomic rename (replacing an older
    `final`: moved aside first, deleted after), then fsync the parent so the rename survives a crash."""
    fsync_tree(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's global RNG states: torch CPU (and every CUDA device), numpy (its legacy
    MT19937 tuple, the key array as a list of ints), python."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- model and optimizer tensors (DCP)


def _tensor_state(modules: dict[str, nn.Module], optimizers: list[torch.optim.Optimizer]):
    """(holder, state dict) for DCP: the modules under one ModuleDict so that one optimizer over
    several of them (PPO's actor + critic) maps its parameters to their names. Optimizer states that
    do not exist yet are created (zero steps) so that DCP can load into them in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    holder = nn.ModuleDict(modules)
    if not optimizers:
        return holder, {"model": get_model_state_dict(holder)}
    msd, osd = get_state_dict(holder, optimizers)
    return holder, {"model": msd, "optim": osd}


# A layout that keeps its own checkpoint files (DeepSpeed ZeRO-3: per-rank partitions) passes, instead
# of a dict of modules, an object with save_state(path) / load_state(path), and writes LAYOUT_FILE
# ({"layout": name, ...}) beside its files, so that another layout's resume is refused by name.
LAYOUT_FILE = "layout.json"


def _own_files(modules) -> bool:
    return hasattr(modules, "save_state") and hasattr(modules, "load_state")


def save_tensors(path: Path, modules: dict[str, nn.Module], optimizers=()) -> None:
    """Collective: DCP save of the modules' and optimizers' state into directory `path`. A layout with
    its own files (see LAYOUT_FILE: `modules.save_state`; it holds its optimizer, `optimizers` is then
    unused) writes those instead."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    if _own_files(modules):
        modules.save_state(Path(path))
        return
    _, sd = _tensor_state(modules, list(optimizers))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(
            sd, storage_writer=FileSystemWriter(str(path), sync_files=True), no_dist=not dist.is_initialized()
        )


def load_tensors(path: Path, modules: dict[str, nn.Module], optimizers=()) -> None:
    """Collective: load a `save_tensors` directory into the modules and optimizers in place (any
    world size: DCP reshards). A layout with its own files (`modules.load_state`) reads those."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if _own_files(modules):
        modules.load_state(Path(path))
        return
    if (path / LAYOUT_FILE).is_file():
        layout = json.loads((path / LAYOUT_FILE).read_text()).get("layout", "another layout")
        raise ValueError(
            f"resume: {path} was written by {layout} (its own checkpoint files) and loads only into the "
            "same layout; resume with the run.train_backend that wrote it"
        )
    check_dcp_dir(path)  # DCP unpickles .metadata and non-tensor entries unrestricted: check first
    optimizers = list(optimizers)
    holder, sd = _tensor_state(modules, optimizers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(sd, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    if optimizers:
        set_state_dict(holder, optimizers, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        set_model_state_dict(holder, sd["model"])


# ---------------------------------------------------------------- the store


def _broadcast(obj):
    """rank 0's `obj` on every rank (identity single-process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointStore:
    """The numbered checkpoints and the finished stages' artifacts of one run directory."""

    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"run.keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.seq = self.latest_seq()  # the newest complete checkpoint's number (0: none)
        if rank_and_world()[0] == 0 and self.root.is_dir():
            for junk in self.root.glob(".tmp-*"):  # left by a process killed while saving
                shutil.rmtree(junk, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (rank 0's view, shared with every rank)."""
        found = []
        if rank_and_world()[0] == 0 and self.root.is_dir():
            found = sorted(
                p for p in self.root.iterdir() if CKPT_RE.match(p.name) and (p / "meta.pt").is_file()
            )
        return [Path(p) for p in _broadcast([str(p) for p in found])]

    def latest_seq(self) -> int:
        paths = self.complete()
        return int(CKPT_RE.match(paths[-1].name).group(1)) if paths else 0

    def latest(self) -> tuple[Path, dict] | None:
        """(path, meta) of the newest complete checkpoint, or None."""
        paths = self.complete()
        if not paths:
            return None
        return paths[-1], load_plain(paths[-1] / "meta.pt")

    def save(
        self,
        meta: dict,
        modules: dict[str, nn.Module] | None = None,
        optimizers=(),
        before_publish: Callable[[], None] | None = None,
    ) -> Path:
        """Collective: write checkpoint number seq+1 atomically; prune to the last `keep`.
        `before_publish()` runs on every rank once its files are written, before the rename."""
        rank, _ = rank_and_world()
        self.seq += 1
        final = self.root / f"ckpt-{self.seq:06d}"
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        if modules:
            save_tensors(tmp / "state", modules, optimizers)
        save_file(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0:
            save_file(to_plain({**meta, "seq": self.seq}), tmp / "meta.pt")
        if before_publish is not None:
            before_publish()
        barrier()  # every rank's files are on disk before the rename makes them a checkpoint
        if rank == 0:
            publish(tmp, final)
            for old in self.complete_local()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def complete_local(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if CKPT_RE.match(p.name))

    def restore(self, path: Path, modules: dict[str, nn.Module] | None = None, optimizers=()) -> None:
        """Collective: load checkpoint `path`'s tensors into modules/optimizers and this rank's RNG.
        A rank without its own RNG file (resumed on more ranks than saved) keeps a fresh seed from
        rank 0's state plus its rank, and says so."""
        rank, _ = rank_and_world()
        if modules:
            load_tensors(path / "state", modules, optimizers)
        own = path / f"rng-rank{rank}.pt"
        if own.is_file():
            set_rng_state(load_plain(own))
        else:
            set_rng_state(load_plain(path / "rng-rank0.pt"))
            torch.manual_seed(torch.initial_seed() + rank)
            print(f"[rlp-engine] rank {rank}: {path.name} has no RNG state for it; reseeded", flush=True)

    # finished stages' output models
    def save_artifact(self, stage: str, modules: dict[str, nn.Module]) -> None:
        """Collective: the finished stage's models under stages/<stage>, atomically. A stage without
        models (sampling P: its results live in the checkpoint's meta) writes nothing."""
        if not modules:
            return
        rank, _ = rank_and_world()
        final = self.root / "stages" / stage
        tmp = final.with_name(f".tmp-{stage}")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save_tensors(tmp / "state", modules)
        barrier()
        if rank == 0:
            publish(tmp, final)
        barrier()

    def load_artifact(self, stage: str, modules: dict[str, nn.Module]) -> None:
        path = self.root / "stages" / stage / "state"
        if modules:  # a stage without models saved none (save_artifact)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"resume: {path} is missing (the checkpoint says stage {stage} finished)"
                )
            load_tensors(path, modules)


# ---------------------------------------------------------------- what a training loop sees


@dataclass
class LoopCheckpoint:
    """The checkpoint handle of one training loop (one pipeline stage).

    At its start the loop calls `resume(modules, optimizers)`: the loop state saved inside this
    stage (a dict the loop wrote: step, scheduler, generators, ...) after loading the tensors and
    RNG, or None to start from step 0. After each step it calls `step_done(step, total, state)`
    with the number of finished steps; every `every` steps (not after the last one: the stage's
    end writes its own checkpoint) `state()` -> (modules, optimizers, loop state) is saved. After a
    SIGINT or SIGTERM (`save_on_sigint`) the next `step_done` saves at its step, the last one included (a loop
    resumed there runs no step and returns as it would have), and raises `Interrupted`."""

    store: CheckpointStore
    stage: str
    every: int
    base_meta: Callable[[], dict]  # the pipeline's part of the meta (config, finished stages, ...)
    resume_from: tuple[Path, dict] | None = None  # a checkpoint inside this stage
    hook: Hook | None = None  # called at "step_done" and "saving" (fault-injection tests)
    saved: list[int] = field(default_factory=list)

    def resume(self, modules: dict[str, nn.Module], optimizers=()) -> dict | None:
        SIGINT.armed, SIGINT.stage, SIGINT.step = SIGINT.installed, self.stage, 0
        if self.resume_from is None:
            return None
        path, meta = self.resume_from
        self.resume_from = None
        self.store.restore(path, modules, optimizers)
        SIGINT.step = meta["loop"]["step"]
        return meta["loop"]

    def step_done(self, step: int, total: int, state: Callable[[], tuple[dict, list, dict]]) -> None:
        SIGINT.step = step
        path = None
        if self.every > 0 and step % self.every == 0 and step < total:
            path = self._save(step, state)
        if SIGINT.requested:
            raise Interrupted(self.stage, step, path or self._save(step, state))
        if self.hook is not None:
            self.hook("step_done", self.stage, step)
        if step >= total:
            SIGINT.armed = False  # after the loop a SIGINT stops at once

    def _save(self, step: int, state: Callable[[], tuple[dict, list, dict]]) -> Path:
        modules, optimizers, loop = state()
        meta = {**self.base_meta(), "stage": self.stage, "loop": {**loop, "step": step}}
        hook = self.hook
        saving = None if hook is None else lambda: hook("saving", self.stage, step)
        path = self.store.save(meta, modules, optimizers, before_publish=saving)
        self.saved.append(step)
        return path


def generator_states(*gens: torch.Generator) -> list[torch.Tensor]:
    return [g.get_state() for g in gens]


def set_generator_states(gens, states) -> None:
    for g, s in zip(gens, states, strict=True):
        g.set_state(s)
