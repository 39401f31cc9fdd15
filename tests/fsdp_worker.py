"""Worker for tests/test_fsdp_train.py: the training stages' updates under FSDP2 on 2 ranks (gloo, CPU)
against the same updates in one process on the whole batch.

    python tests/fsdp_worker.py OUT_DIR [TIMEOUT_S]     (with torchrun's environment set)

Every rank builds the same models and global batch from fixed seeds, runs the one-process reference
on the whole batch itself (no communication), then the sharded run on its contiguous half, and
writes OUT_DIR/rank{r}.json with the differences it measured (rank 0 also compares the state dict
gathered on it). Three parts: SFT (tied embeddings), PPO (actor + critic in one AdamW, with the
frozen reference and reward model sharded too) and reward modelling with the UML encoder attached.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import tiny
import torch

from rlp_engine import ops
from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.distributed import all_reduce_grads, check_replicas, finish, init_distributed, shard
from rlp_engine.engine.layout.fsdp import (
    broadcast_module,
    full_state_dict,
    is_sharded,
    load_full_weights,
    prepare_for_training,
)
from rlp_engine.engine.reshard import full_tensor, sync_to_module
from rlp_engine.models.heads import GaussianEncoder, ScalarHeadModel
from rlp_engine.models.policy import response_logprobs, unwrap_lm

B, P, R, V = 4, 5, 6, 96  # global batch rows, prompt length, response length, vocab
LR, STEPS = 1e-3, 2


def tiny_llama(seed: int, tied: bool):
    return tiny.tiny_llama(
        seed,
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )


def make_batch(seed: int, full_mask: bool) -> SeqBatch:
    """A left-padded global batch [B, P+R], the same on every rank. full_mask: every response token
    counts (equal token counts per rank, which a plain per-rank mean needs to match the global one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.int64)
    attn[1, :2] = 0  # left padding on two rows
    attn[3, :1] = 0
    resp = torch.ones(B, R)
    if not full_mask:
        resp = (torch.rand(B, R, generator=g) > 0.25).float()
        resp[:, 0] = 1
        attn[:, P:] = resp.long()
    return SeqBatch(ids, attn, resp)


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def step(loss_fn, params, opt) -> float:
    """One update as the algos do it: backward, the explicit all-reduce (skips DTensors), clip, step."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    all_reduce_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def param_diff(trained: torch.nn.Module, ref: torch.nn.Module) -> float:
    """Max |full(trained) - ref| over parameters, by name (gathers: every rank calls it)."""
    ref_params = dict(unwrap_lm(ref).named_parameters())
    diff = 0.0
    for name, p in unwrap_lm(trained).named_parameters():
        diff = max(diff, (full_tensor(p) - ref_params[name]).abs().max().item())
    return diff


def state_dict_diff(state: dict, ref: torch.nn.Module) -> float | None:
    """rank 0: max |gathered state dict - ref's| (keys must match); other ranks: None."""
    if not state:
        return None
    want = unwrap_lm(ref).state_dict()
    assert sorted(state) == sorted(want), (sorted(set(state) ^ set(want)))[:8]
    return max((state[k] - want[k]).abs().max().item() for k in want)


def sync_exact(sharded: torch.nn.Module, seed: int, tied: bool) -> bool:
    """The sharded model streamed into a differently initialised full generation copy (reshard.py):
    bit-identical to the gathered weights, for every name the copy has."""
    gen = tiny_llama(seed, tied)
    sync_to_module(sharded, gen, bucket_mb=0.01)
    # every name, tied ones included (lm_head.weight and model.embed_tokens.weight: one tensor)
    full = {n: full_tensor(p) for n, p in unwrap_lm(sharded).named_parameters(remove_duplicate=False)}
    gen_params = dict(gen.named_parameters(remove_duplicate=False))
    return full.keys() == gen_params.keys() and all(torch.equal(full[n], p) for n, p in gen_params.items())


