"""Offline preference optimisation on D: DPO, IPO and SimPO from the SFT policy (algos.preference's
math, warmup-cosine LR as SFT). No sampling and no reward model: each step scores a batch of pairs
(chosen rows then rejected rows) with the trained policy and, for DPO and IPO, compares with the
reference log-probs of the SFT policy, computed once for all of D before the loop.

Data parallel under torchrun as SFT: every rank draws the same global batch of pair indices and
trains on its contiguous share; gradients are averaged over ranks before clipping (handle.step)."""

from __future__ import annotations

import copy

import torch

from rlp_engine.algos.preference import (
    METHODS,
    preference_losses,
    preference_metrics,
    sequence_logps,
    split_pairs,
)
from rlp_engine.data.batch import PairData
from rlp_engine.data.records import Preference
from rlp_engine.engine.distributed import shard
from rlp_engine.engine.layout import frozen
from rlp_engine.models.policy import response_logprobs
from rlp_engine.recipes.scaffold import TrainContext, run_loop, warmup_cosine_handle


def method_settings(method: str, cfg) -> dict:
    """The loss settings of `method` from cfg (OfflineConfig): beta, gamma_beta_ratio,
    label_smoothing (IPO does not use it, so it gets 0)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "dpo":
        return {"beta": cfg.dpo_beta, "label_smoothing": cfg.label_smoothing}
    if method == "ipo":
        return {"beta": cfg.ipo_beta}
    return {
        "beta": cfg.simpo_beta,
        "gamma_beta_ratio": cfg.simpo_gamma_beta_ratio,
        "label_smoothing": cfg.label_smoothing,
    }


def pair_logps(model, batch, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) sequence log-probs of a PairData batch under `model` (a causal LM or
    a log-prob module): summed over each response, or averaged (SimPO)."""
    lp = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_len)
    return split_pairs(sequence_logps(lp, batch.response_mask, average))


@torch.no_grad()
def reference_logps(ref, data: PairData, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [N], rejected [N]) summed log-probs of all of `data` under the frozen `ref`, in order.
    Every rank computes all of them (the same calls on every rank, as a sharded `ref` needs)."""
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        idx = range(start, min(start + batch_size, len(data)))
        c, r = pair_logps(ref, data.batch(idx).to(device))
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def preference_optimize(
    policy, tokenizer, pairs: list[Preference], method: str, cfg, data_cfg, ctx: TrainContext | None = None
):
    """A copy of `policy` trained on `pairs` with `method` ("dpo", "ipo" or "simpo") for cfg.steps
    AdamW steps of cfg.batch_size pairs (cfg: OfflineConfig); `policy` itself is not modified (it is
    the reference of DPO and IPO). Logs loss, reward_acc, margin, chosen_reward, rejected_reward,
    grad_norm, lr and nonfinite_steps. With ctx.ckpt it continues from a checkpoint saved inside this
    loop (the reference log-probs are recomputed from `policy`, deterministically)."""
    settings = method_settings(method, cfg)
    if not pairs:
        raise ValueError(f"{method}: no preference pairs to train on (D is empty)")
    ctx = ctx or TrainContext(stage=method)
    data = PairData(tokenizer, pairs, data_cfg)
    device = next(policy.parameters()).device
    average = method == "simpo"
    ref = None
    if not average:
        ref_model = frozen(copy.deepcopy(policy).eval().requires_grad_(False))
        ref = reference_logps(ref_model, data, cfg.batch_size, device)
        del ref_model
    model = copy.deepcopy(policy).train()
    handle, sched, gen = warmup_cosine_handle(model, cfg, ctx)
    train = handle.parts["policy"]

    def step_fn(step, guard):
        idx = shard(torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=gen))
        batch = data.batch(idx).to(device)  # this rank's share of the global batch
        with ctx.throughput.phase("training") as rec:
            chosen, rejected = pair_logps(train, batch, average)
            refs = (None, None) if ref is None else (ref[0][idx.to(device)], ref[1][idx.to(device)])
            losses, r_c, r_r = preference_losses(method, chosen, rejected, *refs, **settings)
            metrics = preference_metrics(losses, r_c, r_r)
            _, grad_norm = handle.step(metrics["loss"], guard=guard, step=step, scheduler=sched)
            rec["tokens"] = batch.num_tokens()
        return {
            **metrics,
            "grad_norm": grad_norm,
            "lr": sched.get_last_lr()[0],
            "nonfinite_steps": guard.count,
        }

    def load(saved):
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])

    run_loop(
        ctx,
        handle,
        cfg.steps,
        step_fn,
        save=lambda: {"sched": sched.state_dict(), "gen": gen.get_state()},
        load=load,
    )
    handle.load_full_weights("policy", model)  # the trained weights into `model` on every rank
    return model.eval()
