"""Stage 1: supervised fine-tuning on demonstrations (algos.sft's loss, warmup-cosine LR).

Data parallel under torchrun: every rank draws the same global batch of indices and trains on its
contiguous share; gradients are averaged over ranks before clipping (the TrainHandle's step)."""

from __future__ import annotations

import torch

from rlp_engine.algos.sft import sft_loss
from rlp_engine.data.batch import Encoded
from rlp_engine.data.records import Example
from rlp_engine.engine.distributed import shard
from rlp_engine.recipes.scaffold import TrainContext, run_loop, warmup_cosine_handle


def sft(model, tokenizer, examples: list[Example], cfg, data_cfg, ctx: TrainContext | None = None) -> dict:
    """Train `model` in place on `examples` for cfg.steps AdamW steps (cfg: SFTConfig). Returns the
    last logged metrics (loss, grad_norm, lr, nonfinite_steps). With ctx.ckpt it continues from a
    checkpoint saved inside this loop and saves model, optimizer, scheduler and batch generator every
    ckpt.every steps. A step with a non-finite loss or gradient is skipped; more than
    ctx.max_nonfinite_steps of them raise."""
    ctx = ctx or TrainContext(stage="sft")
    enc = Encoded(tokenizer, [e.prompt for e in examples], [e.response for e in examples], data_cfg)
    device = next(model.parameters()).device
    # under torchrun a sharded copy of rank 0's `model` (FSDP2) or a ZeRO-3 engine over one;
    # single-process `model` itself
    handle, sched, gen = warmup_cosine_handle(model, cfg, ctx)
    policy = handle.parts["policy"]

    def step_fn(step, guard):
        idx = torch.randint(len(enc), (cfg.batch_size,), generator=gen)
        batch = enc.batch(shard(idx)).to(device)
        with ctx.throughput.phase("training") as rec:
            loss = sft_loss(policy, batch)
            _, grad_norm = handle.step(loss, guard=guard, step=step, scheduler=sched)
            rec["tokens"] = batch.num_tokens()
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": sched.get_last_lr()[0],
            "nonfinite_steps": guard.count,
        }

    def load(saved):
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])

    last = run_loop(
        ctx,
        handle,
        cfg.steps,
        step_fn,
        save=lambda: {"sched": sched.state_dict(), "gen": gen.get_state()},
        load=load,
    )
    handle.load_full_weights("policy", model)  # the trained weights into `model` on every rank
    return last
