"""Stage 2 (and the base of RLP's stage 5): Bradley-Terry reward modelling (algos.reward's loss)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlp_engine.algos.reward import bt_loss, pair_rewards
from rlp_engine.data.batch import PairData
from rlp_engine.data.records import Preference
from rlp_engine.engine.checkpoint import generator_states, set_generator_states
from rlp_engine.engine.distributed import shard
from rlp_engine.engine.layout import train_handle
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.recipes.scaffold import Optim, TrainContext, run_loop


@dataclass
class AuxLoss:
    """A loss added to every reward-modelling step (RLP-UML's lam * L_M).
    loss(step, rm) -> (loss, metrics), `rm` the module being trained (sharded or not); generators:
    the random state it draws from, saved and restored with the loop's checkpoints."""

    loss: Callable[[int, ScalarHeadModel], tuple[torch.Tensor, dict]]
    generators: tuple[torch.Generator, ...] = ()


def train_reward_model(
    rm: ScalarHeadModel,
    tokenizer,
    pairs: list[Preference],
    opt: Optim,
    data_cfg,
    ctx: TrainContext | None = None,
    aux: AuxLoss | None = None,
) -> dict[str, float]:
    """Train `rm` in place with Bradley-Terry on `pairs` for opt.steps AdamW steps (batches of
    opt.batch_size pairs, at most all of them), plus `aux` when given. Returns the last logged
    metrics (loss, bt_loss, acc, the aux metrics, grad_norm, nonfinite_steps)."""
    ctx = ctx or TrainContext(stage="rm")
    data = PairData(tokenizer, pairs, data_cfg)
    device = next(rm.parameters()).device
    # under torchrun a sharded copy of rank 0's `rm` (fresh heads differ per rank until it is
    # broadcast) or a ZeRO-3 engine over one; single-process `rm` itself
    handle = train_handle(
        {"rm": rm},
        lambda params: torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay),
        max_grad_norm=opt.max_grad_norm,
        backend=ctx.train_backend,
        copy=True,
        calls_outside_forward=aux is not None,  # RLP-UML's loss calls rm.encoder (and its critic)
        stage=ctx.stage,
    )
    train = handle.parts["rm"]
    gen = torch.Generator().manual_seed(ctx.seed)
    handle.train()
    gens = [gen, *(aux.generators if aux else ())]

    def step_fn(step, guard):
        idx = torch.randint(len(data), (min(opt.batch_size, len(data)),), generator=gen)
        batch = data.batch(shard(idx)).to(device)  # this rank's share of the global batch
        with ctx.throughput.phase("training") as rec:
            r_w, r_l = pair_rewards(train, batch)
            loss = bt_loss(r_w, r_l)
            metrics = {"bt_loss": loss, "acc": (r_w > r_l).float().mean()}
            if aux is not None:
                extra, extra_metrics = aux.loss(step, train)
                loss = loss + extra
                metrics.update(extra_metrics)
            _, grad_norm = handle.step(loss, guard=guard, step=step)
            rec["tokens"] = batch.num_tokens()
        return {"loss": loss, **metrics, "grad_norm": grad_norm, "nonfinite_steps": guard.count}

    last = run_loop(
        ctx,
        handle,
        opt.steps,
        step_fn,
        save=lambda: {"gens": generator_states(*gens)},
        load=lambda saved: set_generator_states(gens, saved["gens"]),
    )
    handle.load_full_weights("rm", rm)  # the trained weights into `rm` on every rank
    return last
