"""Arena: GRPO and RLOO, critic-free online RL from the SFT policy against a reward model, the loop
over algos.grpo's math (recipes/ppo.py's shape without the critic).

One iteration (`grpo_step`): rollout (n samples of each of the step's prompts, through the same
engine.rollout object as PPO, weights from handle.full_weights) -> scoring (old log-probs recomputed
by the actor, so the ratio starts at 1; reference log-probs; one reward-model score per response;
group advantages) -> cfg.epochs passes of clipped surrogate + kl_coef * KL-to-reference over
shuffled minibatches of sequences. Under torchrun every rank takes whole prompts (a group never
spans ranks: its baseline is local).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from rlp_engine import ops
from rlp_engine.algos.grpo import grpo_loss, outcome_advantages
from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.distributed import rank_and_world, shard
from rlp_engine.engine.guards import NonFiniteGuard
from rlp_engine.engine.layout import TrainHandle, frozen, train_handle
from rlp_engine.engine.metrics import Throughput, masked_stats, to_float
from rlp_engine.engine.rollout import make_rollout
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.models.policy import response_logprobs
from rlp_engine.recipes.scaffold import TrainContext, minibatch_updates, run_loop


@dataclass
class GRPOState:
    """One GRPO / RLOO run: the actor (trained through `handle`), the frozen reference and reward
    model, the rollout and its generation model, the generator for prompt order and minibatches."""

    handle: TrainHandle  # part "actor" (a log-prob module), one optimizer
    ref: torch.nn.Module  # frozen SFT policy
    reward_model: ScalarHeadModel  # frozen scorer
    cfg: object  # GRPOConfig
    estimator: str  # "grpo" or "rloo" (algos.grpo.ESTIMATORS)
    generator: torch.Generator  # prompt order and minibatch shuffles
    gen_model: torch.nn.Module  # plain copy of the actor: the builtin rollout's model, the result
    rollout: object  # engine.rollout
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(10, "grpo"))

    @property
    def actor(self):
        return self.handle.parts["actor"]


@dataclass
class GroupExperience:
    batch: SeqBatch  # prompt-major: prompt i's n responses at rows i*n .. i*n+n-1
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R), the group advantage of each row on its response tokens
    scores: torch.Tensor  # (B,) reward-model scores


def init_grpo(
    policy,
    reward_model: ScalarHeadModel,
    tokenizer,
    cfg,
    data_cfg,
    *,
    estimator: str = "grpo",
    seed: int = 0,
    train_backend: str = "fsdp2",
    rollout_backend: str = "builtin",
    model_path: str | None = None,
) -> GRPOState:
    """A GRPOState from the SFT `policy` (copied into actor, reference and generation model; the
    original is untouched) and `reward_model` (frozen, a copy under torchrun)."""
    handle = train_handle(
        {"actor": copy.deepcopy(policy).train()},
        lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
        max_grad_norm=cfg.max_grad_norm,
        backend=train_backend,
        stage=estimator,
    )
    ref = frozen(copy.deepcopy(policy).eval().requires_grad_(False))
    reward_model = frozen(reward_model.eval().requires_grad_(False), copy=True)
    gen = torch.Generator().manual_seed(seed)
    gen_model = copy.deepcopy(policy).eval().requires_grad_(False)
    kwargs = (
        {} if rollout_backend == "builtin" else {"seed": seed + rank_and_world()[0], "model_path": model_path}
    )
    rollout = make_rollout(rollout_backend, gen_model, tokenizer, data_cfg, **kwargs)
    return GRPOState(handle, ref, reward_model, cfg, estimator, gen, gen_model, rollout)


@torch.no_grad()
def make_group_experience(state: GRPOState, batch: SeqBatch, throughput: Throughput) -> GroupExperience:
    """Scoring phase: actor and reference log-probs, scores, group advantages of `batch` (rows in
    whole prompt-major groups of cfg.n)."""
    cfg = state.cfg
    ids, attn, r_len, mask = batch.input_ids, batch.attention_mask, batch.response_len, batch.response_mask
    with throughput.phase("scoring") as rec:
        old_lp = response_logprobs(state.actor, ids, attn, r_len, temperature=cfg.temperature)
        ref_lp = response_logprobs(state.ref, ids, attn, r_len, temperature=cfg.temperature)
        scores = state.reward_model.score(ids, attn).float()
        adv = outcome_advantages(
            scores, mask, cfg.n, estimator=state.estimator, norm_by_std=cfg.norm_by_std
        ).float()
        rec["tokens"] = 3 * batch.num_tokens()  # actor, reference and reward-model passes
    return GroupExperience(batch, old_lp, ref_lp, adv, scores)


def grpo_losses(state: GRPOState, exp: GroupExperience, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """algos.grpo.grpo_loss on the rows `idx` of `exp` (log-probs of the actor as it is now)."""
    cfg = state.cfg
    b = exp.batch.select(idx)
    lp = response_logprobs(
        state.actor, b.input_ids, b.attention_mask, b.response_len, temperature=cfg.temperature
    )
    return grpo_loss(
        lp,
        exp.old_logprobs[idx],
        exp.ref_logprobs[idx],
        exp.advantages[idx],
        b.response_mask,
        clip=cfg.clip,
        kl_coef=cfg.kl_coef,
        kl_kind=cfg.kl_kind,
        agg=cfg.agg,
    )


def train_on_groups(
    state: GRPOState, exp: GroupExperience, throughput: Throughput, step: int = 0
) -> dict[str, float]:
    """cfg.epochs passes over `exp` in shuffled minibatches of sequences (scaffold.minibatch_updates);
    metrics averaged over the applied updates."""
    cfg = state.cfg
    return minibatch_updates(
        state.handle,
        state.guard,
        lambda idx: grpo_losses(state, exp, idx),
        exp.batch.attention_mask,
        epochs=cfg.epochs,
        mini=max(cfg.mini_batch_size // rank_and_world()[1], 1),  # this rank's share of a minibatch
        generator=state.generator,
        throughput=throughput,
        step=step,
    )


def grpo_step(
    state: GRPOState, prompts: list[str], throughput: Throughput | None = None, gold=None, step: int = 0
) -> dict[str, float]:
    """One iteration on `prompts` (this rank's share): cfg.n samples each, scoring, updates.

    Returns floats: loss, pg_loss, kl_loss, pg_clipfrac, approx_kl, grad_norm; score (mean
    reward-model score of the rollout) and score_std / min / max; kl: mean summed k1 KL to the
    reference per response (log pi - log ref on the samples, comparable to PPO's kl); adv_std;
    response_len; truncated; gold: mean gold(prompt, response) when `gold` is given (monitoring)."""
    throughput = throughput or Throughput()
    cfg = state.cfg
    with state.handle.offloaded("actor"):
        state.rollout.load_weights(state.handle.full_weights("actor"), cfg.sync_bucket_mb)
        with throughput.phase("generation") as rec:
            samples = state.rollout.sample(prompts, cfg, n=cfg.n)
            rec["tokens"] = int(samples.batch.response_mask.sum())
    exp = make_group_experience(state, samples.batch, throughput)
    metrics = train_on_groups(state, exp, throughput, step)
    mask = exp.batch.response_mask
    kl_seq = (ops.kl_penalty(exp.old_logprobs, exp.ref_logprobs, kind="k1") * mask).sum(-1)
    stats = masked_stats(exp.scores, None, "score", across_ranks=True)
    stats.update(masked_stats(exp.advantages, mask, "adv", across_ranks=True))
    metrics.update({k: to_float(v) for k, v in stats.items() if k != "adv_mean"})
    metrics.update(
        score=to_float(exp.scores),
        kl=to_float(kl_seq),
        response_len=to_float(mask.sum(-1)),
        truncated=to_float(samples.truncated.float()),
    )
    if gold is not None:
        metrics["gold"] = sum(gold(p, r) for p, r in zip(samples.prompts, samples.responses)) / len(
            samples.prompts
        )
    return metrics


def grpo(
    policy,
    reward_model: ScalarHeadModel,
    tokenizer,
    prompts: list[str],
    cfg,
    data_cfg,
    ctx: TrainContext | None = None,
    *,
    estimator: str = "grpo",
    gold=None,
    rollout_backend: str = "builtin",
    model_path: str | None = None,
) -> torch.nn.Module:
    """cfg.steps iterations (cfg: GRPOConfig) of GRPO or RLOO (`estimator`) from `policy` (the SFT
    model, left untouched) against `reward_model`, cycling through `prompts` in shuffled order,
    cfg.prompts_per_step a step. Returns the trained actor. `gold(prompt, response)` is logged, never
    trained on. Sampling draws from the global RNG: seed it first. ctx.ckpt saves the actor, the
    optimizer, the prompt order and position and the generator."""
    ctx = ctx or TrainContext(stage=estimator)
    world = rank_and_world()[1]
    size = min(cfg.prompts_per_step, len(prompts))
    if size % world or cfg.mini_batch_size % world:
        raise ValueError(
            f"{estimator}: prompts per step {size} and mini_batch_size {cfg.mini_batch_size} must be "
            f"multiples of the world size {world} (every rank takes an equal share)"
        )
    state = init_grpo(
        policy,
        reward_model,
        tokenizer,
        cfg,
        data_cfg,
        estimator=estimator,
        seed=ctx.seed,
        train_backend=ctx.train_backend,
        rollout_backend=rollout_backend,
        model_path=model_path,
    )
    cursor = {"order": torch.randperm(len(prompts), generator=state.generator).tolist(), "pos": 0}

    def step_fn(step, guard):
        state.guard = guard
        if cursor["pos"] + size > len(cursor["order"]):
            cursor["order"] = torch.randperm(len(prompts), generator=state.generator).tolist()
            cursor["pos"] = 0
        pos = cursor["pos"]
        batch_prompts = shard([prompts[i] for i in cursor["order"][pos : pos + size]])
        cursor["pos"] = pos + size
        return grpo_step(state, batch_prompts, ctx.throughput, gold, step)

    def save():
        return {**cursor, "gen": state.generator.get_state()}

    def load(saved):
        cursor.update(order=saved["order"], pos=saved["pos"])
        state.generator.set_state(saved["gen"])

    run_loop(ctx, state.handle, cfg.steps, step_fn, save=save, load=load)
    state.handle.load_full_weights("actor", state.gen_model)
    return state.gen_model.eval()
