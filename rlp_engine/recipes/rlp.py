"""Stages 4 and 5 of RLP: sample P from the policy, then refine the reward model on it (the math is
rlp_engine/algos/rlp.py).

RLP-UML: Bradley-Terry on D + lam * L_M on P, where L_M is the multi-view information-bottleneck
loss between two different sampled responses to the same prompt (Gaussian encoder heads on the
reward model's final hidden state).
RLP-SPG: synthetic pairs from P (algos.rlp.synthetic_preferences, y_w ranked by the current reward
model); Bradley-Terry on D plus these pairs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable

import torch

from rlp_engine import ops
from rlp_engine.algos.reward import score_texts
from rlp_engine.algos.rlp import (
    MultiViewData,
    PolicySamples,
    beta_at,
    encode_views,
    encoder_spread,
    synthetic_preferences,
    uml_diagnostics,
)
from rlp_engine.data.records import Preference
from rlp_engine.engine.distributed import gather_lists, shard
from rlp_engine.engine.generate import sample
from rlp_engine.models.heads import GaussianEncoder, ScalarHeadModel
from rlp_engine.recipes.reward import AuxLoss, train_reward_model
from rlp_engine.recipes.scaffold import Optim, TrainContext


def sample_policy(
    policy, tokenizer, prompts: list[str], cfg, data_cfg, throughput=None, show_progress: bool = False
) -> PolicySamples:
    """cfg.n responses per prompt from `policy` (cfg: SampleConfig: n, temperature, top_k, top_p).
    Under torchrun each rank samples its contiguous share of the prompts and every rank gets all.
    show_progress: a "sample P" bar over the prompt chunks (same samples either way)."""
    local = shard(prompts)
    bar = {"show_progress": show_progress, "desc": "sample P"}
    if throughput is None:
        s = sample(policy, tokenizer, local, cfg, data_cfg, n=cfg.n, **bar)
    else:
        with throughput.phase("generation") as rec:
            s = sample(policy, tokenizer, local, cfg, data_cfg, n=cfg.n, **bar)
            rec["tokens"] = int(s.batch.response_mask.sum())
    n = cfg.n
    responses = gather_lists([s.responses[i * n : (i + 1) * n] for i in range(len(local))])
    return PolicySamples(prompts, responses)


def _fresh_reward_model(init: ScalarHeadModel | torch.nn.Module) -> ScalarHeadModel:
    """A copy of a reward model, or the SFT causal LM plus a fresh head."""
    if isinstance(init, ScalarHeadModel):
        rm = copy.deepcopy(init)
        rm.requires_grad_(True)
        return rm
    return ScalarHeadModel.from_causal_lm(init)


def rlp_spg(
    init,
    current_rm: ScalarHeadModel,
    tokenizer,
    pairs: list[Preference],
    samples: PolicySamples,
    cfg,
    data_cfg,
    equivalence: str | Callable[[str, int], Hashable] | None = None,
    ctx: TrainContext | None = None,
) -> tuple[ScalarHeadModel, list[Preference], dict[str, float]]:
    """RLP-SPG: synthetic pairs from P (y_w ranked by `current_rm`), then Bradley-Terry on D + them,
    starting from `init` (the SFT causal LM for a retrain, or a reward model to fine-tune).
    cfg: SPGConfig; `equivalence` (a name or a key function) overrides cfg.equivalence.
    Returns (refined reward model, synthetic pairs, statistics)."""
    ctx = ctx or TrainContext(stage="rm_spg")
    flat_p = [p for p, rs in zip(samples.prompts, samples.responses) for _ in rs]
    flat_r = [r for rs in samples.responses for r in rs]
    scores = score_texts(current_rm, tokenizer, flat_p, flat_r, data_cfg).tolist()
    n = len(samples.responses[0]) if samples.responses else 0
    rewards = [scores[i * n : (i + 1) * n] for i in range(len(samples.prompts))]
    synthetic, stats = synthetic_preferences(
        samples, rewards, cfg.gamma, equivalence or cfg.equivalence, ctx.seed
    )
    rm = _fresh_reward_model(init)
    opt = Optim(cfg.steps, cfg.batch_size, cfg.lr, max_grad_norm=cfg.max_grad_norm)
    train_reward_model(rm, tokenizer, pairs + synthetic, opt, data_cfg, ctx)
    return rm.eval(), synthetic, stats


def ib_aux_loss(
    rm: ScalarHeadModel,
    views: MultiViewData,
    batch_size: int,
    beta: float,
    lam: float,
    seed: int,
    *,
    beta_warmup_steps: int = 0,
    negatives: str = "all",
    idx: torch.Tensor | None = None,
):
    """The AuxLoss of `train_reward_model` for RLP-UML: lam * multiview_ib_loss on a batch of views drawn
    without replacement (a repeated prompt would be a false negative) from `idx` (default: every
    pair), beta warmed up linearly over beta_warmup_steps. Metrics: ib_loss, mi, skl, the encoder
    spread mu_std and mu_norm (encoder_spread over both views' means) and the step's ib_beta."""
    pool = torch.arange(len(views)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
    if len(pool) < 2:
        raise ValueError(f"ib_aux_loss: needs at least 2 view pairs to train on, got {len(pool)}")
    device = next(rm.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device).manual_seed(seed + 1)  # on the latents' device (torch.randn needs it)

    def extra_loss(step: int, rm: ScalarHeadModel):  # rm: the module being trained (sharded or not)
        pick = torch.randperm(len(pool), generator=gen)[: min(batch_size, len(pool))]
        mu1, logvar1, mu2, logvar2 = encode_views(rm, views, shard(pool[pick]), device)
        b = beta_at(step, beta, beta_warmup_steps)
        loss, m = ops.multiview_ib_loss(
            mu1,
            logvar1,
            mu2,
            logvar2,
            rm.encoder.critic,
            beta=b,
            generator=noise,
            negatives=negatives,
            critic_matrix=rm.encoder.critic_matrix,
        )
        metrics = {"ib_loss": loss.detach(), "mi": m["mi"], "skl": m["skl"], "ib_beta": b}
        return lam * loss, {**metrics, **encoder_spread(torch.cat([mu1, mu2]))}

    return AuxLoss(extra_loss, (gen, noise))  # the generators: state the loop checkpoints


def rlp_uml(
    init,
    tokenizer,
    pairs: list[Preference],
    samples: PolicySamples,
    cfg,
    data_cfg,
    ctx: TrainContext | None = None,
) -> tuple[ScalarHeadModel, dict]:
    """RLP-UML: Bradley-Terry on D + cfg.lam * L_M on P, from `init` (SFT causal LM or a reward model),
    with fresh Gaussian encoder heads (cfg: UMLConfig). L_M trains on the view pairs of all but a
    seeded cfg.heldout_frac of P's prompts. Returns (the reward model in eval mode, algos.rlp's
    uml_diagnostics on the held-out pairs after training; {} when none are held out)."""
    rm = _fresh_reward_model(init)
    hidden = rm.head.in_features
    rm.encoder = GaussianEncoder(hidden, cfg.latent_dim).to(next(rm.parameters()).device)
    ctx = ctx or TrainContext(stage="rm_uml")
    seed = ctx.seed
    views = MultiViewData(tokenizer, samples, data_cfg, seed=seed)
    train_idx, held_idx = views.split(cfg.heldout_frac, seed=seed)
    aux = ib_aux_loss(
        rm,
        views,
        cfg.ib_batch_size,
        cfg.beta,
        cfg.lam,
        seed,
        beta_warmup_steps=cfg.beta_warmup_steps,
        negatives=cfg.negatives,
        idx=train_idx,
    )
    opt = Optim(cfg.steps, cfg.batch_size, cfg.lr, max_grad_norm=cfg.max_grad_norm)
    train_reward_model(rm, tokenizer, pairs, opt, data_cfg, ctx, aux)
    rm.eval()
    diagnostics = (
        uml_diagnostics(rm, views, held_idx, negatives=cfg.negatives, seed=seed) if len(held_idx) else {}
    )
    return rm, diagnostics
