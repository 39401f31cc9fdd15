"""Stages 3 and 6: PPO from the SFT policy against a reward model (AlpacaFarm's recipe), the loop
over algos.ppo's math.

Old log-probs: the trainer recomputes them with the actor by teacher forcing in the scoring phase
(`make_experience`), so the PPO ratio starts at exactly 1; the rollout generator's own log-probs
(same definition: temperature-scaled, before top-k/top-p) are only compared, as `gen_logprob_gap`.
ppo.old_logprobs=generator takes the generator's instead, as TRL does (one actor forward fewer).

One iteration (`ppo_step`): rollout (sample responses) -> scoring (old and reference log-probs,
values, sequence scores, KL-shaped token rewards, GAE, whitening) -> training (clipped policy and
value losses over minibatches for a few epochs).

The actor's loss is ops.ppo_policy_loss on log-probs from the fused LM-head op (models.policy:
no [B, T, V] logits), not the one-pass ops.fused_linear_ppo_loss, which does not apply here: it takes
no truncated IS weights, and the default run weighs every token by them (ppo.tis_cap = 2); it also
needs the final hidden states outside the log-prob module, where FSDP2 gathers the head. On CPU the
one-pass op measured 1.33x the fused log-prob op + loss, both forward and backward of the LM head
alone (bench/RESULTS.md, fused_linear rows: 12,982 vs 17,290 ms at N=4096 H=512 V=32000).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from rlp_engine import ops
from rlp_engine.algos.ppo import actor_critic_loss, advantages_and_returns, critic_values, next_kl_coef
from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.distributed import rank_and_world, shard
from rlp_engine.engine.guards import NonFiniteGuard
from rlp_engine.engine.layout import TrainHandle, frozen, train_handle
from rlp_engine.engine.metrics import Throughput, masked_stats, to_float
from rlp_engine.engine.rollout import make_rollout
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.models.policy import response_logprobs
from rlp_engine.recipes.scaffold import TrainContext, minibatch_updates, run_loop

# ppo.adamw_impl -> torch.optim.AdamW's keywords ("default": torch picks, the for-loop on CPU)
ADAMW_IMPLS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@dataclass
class PPOState:
    """Everything one PPO run holds: actor and critic (trained through `handle`), the frozen
    reference and reward model, the generation model and the loop's generator and KL coefficient."""

    handle: TrainHandle  # parts "actor" (a log-prob module) and "critic", one optimizer
    ref: torch.nn.Module  # frozen SFT policy
    reward_model: ScalarHeadModel  # frozen
    tokenizer: object
    cfg: object  # PPOConfig
    data_cfg: object  # DataConfig
    generator: torch.Generator  # prompt order and minibatch shuffles
    gen_model: torch.nn.Module  # plain copy of the actor: the builtin rollout's model, the result
    rollout: object  # engine.rollout: loads the actor's full weights each iteration and samples
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(10, "ppo"))  # skipped updates
    # beta of the KL penalty in the shaped rewards: cfg.kl_coef, fixed, or (cfg.kl_target set) moved
    # after every rollout by algos.ppo.adaptive_kl_coef; saved with the loop state (exact resume)
    kl_coef: float | None = None
    # reward_fn(prompts, responses) -> [B] scores replaces the reward model as the scorer (the oracle
    # run: the task's gold reward); the reward model then only initialises the critic
    reward_fn: object = None

    def __post_init__(self):
        if self.kl_coef is None:
            self.kl_coef = float(self.cfg.kl_coef)

    @property
    def actor(self):
        return self.handle.parts["actor"]

    @property
    def critic(self):
        return self.handle.parts["critic"]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.handle.optimizer


@dataclass
class Experience:
    batch: SeqBatch
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B, R), whitened when configured
    returns: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) raw reward-model scores
    kl: torch.Tensor  # (B, R)
    is_weights: torch.Tensor | None = None  # (B, R) truncated IS weights trainer / generator, or None


