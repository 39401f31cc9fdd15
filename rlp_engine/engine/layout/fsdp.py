"""Training layout: FSDP2 (`torch.distributed.fsdp.fully_shard`) over a 1-D data-parallel mesh.

Each decoder layer is its own FSDP unit (parameters gathered one layer at a time) and the root
holds the rest (embeddings, final norm, head). Works on CPU with gloo, so the multi-process tests
run anywhere; on GPU the default mixed precision computes in bf16 and reduces gradients in fp32.

FSDP2 gathers a unit's parameters only around its module's `forward` (or a method registered with
`register_fsdp_forward_method`), so every weight the training stages read must be read inside one:
`prepare_for_training` wraps a causal LM in `CausalLMLogprobs` (forward = fused response log-probs)
and shards a `ScalarHeadModel` whose score/values/final_hidden all go through its forward. Gradients
of sharded parameters are reduce-scattered (averaged over ranks) by FSDP2 in backward: the explicit
`all_reduce_grads` skips them. `load_full_weights` / `full_state_dict` bring the trained weights
back to full tensors (a plain model on every rank, or a CPU state dict on rank 0 for saving).
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from rlp_engine.engine.guards import NonFiniteGuard, guarded_step
from rlp_engine.engine.offload import offloaded
from rlp_engine.engine.reshard import iter_full_params, sync_to_module
from rlp_engine.models.heads import GaussianEncoder, ScalarHeadModel
from rlp_engine.models.policy import CausalLMLogprobs, unwrap_lm

_PRECISIONS = {
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp16": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
    "fp32": None,
}


def decoder_layers(model: nn.Module, layer_classes: tuple[str, ...] | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class name is in layer_classes,
    by default the model's `_no_split_modules` (HF sets it, e.g. LlamaDecoderLayer)."""
    names = layer_classes or _no_split_names(model)
    if not names:
        raise ValueError("shard_model: model has no _no_split_modules; pass layer_classes=('MyBlock',)")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"shard_model: no submodule of class {names} found in {type(model).__name__}")
    return layers


def _no_split_names(model: nn.Module) -> tuple[str, ...]:
    """`_no_split_modules` of the first module under `model` that sets it (the HF model inside a
    wrapper such as CausalLMLogprobs or ScalarHeadModel's backbone)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return tuple(names)
    return ()


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
    root_reshard_after_forward: bool = False,
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
    # root_reshard_after_forward=False keeps the root's parameters gathered from forward to backward
    # (which needs the head right away); prepare_for_training passes True (see there for why)
    fully_shard(model, **{**kwargs, "reshard_after_forward": root_reshard_after_forward})
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank src's parameters and buffers to every rank (before sharding): identical starts."""
    if not dist.is_initialized():
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError(
            "broadcast_module: the model is already sharded (each rank holds a different shard); "
            "broadcast before sharding (prepare_for_training does)"
        )
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=src)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def prepare_for_training(
    module: nn.Module, mixed_precision=None, mesh: DeviceMesh | None = None, copy: bool = False
) -> nn.Module:
    """The module the training loop calls: sharded with FSDP2 when a process group of more than one
    rank exists, `module` unchanged single-process.

    module: a causal LM -> returns `CausalLMLogprobs(module)` (sharded; call it through
    `response_logprobs`); a ScalarHeadModel (reward model, critic) -> `module` itself, sharded (its
    encoder, when attached, is its own unit with `critic` registered as a forward method).
    Rank 0's weights are broadcast first (identical starts, e.g. fresh heads). The parameters of
    `module` are replaced in place by this rank's shards, unless copy=True: then a deep copy is
    sharded and `module` stays a full model (single-process nothing is copied: `module` itself is
    trained); `load_full_weights(module, returned)` brings the trained weights back into it.

    The root unit (embeddings, final norm, head) reshards after every forward too, unlike
    shard_model's default: otherwise after a no-grad forward (PPO's scoring phase) the module would
    keep the gathered plain tensors registered until the next backward, and anything that reads
    `module.parameters()` then (an optimizer built after it, a weight sync, a state dict) would see
    those instead of the shards. The cost is one more all-gather of the root per backward; frozen
    modules (reference, reward model) gain the memory: only one unit is ever gathered at a time."""
    if _world() == 1 and mesh is None:
        return module
    if isinstance(module, (FSDPModule, CausalLMLogprobs)):
        raise ValueError(f"prepare_for_training: {type(module).__name__} is already prepared")
    if copy:
        module = copy_module.deepcopy(module)
    broadcast_module(module)
    mesh = mesh or init_device_mesh(_device_of(module).type, (_world(),))
    if isinstance(module, ScalarHeadModel):
        target = module
    elif hasattr(module, "get_output_embeddings") and module.get_output_embeddings() is not None:
        target = CausalLMLogprobs(module)
    else:
        raise TypeError(
            f"prepare_for_training: expected a causal LM or a ScalarHeadModel, got {type(module).__name__}"
        )
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, GaussianEncoder):
        # its own unit: rlp's UML loss calls rm.encoder(h) and rm.encoder.critic outside rm's forward.
        # No mixed precision: the encoder computes in fp32 by design (its forward casts h to fp32).
        fully_shard(encoder, mesh=mesh)
        register_fsdp_forward_method(encoder, "critic")
    shard_model(target, mesh=mesh, mixed_precision=mixed_precision, root_reshard_after_forward=True)
    return target


