"""Stage 2 (and the base of RLP's stage 5): Bradley-Terry reward modelling, scoring and accuracy."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn.functional as F

from rlp_engine.data.batch import Encoded, SeqBatch, join, make_batch, pad_left, pad_right
from rlp_engine.data.records import Preference
from rlp_engine.engine.checkpoint import LoopCheckpoint, generator_states, set_generator_states
from rlp_engine.engine.distributed import rank_and_world, shard
from rlp_engine.engine.guards import NonFiniteGuard, guarded_step
from rlp_engine.engine.layout import zero3
from rlp_engine.engine.layout.fsdp import load_full_weights, prepare_for_training
from rlp_engine.engine.metrics import MetricsLogger, Throughput, progress
from rlp_engine.models.heads import ScalarHeadModel


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss mean(-log sigmoid(r(x, y_w) - r(x, y_l))) over pairs [N] -> scalar."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


class PairData:
    """Preference pairs tokenised once: `batch(idx)` gives chosen rows then rejected rows [2n, T]."""

    def __init__(self, tokenizer, pairs: list[Preference], data_cfg):
        prompts = [p.prompt for p in pairs]
        self.chosen = Encoded(tokenizer, prompts, [p.chosen for p in pairs], data_cfg)
        self.rejected = Encoded(tokenizer, prompts, [p.rejected for p in pairs], data_cfg)

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, idx) -> SeqBatch:
        idx = [int(i) for i in idx]
        enc = self.chosen
        prompts = [enc.prompts[i] for i in idx] * 2
        responses = [self.chosen.responses[i] for i in idx] + [self.rejected.responses[i] for i in idx]
        return join(*pad_left(prompts, enc.pad_id), *pad_right(responses, enc.pad_id))


def pair_rewards(rm: ScalarHeadModel, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [n], r_rejected [n]) from a PairData batch in one forward pass."""
    r = rm.score(batch.input_ids, batch.attention_mask)
    n = r.shape[0] // 2
    return r[:n], r[n:]


def train_reward_model(
    rm: ScalarHeadModel,
    tokenizer,
    pairs: list[Preference],
    cfg,
    data_cfg,
    *,
    extra_loss: Callable[[int], tuple[torch.Tensor, dict]] | None = None,
    logger: MetricsLogger | None = None,
    throughput: Throughput | None = None,
    seed: int = 0,
    log_every: int = 10,
    show_progress: bool = False,
    stage: str = "rm",
    ckpt: LoopCheckpoint | None = None,
    max_nonfinite_steps: int = 10,
    train_backend: str = "fsdp2",
) -> dict[str, float]:
    """Train `rm` in place with Bradley-Terry on `pairs` for cfg.steps steps (cfg: RewardConfig or any
    config with steps, batch_size, lr). `extra_loss(step) -> (loss, metrics)` is added to every step's
    loss (RLP-UML's lam * L_M). Returns the last logged metrics. train_backend: as in `sft` (the
    UML loss reads the encoder outside the model's forward, so with extra_loss FSDP2 trains it)."""
    logger = logger or MetricsLogger()
    throughput = throughput or Throughput()
    data = PairData(tokenizer, pairs, data_cfg)
    device = next(rm.parameters()).device
    weight_decay = getattr(cfg, "weight_decay", 0.0)
    max_grad_norm = getattr(cfg, "max_grad_norm", 1.0)
    # ZeRO-3 needs every call to go through the engine's forward; RLP-UML's loss calls rm.encoder
    # (its critic too) outside it, so that stage stays on FSDP2
    use_z3 = zero3.use_zero3(train_backend) and extra_loss is None
    if zero3.use_zero3(train_backend) and not use_z3 and rank_and_world()[0] == 0:
        print(f"[rlp-engine] {stage}: run.train_backend=deepspeed; this stage trains under FSDP2", flush=True)
    if use_z3:  # ZeRO-3 under torchrun: an engine over a copy of rank 0's `rm` (DeepSpeed broadcasts it)
        routes, engine, opt = zero3.prepare_zero3(
            {"rm": copy.deepcopy(rm)},
            lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=weight_decay),
            max_grad_norm,
        )
        train, tensors = routes["rm"], {"model": engine}
    else:
        # FSDP2 under torchrun: a sharded copy of rank 0's `rm` (fresh heads differ per rank until this
        # broadcast); single-process `rm` itself
        train = prepare_for_training(rm, copy=True)
        opt = torch.optim.AdamW(train.parameters(), lr=cfg.lr, weight_decay=weight_decay)
        tensors = {"model": train}
    gen = torch.Generator().manual_seed(seed)
    train.train()
    last: dict[str, float] = {}
    gens = [gen, *getattr(extra_loss, "generators", ())]
    guard = NonFiniteGuard(max_nonfinite_steps, stage)
    start = 0
    saved = ckpt.resume(tensors, [opt]) if ckpt else None
    if saved is not None:
        start, last, guard = saved["step"], saved["last"], NonFiniteGuard(**saved["guard"])
        set_generator_states(gens, saved["gens"])

    def state():
        return (
            tensors,
            [opt],
            {"gens": generator_states(*gens), "last": last, "guard": asdict(guard)},
        )

    for step in progress(range(start, cfg.steps), desc=stage, enabled=show_progress):
        idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=gen)
        batch = data.batch(shard(idx)).to(device)  # this rank's share of the global batch
        with throughput.phase("training") as rec:
            r_w, r_l = pair_rewards(train, batch)
            loss = bt_loss(r_w, r_l)
            metrics = {"bt_loss": loss, "acc": (r_w > r_l).float().mean()}
            if extra_loss is not None:
                extra, extra_metrics = extra_loss(step, train)
                loss = loss + extra
                metrics.update(extra_metrics)
            if use_z3:
                _, grad_norm = zero3.guarded_step(loss, engine, guard=guard, step=step)
            else:
                _, grad_norm = guarded_step(
                    loss,
                    train.parameters(),
                    opt,
                    max_grad_norm=max_grad_norm,
                    guard=guard,
                    step=step,
                )
            rec["tokens"] = batch.num_tokens()
        if step % log_every == 0 or step == cfg.steps - 1:
            metrics.update(grad_norm=grad_norm, nonfinite_steps=guard.count)
            last = logger.log(stage, step, {"loss": loss, **metrics})
        if ckpt:
            ckpt.step_done(step + 1, cfg.steps, state)
    load_full_weights(rm, train)  # the trained weights into `rm` on every rank (no-op single-process)
    return last


@torch.no_grad()
def score_texts(
    rm: ScalarHeadModel, tokenizer, prompts: list[str], responses: list[str], data_cfg, batch_size: int = 256
) -> torch.Tensor:
    """Reward of each (prompt, response) [N] fp32, on CPU."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        b = make_batch(tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], data_cfg).to(
            device
        )
        out.append(rm.score(b.input_ids, b.attention_mask).cpu())
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def preference_accuracy(rm: ScalarHeadModel, tokenizer, pairs: list[Preference], data_cfg) -> float:
    """Share of pairs where r(chosen) > r(rejected) (ties count one half); NaN for no pairs."""
    if not pairs:
        return float("nan")
    prompts = [p.prompt for p in pairs]
    r_w = score_texts(rm, tokenizer, prompts, [p.chosen for p in pairs], data_cfg)
    r_l = score_texts(rm, tokenizer, prompts, [p.rejected for p in pairs], data_cfg)
    return float(((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean())
