"""Stages 3 and 6: PPO from the SFT policy against a reward model (AlpacaFarm's recipe).

Old log-probs: the trainer recomputes them with the actor by teacher forcing in the scoring phase
(`make_experience`), so the PPO ratio starts at exactly 1; the rollout generator's own log-probs
(same definition: temperature-scaled, before top-k/top-p) are only compared, as `gen_logprob_gap`.

One iteration (`ppo_step`): rollout (sample responses) -> scoring (old and reference log-probs,
values, sequence scores, KL-shaped token rewards, GAE, whitening) -> training (clipped policy and
value losses over minibatches for a few epochs). All loss math goes through `rlp_engine.ops`.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from rlp_engine import ops
from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.checkpoint import LoopCheckpoint
from rlp_engine.engine.distributed import rank_and_world, shard
from rlp_engine.engine.generate import sample
from rlp_engine.engine.guards import NonFiniteGuard, guarded_step
from rlp_engine.engine.layout import zero3
from rlp_engine.engine.layout.fsdp import load_full_weights, prepare_for_training
from rlp_engine.engine.metrics import MetricsLogger, Throughput, masked_stats, progress, to_float
from rlp_engine.engine.offload import offloaded
from rlp_engine.engine.reshard import sync_to_module
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.models.policy import unwrap_lm


@dataclass
class PPOState:
    """Everything one PPO run holds: trained actor and critic, frozen reference and reward model."""

    actor: torch.nn.Module  # causal LM, trained
    critic: ScalarHeadModel  # trained, initialised from the reward model
    ref: torch.nn.Module  # frozen SFT policy
    reward_model: ScalarHeadModel  # frozen
    tokenizer: object
    optimizer: torch.optim.Optimizer
    cfg: object  # PPOConfig
    data_cfg: object  # DataConfig
    generator: torch.Generator
    gen_model: torch.nn.Module  # generation copy of the actor, refreshed by sync_weights each rollout
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(10, "ppo"))  # skipped updates
    # run.train_backend=deepspeed under torchrun: the ZeRO-3 engine training actor and critic (then
    # routes to it, zero3.Route); None: plain or FSDP2 modules and `optimizer` as is
    engine: object = None
    # beta of the KL penalty in the shaped rewards: cfg.kl_coef, fixed, or (cfg.kl_target set) moved
    # after every rollout by adaptive_kl_coef; saved with the loop state (exact resume)
    kl_coef: float | None = None
    # reward_fn(prompts, responses) -> [B] scores replaces the reward model as the scorer (the oracle
    # run: the task's gold reward); the reward model then only initialises the critic
    reward_fn: object = None

    def __post_init__(self):
        if self.kl_coef is None:
            self.kl_coef = float(self.cfg.kl_coef)


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
) -> PPOState:
    """A PPOState from the SFT `policy` (copied into actor and reference) and `reward_model` (copied
    into the critic; the original stays frozen as the scorer). One AdamW over actor and critic, as
    AlpacaFarm (its vf_coef weighs the two losses). train_backend "deepspeed" under torchrun: actor
    and critic are one ZeRO-3 engine (one optimizer, one clip); the frozen two stay on FSDP2."""
    if zero3.use_zero3(train_backend):
        return _init_ppo_zero3(policy, reward_model, tokenizer, cfg, data_cfg, seed)
    # Under torchrun all four are FSDP2-sharded (the frozen ones too: each is as large as the actor,
    # and sharded only one unit is ever gathered); single-process they are plain modules, as before.
    actor = prepare_for_training(copy.deepcopy(policy).train())
    ref = prepare_for_training(copy.deepcopy(policy).eval().requires_grad_(False))
    critic = copy.deepcopy(reward_model).train().requires_grad_(True)
    critic.encoder = None
    critic = prepare_for_training(critic)
    # copy=True: the caller's reward model stays a full model (rank 0 evaluates with it)
    reward_model = prepare_for_training(reward_model.eval().requires_grad_(False), copy=True)
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    gen_model = copy.deepcopy(policy).eval().requires_grad_(False)
    return PPOState(actor, critic, ref, reward_model, tokenizer, opt, cfg, data_cfg, gen, gen_model)


def _init_ppo_zero3(policy, reward_model, tokenizer, cfg, data_cfg, seed: int) -> PPOState:
    critic = copy.deepcopy(reward_model).train().requires_grad_(True)
    critic.encoder = None
    routes, engine, opt = zero3.prepare_zero3(
        {"actor": copy.deepcopy(policy).train(), "critic": critic},
        lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
        cfg.max_grad_norm,
    )
    ref = prepare_for_training(copy.deepcopy(policy).eval().requires_grad_(False))
    reward_model = prepare_for_training(reward_model.eval().requires_grad_(False), copy=True)
    gen = torch.Generator().manual_seed(seed)
    gen_model = copy.deepcopy(policy).eval().requires_grad_(False)
    return PPOState(
        routes["actor"],
        routes["critic"],
        ref,
        reward_model,
        tokenizer,
        opt,
        cfg,
        data_cfg,
        gen,
        gen_model,
        engine=engine,
    )


def critic_values(critic: ScalarHeadModel, batch: SeqBatch) -> torch.Tensor:
    """V(s_t) for each response token t [B, R]: the head on the hidden state just before the token."""
    v = critic.values(batch.input_ids, batch.attention_mask)  # (B, P+R)
    return v[:, batch.prompt_len - 1 : -1]


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on response tokens, plus the sequence score at the last response token.
    scores [B], kl and mask [B, R] -> [B, R] fp32."""
    rewards = -beta * kl.float() * mask
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    return rewards.scatter_add(1, last[:, None], scores.float()[:, None])