def part_sft(rank: int, world: int) -> dict:
    from rlp_engine.algos.sft import sft_loss

    policy = tiny_llama(seed=rank, tied=True)  # differs per rank: prepare_for_training broadcasts rank 0's
    batch = make_batch(7, full_mask=True)
    model = prepare_for_training(copy.deepcopy(policy))
    assert is_sharded(model) == (world > 1)
    ref = tiny_llama(seed=0, tied=True)  # rank 0's initial weights, trained on the whole batch
    ref_opt = adamw(ref.parameters())
    ref_norms = [step(lambda: sft_loss(ref, batch), list(ref.parameters()), ref_opt) for _ in range(STEPS)]
    local = batch.select(torch.tensor(shard(list(range(B)))))
    params = list(model.parameters())
    opt = adamw(params)
    norms = [step(lambda: sft_loss(model, local), params, opt) for _ in range(STEPS)]
    state = full_state_dict(model)
    load_full_weights(policy, model)  # the trained weights back into the plain model, every rank
    tied_after = policy.lm_head.weight is policy.model.embed_tokens.weight
    check_replicas(model, "sharded")  # shards are not replicas: nothing to compare, no error
    check_replicas(policy, "gathered")  # the full weights are the same bits on every rank
    try:
        broadcast_module(model)
        refused = False
    except ValueError:
        refused = True
    ids, attn = batch.input_ids, batch.attention_mask
    with torch.no_grad():  # the sharded forward on the whole batch vs the one-process model
        got, want = response_logprobs(model, ids, attn, R), response_logprobs(ref, ids, attn, R)
    lp_diff = (got - want).abs().max().item()
    return {
        "sft_param_diff": param_diff(model, ref),
        "sft_state_dict_diff": state_dict_diff(state, ref),
        "sft_plain_diff": param_diff(policy, ref),
        "sft_grad_norm_diff": max(abs(a - b) for a, b in zip(norms, ref_norms)),
        "sft_changed": param_diff(ref, tiny_llama(seed=0, tied=True)),
        "sft_tied_after": tied_after,
        "sft_broadcast_refused": refused,
        "sft_logprob_diff": lp_diff,
        "sft_sync_exact": sync_exact(model, seed=99, tied=True),
    }


def ppo_loss(actor, critic, b: SeqBatch, old_lp, old_v, adv, ret, n_tokens, dp_size):
    """verl-style token-mean PPO loss over the global batch: each rank's sum / n_tokens * dp_size,
    and FSDP2 averages the dp_size gradients, so the update is the one-rank update."""
    mask = b.response_mask
    lp = response_logprobs(actor, b.input_ids, b.attention_mask, R)
    kw = {"agg": "token-mean", "dp_size": dp_size, "batch_num_tokens": n_tokens}
    pg, _ = ops.ppo_policy_loss(lp, old_lp, adv, mask, clip_low=0.2, clip_high=0.2, **kw)
    values = critic.values(b.input_ids, b.attention_mask)[:, P - 1 : -1]
    vf, _ = ops.ppo_value_loss(values, old_v, ret, mask, clip=0.2, **kw)
    return pg + 0.5 * vf


def part_ppo(rank: int, world: int) -> dict:
    policy = tiny_llama(seed=10 + rank, tied=False)
    rm = ScalarHeadModel.from_causal_lm(policy)
    batch = make_batch(8, full_mask=False)  # interior response tokens masked: unequal token counts
    ids, attn = batch.input_ids, batch.attention_mask
    g = torch.Generator().manual_seed(9)
    adv, ret = torch.randn(B, R, generator=g), torch.randn(B, R, generator=g)
    n_tokens = batch.response_mask.sum().item()

    actor = prepare_for_training(copy.deepcopy(policy).train())
    critic = prepare_for_training(copy.deepcopy(rm).train())
    ref = prepare_for_training(copy.deepcopy(policy).eval().requires_grad_(False))
    reward = prepare_for_training(copy.deepcopy(rm).eval().requires_grad_(False))
    # the unsharded references: rank 0's initial weights (broadcast by prepare_for_training)
    policy0 = tiny_llama(seed=10, tied=False)
    rm0 = ScalarHeadModel.from_causal_lm(policy0)
    rm0.load_state_dict(full_state_dict_everywhere(critic))
    ref_actor, ref_critic = copy.deepcopy(policy0), copy.deepcopy(rm0)

    # scoring phase (no grad) with the sharded models, as make_experience does, vs the plain ones
    with torch.no_grad():
        old_lp = response_logprobs(actor, ids, attn, R)
        old_v = critic.values(ids, attn)[:, P - 1 : -1]
        ref_lp = response_logprobs(ref, ids, attn, R)
        score = reward.score(ids, attn)
        want_lp = response_logprobs(policy0, ids, attn, R)
        score_diff = (score - rm0.score(ids, attn)).abs().max().item()
        want_v = rm0.values(ids, attn)[:, P - 1 : -1]
    scoring_diff = max(
        (old_lp - want_lp).abs().max().item(),
        (ref_lp - want_lp).abs().max().item(),
        (old_v - want_v).abs().max().item(),
    )
    exp = (old_lp, old_v, adv, ret)

    ref_params = list(ref_actor.parameters()) + list(ref_critic.parameters())
    ref_opt = adamw(ref_params)
    ref_norms = [
        step(lambda: ppo_loss(ref_actor, ref_critic, batch, *exp, n_tokens, 1), ref_params, ref_opt)
        for _ in range(STEPS)
    ]
    rows = torch.tensor(shard(list(range(B))))
    local = batch.select(rows)
    local_exp = [t[rows] for t in exp]
    params = list(actor.parameters()) + list(critic.parameters())
    opt = adamw(params)
    norms = [
        step(lambda: ppo_loss(actor, critic, local, *local_exp, n_tokens, world), params, opt)
        for _ in range(STEPS)
    ]
    state = full_state_dict(actor)
    critic_state = full_state_dict(critic)
    return {
        "ppo_scoring_diff": scoring_diff,
        "ppo_score_diff": score_diff,
        "ppo_actor_diff": param_diff(actor, ref_actor),
        "ppo_critic_diff": param_diff(critic, ref_critic),
        "ppo_state_dict_diff": state_dict_diff(state, ref_actor),
        "ppo_critic_state_dict_diff": state_dict_diff(critic_state, ref_critic),
        "ppo_grad_norm_diff": max(abs(a - b) for a, b in zip(norms, ref_norms)),
        "ppo_changed": param_diff(ref_actor, policy0),
        "ppo_frozen_sharded": is_sharded(ref) and is_sharded(reward),
        "ppo_sync_exact": sync_exact(actor, seed=98, tied=False),
    }