def init_ppo(
    policy,
    reward_model: ScalarHeadModel,
    tokenizer,
    cfg,
    data_cfg,
    seed: int = 0,
    train_backend: str = "fsdp2",
    rollout_backend: str = "builtin",
    model_path: str | None = None,
) -> PPOState:
    """A PPOState from the SFT `policy` (copied into actor and reference) and `reward_model` (copied
    into the critic; the original stays frozen as the scorer). One AdamW over actor and critic, as
    AlpacaFarm (its vf_coef weighs the two losses), one clip over both. rollout_backend: "builtin"
    or "vllm" (engine.rollout.make_rollout; model_path: the policy's HF directory for vLLM)."""
    critic = copy.deepcopy(reward_model).train().requires_grad_(True)
    critic.encoder = None
    impl = ADAMW_IMPLS[cfg.adamw_impl]
    handle = train_handle(
        {"actor": copy.deepcopy(policy).train(), "critic": critic},
        lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, **impl),
        max_grad_norm=cfg.max_grad_norm,
        backend=train_backend,
        stage="ppo",
    )
    ref = frozen(copy.deepcopy(policy).eval().requires_grad_(False))
    # copy=True: the caller's reward model stays a full model (rank 0 evaluates with it)
    reward_model = frozen(reward_model.eval().requires_grad_(False), copy=True)
    gen = torch.Generator().manual_seed(seed)
    gen_model = copy.deepcopy(policy).eval().requires_grad_(False)
    kwargs = (
        {} if rollout_backend == "builtin" else {"seed": seed + rank_and_world()[0], "model_path": model_path}
    )
    rollout = make_rollout(rollout_backend, gen_model, tokenizer, data_cfg, **kwargs)
    return PPOState(handle, ref, reward_model, tokenizer, cfg, data_cfg, gen, gen_model, rollout)


@torch.no_grad()
def make_experience(
    state: PPOState,
    batch: SeqBatch,
    throughput: Throughput,
    gen_logprobs: torch.Tensor | None = None,
    texts: tuple[list[str], list[str]] | None = None,
) -> Experience:
    """Scoring phase: log-probs under actor and reference, values, scores, rewards, advantages, and
    (given the generator's log-probs and cfg.tis_cap > 0) the truncated IS weights. `texts`: the
    batch's (prompts, responses), which state.reward_fn scores when set. cfg.old_logprobs ==
    "generator": the old log-probs are `gen_logprobs` [B, R] (required then; no IS weights)."""
    cfg = state.cfg
    mask = batch.response_mask
    ids, attn, r_len = batch.input_ids, batch.attention_mask, batch.response_len
    from_gen = cfg.old_logprobs == "generator"
    if from_gen and (gen_logprobs is None or gen_logprobs.shape != mask.shape):
        got = None if gen_logprobs is None else tuple(gen_logprobs.shape)
        raise ValueError(
            f"make_experience: ppo.old_logprobs=generator needs gen_logprobs of shape {tuple(mask.shape)}, "
            f"got {got}"
        )
    with throughput.phase("scoring") as rec:
        if from_gen:  # 0 off the mask, fp32, as the recompute
            old_lp = gen_logprobs.float() * mask
        else:
            old_lp = response_logprobs(state.actor, ids, attn, r_len, temperature=cfg.temperature)
        ref_lp = response_logprobs(state.ref, ids, attn, r_len, temperature=cfg.temperature)
        values = critic_values(state.critic, batch) * mask
        if state.reward_fn is not None:
            scores = torch.as_tensor(state.reward_fn(*texts), dtype=torch.float32, device=mask.device)
        else:
            scores = state.reward_model.score(ids, attn)
        kl = ops.kl_penalty(old_lp, ref_lp, kind=cfg.kl_kind) * mask
        adv, ret = advantages_and_returns(
            scores,
            kl,
            values,
            mask,
            kl_coef=state.kl_coef,
            gamma=cfg.gamma,
            lam=cfg.lam,
            whiten_rewards=cfg.whiten_rewards,
            whiten_advantages=cfg.whiten_advantages,
        )
        rec["tokens"] = (3 if from_gen else 4) * batch.num_tokens()  # (actor,) ref, critic, RM passes
    isw = None
    if gen_logprobs is not None and cfg.tis_cap > 0 and not from_gen:  # from_gen: all 1
        isw = ops.truncated_is_weights(old_lp, gen_logprobs, mask, cfg.tis_cap)
    return Experience(batch, old_lp, ref_lp, values, adv, ret, scores, kl, isw)