def load_full_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy the full value of every parameter of `src` (sharded or not, wrapped or not) into the
    same-named parameter of the plain model `dst` (a collective when src is sharded: call it on every
    rank). No-op when they are the same module (single process)."""
    dst = unwrap_lm(dst)
    if unwrap_lm(src) is dst:
        return
    sync_to_module(src, dst)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full CPU state dict of `module` (sharded or not; a CausalLMLogprobs gives its LM's names)
    on rank 0, {} on the other ranks. A collective when sharded: call it on every rank.
    Uses torch.distributed.checkpoint's get_model_state_dict(full_state_dict, cpu_offload), which
    gathers one tensor at a time, so only rank 0 ever holds the whole model (in host memory)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap_lm(module)
    if not any(isinstance(p, DTensor) for p in inner.parameters()):
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    if inner is module:
        return state
    prefix = "lm."  # CausalLMLogprobs holds the LM as `self.lm`
    return {k.removeprefix(prefix): v for k, v in state.items()}


class FSDPHandle:
    """TrainHandle (engine/layout/__init__.py) of plain modules single-process, FSDP2-sharded ones
    under torchrun: one torch optimizer, guards.guarded_step with explicit clipping."""

    def __init__(self, parts: dict[str, nn.Module], optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.parts, self.optimizer, self.max_grad_norm = parts, optimizer, max_grad_norm

    def train(self, mode: bool = True) -> None:
        for m in self.parts.values():
            m.train(mode)

    def step(
        self, loss: torch.Tensor, *, guard: NonFiniteGuard, step: int, scheduler=None
    ) -> tuple[bool, torch.Tensor]:
        # the optimizer's own parameter list: the shards under FSDP2 (never the unsharded copies a
        # root module holds between forward and backward), in the order the optimizer was built
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return guarded_step(
            loss,
            params,
            self.optimizer,
            max_grad_norm=self.max_grad_norm,
            guard=guard,
            step=step,
            scheduler=scheduler,  # advances with applied updates only
        )

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {name: unwrap_lm(m) for name, m in self.parts.items()}  # HF names on any world size

    def offloaded(self, name: str) -> AbstractContextManager:
        return offloaded(self.parts[name], self.optimizer)

    def full_weights(self, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_full_params(self.parts[name])  # a collective per tensor when sharded

    def load_full_weights(self, name: str, dst: nn.Module) -> None:
        load_full_weights(dst, self.parts[name])


def fsdp_handle(
    parts: dict[str, nn.Module], make_optimizer: Callable, max_grad_norm: float, copy: bool = False
) -> FSDPHandle:
    """Each part prepared by `prepare_for_training` (sharded under torchrun, a causal LM wrapped in
    CausalLMLogprobs; the module itself single-process), one optimizer over all their parameters."""
    prepared = {name: prepare_for_training(m, copy=copy) for name, m in parts.items()}
    optimizer = make_optimizer([p for m in prepared.values() for p in m.parameters()])
    return FSDPHandle(prepared, optimizer, max_grad_norm)