def full_state_dict_everywhere(module) -> dict:
    """Full state dict on every rank (test helper: full_tensor of each entry)."""
    return {k: full_tensor(v).clone() for k, v in module.state_dict().items()}


def uml_loss(rm, b: SeqBatch) -> torch.Tensor:
    """Bradley-Terry on (chosen, rejected) halves of the local rows + an encoder term through
    rm.encoder(...) and rm.encoder.critic, called outside rm's forward as rlp.py does."""
    r = rm.score(b.input_ids, b.attention_mask)
    n = r.shape[0] // 2
    bt = -torch.nn.functional.logsigmoid(r[:n] - r[n:]).mean()
    mu, logvar = rm.encoder(rm.final_hidden(b.input_ids, b.attention_mask))
    return bt + 0.1 * (rm.encoder.critic(mu, mu + logvar.exp()) ** 2).mean()


def part_rm(rank: int, world: int) -> dict:
    torch.manual_seed(20 + rank)
    rm = ScalarHeadModel.from_causal_lm(tiny_llama(seed=20 + rank, tied=False))
    rm.encoder = GaussianEncoder(32, 8)
    batch = make_batch(11, full_mask=True)
    rows = [0, 2, 1, 3]  # this rank's rows [chosen_i, rejected_i]: per-rank means weigh the same
    local = batch.select(torch.tensor(shard(rows)))
    ref = copy.deepcopy(rm)
    model = prepare_for_training(rm)  # in place: rm's own parameters become shards
    ref.load_state_dict(full_state_dict_everywhere(model))  # rank 0's initial weights
    rm0 = copy.deepcopy(ref)
    # one-rank reference: the mean over the per-rank losses (each rank's own pairs)
    shares = [torch.tensor(rows[i * B // world : (i + 1) * B // world]) for i in range(world)]
    ref_opt = adamw(list(ref.parameters()))
    for _ in range(STEPS):
        step(
            lambda: sum(uml_loss(ref, batch.select(s)) for s in shares) / world,
            list(ref.parameters()),
            ref_opt,
        )
    opt = adamw(list(model.parameters()))
    for _ in range(STEPS):
        step(lambda: uml_loss(model, local), list(model.parameters()), opt)
    return {
        "rm_param_diff": param_diff(model, ref),
        "rm_changed": param_diff(ref, rm0),
        "rm_state_dict_diff": state_dict_diff(full_state_dict(model), ref),
    }


def main() -> None:
    out = Path(sys.argv[1])
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=timeout_s)
    result = {"rank": info.rank, "world_size": info.world_size}
    for part in (part_sft, part_ppo, part_rm):
        result.update(part(info.rank, info.world_size))
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    finish(0)  # os._exit under a process group: no interpreter teardown of gloo


if __name__ == "__main__":
    main()
