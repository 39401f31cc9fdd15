"""Stage 1: supervised fine-tuning on demonstrations (mean token log-likelihood of the responses).

Data parallel under torchrun: every rank draws the same global batch of indices and trains on its
contiguous share; gradients are averaged over ranks before clipping (engine.distributed)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict

import torch

from rlp_engine import ops
from rlp_engine.data.batch import Encoded, SeqBatch
from rlp_engine.data.records import Example
from rlp_engine.engine.checkpoint import LoopCheckpoint
from rlp_engine.engine.distributed import shard
from rlp_engine.engine.guards import NonFiniteGuard, guarded_step
from rlp_engine.engine.layout import zero3
from rlp_engine.engine.layout.fsdp import load_full_weights, prepare_for_training
from rlp_engine.engine.metrics import MetricsLogger, Throughput, progress
from rlp_engine.models.policy import unwrap_lm


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 10% at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def sft_loss(model, batch: SeqBatch) -> torch.Tensor:
    """Negative mean log-likelihood of the response tokens (eos included). Scalar fp32."""
    lp = zero3.response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_len)
    return -ops.masked_mean(lp, batch.response_mask)


def sft(
    model,
    tokenizer,
    examples: list[Example],
    cfg,
    data_cfg,
    *,
    logger: MetricsLogger | None = None,
    throughput: Throughput | None = None,
    seed: int = 0,
    log_every: int = 10,
    show_progress: bool = False,
    stage: str = "sft",
    ckpt: LoopCheckpoint | None = None,
    max_nonfinite_steps: int = 10,
    train_backend: str = "fsdp2",
) -> dict[str, float]:
    """Train `model` in place on `examples` for cfg.steps AdamW steps (cfg: SFTConfig). Returns the
    last logged metrics. With `ckpt` it continues from a checkpoint saved inside this loop and saves
    its state every ckpt.every steps (model, optimizer, scheduler, batch generator, RNG). A step with a
    non-finite loss or gradient is skipped; more than `max_nonfinite_steps` of them raise.
    train_backend: run.train_backend; "deepspeed" under torchrun trains a ZeRO-3 engine instead of FSDP2."""
    logger = logger or MetricsLogger()
    throughput = throughput or Throughput()
    enc = Encoded(tokenizer, [e.prompt for e in examples], [e.response for e in examples], data_cfg)
    device = next(model.parameters()).device
    use_z3 = zero3.use_zero3(train_backend)
    if use_z3:  # ZeRO-3 under torchrun: an engine over a copy of rank 0's `model`
        routes, engine, opt = zero3.prepare_zero3(
            {"policy": copy.deepcopy(model)},
            lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
            cfg.max_grad_norm,
        )
        train, tensors = routes["policy"], {"model": engine}
    else:
        # FSDP2 under torchrun: a sharded copy of rank 0's `model`; single-process `model` itself
        train = prepare_for_training(model, copy=True)
        opt = torch.optim.AdamW(train.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        tensors = {"model": unwrap_lm(train)}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.steps, cfg.warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    train.train()
    last: dict[str, float] = {}
    guard = NonFiniteGuard(max_nonfinite_steps, stage)
    start = 0
    saved = ckpt.resume(tensors, [opt]) if ckpt else None
    if saved is not None:
        start, last, guard = saved["step"], saved["last"], NonFiniteGuard(**saved["guard"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])

    def state():
        loop = {"sched": sched.state_dict(), "gen": gen.get_state(), "last": last, "guard": asdict(guard)}
        return tensors, [opt], loop

    for step in progress(range(start, cfg.steps), desc=stage, enabled=show_progress):
        idx = torch.randint(len(enc), (cfg.batch_size,), generator=gen)
        batch = enc.batch(shard(idx)).to(device)
        with throughput.phase("training") as rec:
            loss = sft_loss(train, batch)
            if use_z3:
                _, grad_norm = zero3.guarded_step(loss, engine, guard=guard, step=step, scheduler=sched)
            else:
                _, grad_norm = guarded_step(
                    loss,
                    train.parameters(),
                    opt,
                    max_grad_norm=cfg.max_grad_norm,
                    guard=guard,
                    step=step,
                    scheduler=sched,  # advances with applied updates only
                )
            rec["tokens"] = batch.num_tokens()
        if step % log_every == 0 or step == cfg.steps - 1:
            metrics = {"loss": loss, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0]}
            last = logger.log(stage, step, {**metrics, "nonfinite_steps": guard.count})
        if ckpt:
            ckpt.step_done(step + 1, cfg.steps, state)
    load_full_weights(model, train)  # the trained weights into `model` on every rank (no-op single-process)
    return last