def adaptive_kl_coef(coef: float, current_kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019's proportional KL controller (TRL's and verl's AdaptiveKLController.update):
    e = clip(current_kl / target - 1, -0.2, 0.2), returns coef * (1 + e * n_steps / horizon).
    current_kl: the rollout's mean summed KL per sequence (nats); n_steps: the samples it held. A NaN
    KL leaves coef as it is (TRL's would turn NaN and stay NaN for the rest of the run)."""
    if not 0 < target < math.inf:
        raise ValueError(f"adaptive_kl_coef: target must be a finite number > 0, got {target!r}")
    if horizon < 1:
        raise ValueError(f"adaptive_kl_coef: horizon must be >= 1, got {horizon!r}")
    if math.isnan(current_kl):
        return coef
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def next_kl_coef(cfg, coef: float, current_kl: float, n_steps: int) -> float:
    """The KL coefficient for the next rollout: `coef` itself when cfg.kl_target is None (fixed, as
    AlpacaFarm), else adaptive_kl_coef towards cfg.kl_target over cfg.kl_horizon samples."""
    if cfg.kl_target is None:
        return coef
    return adaptive_kl_coef(coef, current_kl, cfg.kl_target, cfg.kl_horizon, n_steps)


def tis_weights(
    trainer_lp: torch.Tensor, gen_lp: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights min(exp(trainer_lp - gen_lp), cap) of the sampled tokens [B, R]:
    PPO's ratio is taken against the trainer's old log-probs, but the tokens came from the generator,
    whose numerics (vLLM, other kernels, bf16) may differ; the cap bounds the variance. 0 on padding."""
    return torch.exp((trainer_lp - gen_lp).float()).clamp(max=cap) * mask


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
    batch's (prompts, responses), which state.reward_fn scores when set."""
    cfg = state.cfg
    mask = batch.response_mask
    with throughput.phase("scoring") as rec:
        old_lp = zero3.response_logprobs(
            state.actor,
            batch.input_ids,
            batch.attention_mask,
            batch.response_len,
            temperature=cfg.temperature,
        )
        ref_lp = zero3.response_logprobs(
            state.ref, batch.input_ids, batch.attention_mask, batch.response_len, temperature=cfg.temperature
        )
        values = critic_values(state.critic, batch) * mask
        if state.reward_fn is not None:
            scores = torch.as_tensor(state.reward_fn(*texts), dtype=torch.float32, device=mask.device)
        else:
            scores = state.reward_model.score(batch.input_ids, batch.attention_mask)
        kl = ops.kl_penalty(old_lp, ref_lp, kind=cfg.kl_kind) * mask
        seq_scores = scores
        if cfg.whiten_rewards and scores.numel() > 1:
            # AlpacaFarm whitens the sequence scores over the rollout batch, keeping their mean.
            seq_scores = ops.masked_whiten(scores[None], torch.ones_like(scores[None]), shift_mean=False)[0]
        rewards = shaped_rewards(seq_scores, kl, mask, state.kl_coef)
        adv, ret = ops.compute_gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = ops.masked_whiten(adv, mask)
        rec["tokens"] = 4 * batch.num_tokens()  # actor, reference, critic and reward-model passes
    isw = None
    if gen_logprobs is not None and cfg.tis_cap > 0:
        isw = tis_weights(old_lp, gen_logprobs, mask, cfg.tis_cap)
    return Experience(batch, old_lp, ref_lp, values, adv * mask, ret * mask, scores, kl, isw)


def ppo_losses(state: PPOState, exp: Experience, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Policy + vf_coef * value (- entropy_coef * entropy) loss on the rows `idx` of `exp`."""
    cfg = state.cfg
    b = exp.batch.select(idx)
    mask = b.response_mask
    want_entropy = cfg.entropy_coef > 0
    out = zero3.response_logprobs(
        state.actor,
        b.input_ids,
        b.attention_mask,
        b.response_len,
        temperature=cfg.temperature,
        return_entropy=want_entropy,
    )
    lp, ent = out if want_entropy else (out, None)
    pg_loss, pg_m = ops.ppo_policy_loss(
        lp,
        exp.old_logprobs[idx],
        exp.advantages[idx],
        mask,
        clip_low=cfg.clip,
        clip_high=cfg.clip,
        agg=cfg.agg,
        is_weights=None if exp.is_weights is None else exp.is_weights[idx],
    )
    values = critic_values(state.critic, b)
    vf_loss, vf_m = ops.ppo_value_loss(
        values, exp.old_values[idx], exp.returns[idx], mask, clip=cfg.value_clip, agg=cfg.agg
    )
    loss = pg_loss + cfg.vf_coef * vf_loss
    metrics = {
        "pg_loss": pg_loss.detach(),
        "vf_loss": vf_loss.detach(),
        "pg_clipfrac": pg_m["clipfrac"],
        "approx_kl": pg_m["approx_kl"],
        "vf_clipfrac": vf_m["clipfrac"],
    }
    if want_entropy:
        entropy = ops.agg_loss(ent, mask, cfg.agg)
        loss = loss - cfg.entropy_coef * entropy
        metrics["entropy"] = entropy.detach()
    return loss, metrics


def train_on_experience(
    state: PPOState, exp: Experience, throughput: Throughput, step: int = 0
) -> dict[str, float]:
    """cfg.ppo_epochs passes over `exp` in shuffled minibatches; metrics averaged over the applied
    minibatch updates (a non-finite one is skipped by the guard and left out of the averages)."""
    cfg = state.cfg
    n = len(exp.batch)
    mini = cfg.mini_batch_size // rank_and_world()[1]  # this rank's share of each global minibatch
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    count = skipped = 0
    grad_norm_max = 0.0
    with throughput.phase("training") as rec:
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=state.generator)
            for start in range(0, n, mini):
                idx = perm[start : start + mini].to(exp.batch.input_ids.device)
                loss, metrics = ppo_losses(state, exp, idx)
                if state.engine is not None:
                    applied, grad_norm = zero3.guarded_step(loss, state.engine, guard=state.guard, step=step)
                else:
                    applied, grad_norm = guarded_step(
                        loss,
                        params,
                        state.optimizer,
                        max_grad_norm=cfg.max_grad_norm,
                        guard=state.guard,
                        step=step,
                    )
                rec["tokens"] += int(exp.batch.attention_mask[idx].sum())
                if not applied:
                    skipped += 1
                    continue
                grad_norm_max = max(grad_norm_max, float(grad_norm))
                metrics = {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + to_float(v)
                count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    out.update(
        grad_norm_max=grad_norm_max, skipped_updates=float(skipped), nonfinite_steps=float(state.guard.count)
    )
    return out


def ppo_step(
    state: PPOState, prompts: list[str], throughput: Throughput | None = None, gold=None, step: int = 0
) -> dict[str, float]:
    """One PPO iteration on a batch of prompts: rollout -> scoring -> update of actor and critic.

    Returns floats: losses (loss, pg_loss, vf_loss), clip fractions, approx_kl, grad_norm, and the
    rollout's statistics (score: mean raw reward-model score; kl: mean summed KL to the reference;
    response_len; truncated: share without eos; gold: mean gold(prompt, response) when `gold` is
    given, for monitoring only), and every step the mean / std / min / max over all ranks of the
    reward-model scores (score_*), whitened advantages (adv_*), returns (ret_*), old values
    (value_*) and summed KL per sequence (kl_seq_*); kl_coef: the KL coefficient this rollout's
    rewards were shaped with. Afterwards state.kl_coef moves towards cfg.kl_target (when set) by
    the all-rank kl_seq_mean, the same value on every rank.
    """
    throughput = throughput or Throughput()
    # train -> generate switch: training state offloaded (a recorded no-op on CPU), the actor's
    # weights streamed into the generation model in buckets, generation, then reload.
    use_z3 = state.engine is not None  # ZeRO-3: gathered module by module, no FSDP2 offload
    with nullcontext() if use_z3 else offloaded(state.actor, state.optimizer):
        sync = zero3.sync_route_to_module if use_z3 else sync_to_module
        switch = sync(state.actor, state.gen_model, bucket_mb=state.cfg.sync_bucket_mb)
        with throughput.phase("generation") as rec:
            samples = sample(state.gen_model, state.tokenizer, prompts, state.cfg, state.data_cfg, n=1)
            rec["tokens"] = int(samples.batch.response_mask.sum())
    texts = (samples.prompts, samples.responses)
    exp = make_experience(state, samples.batch, throughput, samples.logprobs, texts)
    metrics = train_on_experience(state, exp, throughput, step)
    mask = exp.batch.response_mask
    stats = {
        **masked_stats(exp.scores.float(), None, "score", across_ranks=True),
        **masked_stats(exp.advantages, mask, "adv", across_ranks=True),
        **masked_stats(exp.returns, mask, "ret", across_ranks=True),
        **masked_stats(exp.old_values, mask, "value", across_ranks=True),
        **masked_stats(exp.kl.sum(-1), None, "kl_seq", across_ranks=True),
    }
    metrics.update({k: to_float(v) for k, v in stats.items()})
    metrics["kl_coef"] = state.kl_coef
    n_samples = len(exp.batch) * rank_and_world()[1]  # the whole rollout batch, every rank's share
    state.kl_coef = next_kl_coef(state.cfg, state.kl_coef, metrics["kl_seq_mean"], n_samples)
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
    *,
    logger: MetricsLogger | None = None,
    throughput: Throughput | None = None,
    seed: int = 0,
    log_every: int = 10,
    show_progress: bool = False,
    stage: str = "ppo",
    gold=None,
    ckpt: LoopCheckpoint | None = None,
    max_nonfinite_steps: int = 10,
    train_backend: str = "fsdp2",
    reward_fn=None,
) -> torch.nn.Module:
    """Run cfg.steps PPO iterations from `policy` (the SFT model, left untouched) against
    `reward_model`, cycling through `prompts` in shuffled order. Returns the trained actor.
    `gold(prompt, response)`, when given, is logged on the rollouts (never used for training).
    `reward_fn(prompts, responses) -> scores`, when given, is the reward instead of `reward_model`
    (which still initialises the critic): PPO against the gold reward itself, the oracle row.
    `ckpt`: as in `sft`; the state is actor, critic, optimizer, the prompt order and position, the
    shuffling generator and the KL coefficient (the frozen reference and reward model are the
    stage's inputs)."""
    logger = logger or MetricsLogger()
    throughput = throughput or Throughput()
    rank, world = rank_and_world()
    size = min(cfg.rollout_batch_size, len(prompts))
    if size % world or cfg.mini_batch_size % world:
        raise ValueError(
            f"ppo: rollout batch {size} and mini_batch_size {cfg.mini_batch_size} must be multiples "
            f"of the world size {world} (every rank takes an equal share)"
        )
    torch.manual_seed(seed + rank)  # the same weights everywhere (copied), different sampling noise
    state = init_ppo(policy, reward_model, tokenizer, cfg, data_cfg, seed=seed, train_backend=train_backend)
    state.guard = NonFiniteGuard(max_nonfinite_steps, stage)
    state.reward_fn = reward_fn
    order = torch.randperm(len(prompts), generator=state.generator).tolist()
    pos = start = 0
    modules = {"actor": unwrap_lm(state.actor), "critic": state.critic}  # HF names on any world size
    if state.engine is not None:
        modules = {"actor_critic": state.engine}  # DeepSpeed's own checkpoint of the ZeRO-3 engine
    saved = ckpt.resume(modules, [state.optimizer]) if ckpt else None
    if saved is not None:
        start, order, pos = saved["step"], saved["order"], saved["pos"]
        state.generator.set_state(saved["gen"])
        state.guard = NonFiniteGuard(**saved["guard"])
        state.kl_coef = saved.get("kl_coef", state.kl_coef)  # checkpoints from before the controller lack it

    def loop_state():
        loop = {
            "order": order,
            "pos": pos,
            "gen": state.generator.get_state(),
            "guard": asdict(state.guard),
            "kl_coef": state.kl_coef,
        }
        return modules, [state.optimizer], loop

    for step in progress(range(start, cfg.steps), desc=stage, enabled=show_progress):
        if pos + size > len(order):
            order = torch.randperm(len(prompts), generator=state.generator).tolist()
            pos = 0
        batch_prompts = shard([prompts[i] for i in order[pos : pos + size]])  # this rank's share
        pos += size
        metrics = ppo_step(state, batch_prompts, throughput, gold, step)
        if step % log_every == 0 or step == cfg.steps - 1:
            logger.log(stage, step, metrics)
        if ckpt:
            ckpt.step_done(step + 1, cfg.steps, loop_state)
    load_full_weights(state.gen_model, state.actor)  # the full trained actor, on every rank
    return state.gen_model.eval()
