"""Training layout: FSDP2 (`torch.distributed.fsdp.fully_shard`) over a 1-D data-parallel mesh.

Each decoder layer is its own FSDP unit (parameters gathered one layer at a time) and the root
holds the rest (embeddings, final norm, head). Works on CPU with gloo, so the multi-process tests
run anywhere; on GPU the default mixed precision computes in bf16 and reduces gradients in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

_PRECISIONS = {
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp16": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
    "fp32": None,
}


def decoder_layers(model: nn.Module, layer_classes: tuple[str, ...] | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class name is in layer_classes,
    by default the model's `_no_split_modules` (HF sets it, e.g. LlamaDecoderLayer)."""
    names = layer_classes or tuple(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError("shard_model: model has no _no_split_modules; pass layer_classes=('MyBlock',)")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_model: no submodule of class {names} found in {type(model).__name__}")
    return layers


def mixed_precision_policy(mixed_precision, device: torch.device) -> MixedPrecisionPolicy | None:
    """None -> bf16 compute / fp32 reduce on CUDA, full fp32 on CPU. Also "bf16", "fp16", "fp32"
    or a MixedPrecisionPolicy. bf16 on CPU is refused: CPU matmuls in bf16 are slow and inexact."""
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    if mixed_precision is None:
        return _PRECISIONS["bf16"] if device.type == "cuda" else None
    if mixed_precision not in _PRECISIONS:
        raise ValueError(
            f"shard_model: unknown mixed_precision {mixed_precision!r}; expected one of {tuple(_PRECISIONS)}"
        )
    if mixed_precision != "fp32" and device.type != "cuda":
        raise ValueError(
            f"shard_model: mixed_precision {mixed_precision!r} needs a CUDA device, got {device}"
        )
    return _PRECISIONS[mixed_precision]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        raise ValueError("shard_model: model has no parameters")
    return p.device


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    mixed_precision=None,
    reshard_after_forward: bool = True,
    layer_classes: tuple[str, ...] | None = None,
) -> nn.Module:
    """Shard `model` in place with FSDP2: each decoder layer, then the root. Returns the model.

    mesh: a 1-D DeviceMesh (default: every rank of the default group on the model's device type).
    Without a process group (single process) the model is returned unchanged: nothing to shard.
    The model must already be on this rank's device with identical initial weights on every rank
    (FSDP2 shards what each rank holds; broadcast or seed first)."""
    if not dist.is_initialized() and mesh is None:
        return model
    if isinstance(model, FSDPModule):
        raise ValueError("shard_model: model is already sharded")
    device = _device_of(model)
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"shard_model: mesh must be 1-D (data parallel), got {mesh.ndim}-D")
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    policy = mixed_precision_policy(mixed_precision, device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for layer in decoder_layers(model, layer_classes):
        fully_shard(layer, **kwargs)
    # the root keeps its parameters gathered after forward: backward needs the head right away
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank src's parameters and buffers to every rank (before sharding): identical starts."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src)
