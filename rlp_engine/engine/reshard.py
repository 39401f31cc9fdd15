"""Weight resharding from the training layout (FSDP2 shards) to the generation layout.

Training parameters are gathered one at a time as full tensors (`DTensor.full_tensor()`; plain
tensors pass through), packed into one reusable flat bucket of fixed size, and each full bucket is
handed to a sink (the built-in generator's module, or vLLM's `load_weights`). Only the bucket and
the one parameter being gathered exist beside the two models' own weights: never a second full
copy of the model. Every rank gathers the same parameters in the same order (the gathers are
collectives), so call `sync_weights` on all ranks.

Every rank receives full weights: the built-in generator is data-parallel (a whole model per rank),
and vLLM's model loaders shard full Hugging Face-named tensors for tensor parallelism themselves
(rlp_engine.engine.vllm_backend), so no slicing happens here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from rlp_engine.models.policy import unwrap_lm

log = logging.getLogger("rlp_engine.engine")

_ALIGN = 64  # bytes: every packed tensor starts on a 64-byte boundary (vector loads, any dtype view)

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class SwitchRecord:
    """What one training -> generation weight switch did."""

    seconds: float
    bytes: int  # bytes of full tensors delivered to the sink
    buckets: int
    tensors: int
    bucket_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers a DTensor (a collective), returns a plain tensor unchanged."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def iter_full_params(model: nn.Module, include_buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each parameter (and persistent buffer when asked), one at a time.
    A CausalLMLogprobs (the training wrapper) gives its LM's names, as the generation copy has them.
    Parameters FSDP2 left gathered after a forward (its root with reshard_after_forward=False) are
    plain tensors at that moment, holding the same values as the shards: they pass through."""
    model = unwrap_lm(model)
    for name, p in model.named_parameters():
        yield name, full_tensor(p)
    if include_buffers:
        non_persistent = {
            f"{mod_name}.{b}" if mod_name else b
            for mod_name, mod in model.named_modules()
            for b in getattr(mod, "_non_persistent_buffers_set", ())
        }
        for name, b in model.named_buffers():
            if name not in non_persistent:
                yield name, full_tensor(b)


def make_name_map(name_map) -> Callable[[str], str | None]:
    """None -> identity; dict -> mapped name (names not in it unchanged; a None value skips the
    tensor); callable(name) -> new name or None to skip."""
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, dict):
        return lambda name: name_map.get(name, name)
    if callable(name_map):
        return name_map
    raise TypeError(
        f"sync_weights: name_map must be None, a dict or a callable, got {type(name_map).__name__}"
    )


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, device: torch.device | None = None
) -> Iterator[Bucket]:
    """Pack (name, tensor) pairs into one reused flat buffer of bucket_bytes; yield each full bucket
    as (name, view) pairs. The views are only valid until the next bucket is requested: a sink must
    copy them out. A tensor larger than the bucket is yielded alone, as is (no copy)."""
    if bucket_bytes < _ALIGN:
        raise ValueError(f"sync_weights: bucket size must be at least {_ALIGN} bytes, got {bucket_bytes}")
    buffer: torch.Tensor | None = None
    pending: Bucket = []
    offset = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if nbytes > bucket_bytes:
            if pending:
                yield pending
                pending, offset = [], 0
            yield [(name, t)]
            continue
        if offset + nbytes > bucket_bytes:
            yield pending
            pending, offset = [], 0
        if buffer is None:  # allocated once, on the device the tensors arrive on
            buffer = torch.empty(bucket_bytes, dtype=torch.uint8, device=device or t.device)
        view = buffer[offset : offset + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        pending.append((name, view))
        offset += _aligned(nbytes)
    if pending:
        yield pending


def sync_weights(
    src: nn.Module | None,
    sink: Callable[[Bucket], None],
    bucket_mb: float = 256.0,
    name_map=None,
    include_buffers: bool = False,
    device: torch.device | None = None,
    named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> SwitchRecord:
    """Stream src's full parameters in buckets of bucket_mb MB into sink(bucket); returns the record.

    name_map renames (or skips, with None) source names for the destination (see make_name_map).
    named_tensors replaces the FSDP2/plain gather of src (e.g. a ZeRO-3 gather; src is then unused
    and may be None). Must run on every rank when src is sharded (each gather is a collective)."""
    if not bucket_mb > 0:
        raise ValueError(f"sync_weights: bucket_mb must be > 0, got {bucket_mb!r}")
    rename = make_name_map(name_map)
    bucket_bytes = int(bucket_mb * 2**20)
    t0 = time.perf_counter()
    moved = buckets = tensors = 0

    source = named_tensors if named_tensors is not None else iter_full_params(src, include_buffers)

    def renamed():
        for name, t in source:
            new = rename(name)
            if new is not None:
                yield new, t

    with torch.no_grad():
        for bucket in iter_buckets(renamed(), bucket_bytes, device):
            sink(bucket)
            buckets += 1
            tensors += len(bucket)
            moved += sum(t.numel() * t.element_size() for _, t in bucket)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    record = SwitchRecord(time.perf_counter() - t0, moved, buckets, tensors, bucket_bytes)
    log.info("weight sync: %s", record.as_dict())
    return record


class ModuleSink:
    """Copies buckets into an nn.Module's parameters (and buffers) by name, in place."""

    def __init__(self, module: nn.Module):
        # remove_duplicate=False: tied weights are reachable under every name they have
        self.targets = dict(module.named_parameters(remove_duplicate=False))
        self.targets.update(module.named_buffers(remove_duplicate=False))
        self.params = {id(p) for p in module.parameters()}
        self.written: set[int] = set()

    def __call__(self, bucket: Bucket) -> None:
        with torch.no_grad():
            for name, t in bucket:
                dst = self.targets.get(name)
                if dst is None:
                    raise KeyError(
                        f"sync_weights: destination has no parameter named {name!r} (pass a name_map)"
                    )
                if t.shape != dst.shape:
                    raise ValueError(
                        f"sync_weights: {name!r} has shape {tuple(t.shape)}, destination {tuple(dst.shape)}"
                    )
                dst.copy_(t)
                self.written.add(id(dst))

    def check_complete(self) -> None:
        """Raise if a destination parameter was never written (a name mismatch left it stale)."""
        missing = [n for n, p in self.targets.items() if id(p) in self.params and id(p) not in self.written]
        if missing:
            raise RuntimeError(f"sync_weights: destination parameters not written: {missing[:8]}")


def sync_to_module(src: nn.Module, dst: nn.Module, bucket_mb: float = 256.0, name_map=None) -> SwitchRecord:
    """Training model -> generation module (built-in generator), checking every parameter arrived."""
    return load_into_module(iter_full_params(src), dst, bucket_mb, name_map)


def load_into_module(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dst: nn.Module, bucket_mb: float = 256.0, name_map=None
) -> SwitchRecord:
    """(name, full tensor) pairs -> the same-named parameters of `dst`, in buckets on dst's device,
    checking every parameter arrived (the built-in rollout's load_weights)."""
    sink = ModuleSink(dst)
    device = next(dst.parameters()).device
    record = sync_weights(None, sink, bucket_mb, name_map, device=device, named_tensors=named_tensors)
    sink.check_complete()
    return record