def ppo_losses(state: PPOState, exp: Experience, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Policy + vf_coef * value (- entropy_coef * entropy) loss on the rows `idx` of `exp`."""
    cfg = state.cfg
    b = exp.batch.select(idx)
    want_entropy = cfg.entropy_coef > 0
    out = response_logprobs(
        state.actor,
        b.input_ids,
        b.attention_mask,
        b.response_len,
        temperature=cfg.temperature,
        return_entropy=want_entropy,
    )
    lp, ent = out if want_entropy else (out, None)
    return actor_critic_loss(
        lp,
        ent,
        critic_values(state.critic, b),
        exp.old_logprobs[idx],
        exp.old_values[idx],
        exp.advantages[idx],
        exp.returns[idx],
        b.response_mask,
        clip=cfg.clip,
        value_clip=cfg.value_clip,
        vf_coef=cfg.vf_coef,
        entropy_coef=cfg.entropy_coef,
        agg=cfg.agg,
        is_weights=None if exp.is_weights is None else exp.is_weights[idx],
    )


def train_on_experience(
    state: PPOState, exp: Experience, throughput: Throughput, step: int = 0
) -> dict[str, float]:
    """cfg.ppo_epochs passes over `exp` in shuffled minibatches (scaffold.minibatch_updates); metrics
    averaged over the applied minibatch updates."""
    cfg = state.cfg
    return minibatch_updates(
        state.handle,
        state.guard,
        lambda idx: ppo_losses(state, exp, idx),
        exp.batch.attention_mask,
        epochs=cfg.ppo_epochs,
        mini=cfg.mini_batch_size // rank_and_world()[1],  # this rank's share of each global minibatch
        generator=state.generator,
        throughput=throughput,
        step=step,
    )


def rollout_stats(exp: Experience) -> dict[str, float]:
    """Mean / std / min / max over all ranks of the reward-model scores (score_*), whitened
    advantages (adv_*), returns (ret_*), old values (value_*) and summed KL per sequence (kl_seq_*)."""
    mask = exp.batch.response_mask
    stats = {
        **masked_stats(exp.scores.float(), None, "score", across_ranks=True),
        **masked_stats(exp.advantages, mask, "adv", across_ranks=True),
        **masked_stats(exp.returns, mask, "ret", across_ranks=True),
        **masked_stats(exp.old_values, mask, "value", across_ranks=True),
        **masked_stats(exp.kl.sum(-1), None, "kl_seq", across_ranks=True),
    }
    return {k: to_float(v) for k, v in stats.items()}


def ppo_step(
    state: PPOState, prompts: list[str], throughput: Throughput | None = None, gold=None, step: int = 0
) -> dict[str, float]:
    """One PPO iteration on a batch of prompts: rollout -> scoring -> update of actor and critic.

    Returns floats: losses (loss, pg_loss, vf_loss), clip fractions, approx_kl, grad_norm, and the
    rollout's statistics (score: mean raw reward-model score; kl: mean summed KL to the reference;
    response_len; truncated: share without eos; gold: mean gold(prompt, response) when `gold` is
    given, for monitoring only), every step `rollout_stats`, and kl_coef: the KL coefficient this
    rollout's rewards were shaped with. Afterwards state.kl_coef moves towards cfg.kl_target (when
    set) by the all-rank kl_seq_mean, the same value on every rank.
    """
    throughput = throughput or Throughput()
    cfg = state.cfg
    # train -> generate switch: training state offloaded (a recorded no-op on CPU), the actor's full
    # weights streamed into the rollout engine in buckets, generation, then reload.
    with state.handle.offloaded("actor"):
        switch = state.rollout.load_weights(state.handle.full_weights("actor"), cfg.sync_bucket_mb)
        with throughput.phase("generation") as rec:
            samples = state.rollout.sample(prompts, cfg, n=1)
            rec["tokens"] = int(samples.batch.response_mask.sum())
    texts = (samples.prompts, samples.responses)
    exp = make_experience(state, samples.batch, throughput, samples.logprobs, texts)
    metrics = train_on_experience(state, exp, throughput, step)
    mask = exp.batch.response_mask
    metrics.update(rollout_stats(exp))
    metrics["kl_coef"] = state.kl_coef
    n_samples = len(exp.batch) * rank_and_world()[1]  # the whole rollout batch, every rank's share
    state.kl_coef = next_kl_coef(
        state.kl_coef, metrics["kl_seq_mean"], n_samples, target=cfg.kl_target, horizon=cfg.kl_horizon
    )
    metrics.update(
        score=to_float(exp.scores),
        kl=to_float(exp.kl.sum(-1)),
        response_len=to_float(mask.sum(-1)),
        truncated=to_float(samples.truncated.float()),
        # generator vs trainer log-probs of the same tokens (the trainer's are the ones PPO uses)
        gen_logprob_gap=to_float(ops.masked_mean((samples.logprobs - exp.old_logprobs).abs(), mask)),
        tis_weight=to_float(ops.masked_mean(exp.is_weights, mask)) if exp.is_weights is not None else 1.0,
        switch_seconds=switch.seconds,
        switch_bytes=switch.bytes,
        switch_buckets=switch.buckets,
    )
    if gold is not None:
        metrics["gold"] = sum(gold(p, r) for p, r in zip(samples.prompts, samples.responses)) / len(prompts)
    return metrics


def ppo(
    policy,
    reward_model: ScalarHeadModel,
    tokenizer,
    prompts: list[str],
    cfg,
    data_cfg,
    ctx: TrainContext | None = None,
    *,
    gold=None,
    reward_fn=None,
    rollout_backend: str = "builtin",
    model_path: str | None = None,
) -> torch.nn.Module:
    """Run cfg.steps PPO iterations from `policy` (the SFT model, left untouched) against
    `reward_model`, cycling through `prompts` in shuffled order. Returns the trained actor.
    `gold(prompt, response)`, when given, is logged on the rollouts (never used for training).
    `reward_fn(prompts, responses) -> scores`, when given, is the reward instead of `reward_model`
    (which still initialises the critic): PPO against the gold reward itself, the oracle row.
    Sampling draws from the global RNG: seed it first (the pipeline seeds run.seed + rank).
    ctx.ckpt: the state saved is actor, critic, optimizer, the prompt order and position, the
    shuffling generator and the KL coefficient (the frozen reference and reward model are the
    stage's inputs). rollout_backend, model_path: as in init_ppo."""
    ctx = ctx or TrainContext(stage="ppo")
    world = rank_and_world()[1]
    size = min(cfg.rollout_batch_size, len(prompts))
    if size % world or cfg.mini_batch_size % world:
        raise ValueError(
            f"ppo: rollout batch {size} and mini_batch_size {cfg.mini_batch_size} must be multiples "
            f"of the world size {world} (every rank takes an equal share)"
        )
    state = init_ppo(
        policy,
        reward_model,
        tokenizer,
        cfg,
        data_cfg,
        seed=ctx.seed,
        train_backend=ctx.train_backend,
        rollout_backend=rollout_backend,
        model_path=model_path,
    )
    state.reward_fn = reward_fn
    cursor = {"order": torch.randperm(len(prompts), generator=state.generator).tolist(), "pos": 0}

    def step_fn(step, guard):
        state.guard = guard
        if cursor["pos"] + size > len(cursor["order"]):
            cursor["order"], cursor["pos"] = (
                torch.randperm(len(prompts), generator=state.generator).tolist(),
                0,
            )
        pos = cursor["pos"]
        batch_prompts = shard([prompts[i] for i in cursor["order"][pos : pos + size]])  # this rank's share
        cursor["pos"] = pos + size
        return ppo_step(state, batch_prompts, ctx.throughput, gold, step)

    def save():
        return {**cursor, "gen": state.generator.get_state(), "kl_coef": state.kl_coef}

    def load(saved):
        cursor.update(order=saved["order"], pos=saved["pos"])
        state.generator.set_state(saved["gen"])
        state.kl_coef = saved.get("kl_coef", state.kl_coef)  # checkpoints from before the controller lack it

    run_loop(ctx, state.handle, cfg.steps, step_fn, save=save, load=load)
    state.handle.load_full_weights("actor", state.gen_model)  # the full trained actor, on every rank
    return state.gen_model.eval()
