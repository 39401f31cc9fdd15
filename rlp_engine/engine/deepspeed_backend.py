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
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import torch
from torch import nn

from rlp_engine.engine import reshard


def import_deepspeed():
    """The deepspeed module, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(
            "the ZeRO-3 backend needs DeepSpeed (pip install 'rlp-engine[deepspeed]'; on CPU its first "
            "process group compiles the deepspeed_shm_comm op once, about 100 s of CPU); "
            "FSDP2 (rlp_engine.engine.fsdp) needs nothing extra"
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
