"""Worker script for the multi-process tests (run under torchrun, or with its env set by hand).

    python tests/dist_worker.py SCENARIO OUT_DIR [TIMEOUT_S]

Scenarios:
  raise  rank 1 raises right after joining; the others wait in an all_reduce.
  train  two PPO-style actor updates with FSDP2 (each rank half of the global batch) against the
         same updates on an unsharded copy over the whole batch, a bucketed weight sync into a
         separate generation model, an offload/reload round trip of the sharded training state and
         one more update. Each rank writes OUT_DIR/rank{r}.json with what it measured.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import tiny
import torch
import torch.distributed as dist

from rlp_engine.engine.distributed import finish, init_distributed
from rlp_engine.engine.layout.fsdp import broadcast_module, shard_model
from rlp_engine.engine.offload import offload, reload
from rlp_engine.engine.reshard import full_tensor, sync_to_module

B, T, R, V = 4, 12, 6, 128  # global batch rows, sequence length, response length, vocab


def tiny_llama(seed: int):
    return tiny.tiny_llama(
        seed, vocab_size=V, hidden_size=64, intermediate_size=128, max_position_embeddings=64
    )


def make_batch():
    g = torch.Generator().manual_seed(1234)  # the same global batch on every rank
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = (torch.rand(B, R, generator=g) > 0.2).float()  # interior response tokens masked out too
    mask[:, 0] = 1
    adv = torch.randn(B, R, generator=g)
    return ids, mask, adv


def response_logprobs(model, ids):
    logits = model(input_ids=ids).logits[:, -R - 1 : -1].float()  # (b, R, V): predicts ids[:, -R:]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -R:, None])[..., 0]


def ppo_steps(model, opt, ids, old, adv, mask, n_tokens, dp_size, steps):
    """AdamW steps on verl's clipped PPO loss, token-mean over the global batch: with dp_size and
    batch_num_tokens each rank's loss is sum(L * mask) / n_tokens * dp_size, and FSDP2 averages the
    gradients over the dp_size ranks, so the update equals the one-rank update."""
    from rlp_engine.ops import ppo_policy_loss  # imported here: the "raise" scenario stays light

    for _ in range(steps):
        opt.zero_grad()
        lp = response_logprobs(model, ids)
        loss, _ = ppo_policy_loss(
            lp, old, adv, mask, agg="token-mean", dp_size=dp_size, batch_num_tokens=n_tokens, clip_low=0.2
        )
        loss.backward()
        opt.step()


def max_diff_to(model, ref) -> tuple[float, bool]:
    max_diff, exact = 0.0, True
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        full = full_tensor(p)
        max_diff = max(max_diff, (full - ref_params[name]).abs().max().item())
        exact = exact and torch.equal(full, ref_params[name])
    return max_diff, exact


def scenario_train(info, out: Path) -> dict:
    model = tiny_llama(seed=info.rank)  # different on each rank until rank 0's weights are broadcast
    broadcast_module(model)
    ref = copy.deepcopy(model)
    ids, mask, adv = make_batch()
    with torch.no_grad():
        old = response_logprobs(model, ids)
    n_tokens = mask.sum().item()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)
    ppo_steps(ref, ref_opt, ids, old, adv, mask, n_tokens, dp_size=1, steps=2)

    rows = torch.arange(B).chunk(info.world_size)[info.rank]  # this rank's half of the batch
    shard_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    local = (ids[rows], old[rows], adv[rows], mask[rows])
    ppo_steps(model, opt, *local, n_tokens, dp_size=info.world_size, steps=2)
    max_diff, exact = max_diff_to(model, ref)

    gen = tiny_llama(seed=99)  # different weights: every value must be overwritten
    record = sync_to_module(model, gen, bucket_mb=0.05)
    gen_params = dict(gen.named_parameters())
    sync_equal = all(torch.equal(full_tensor(p), gen_params[n]) for n, p in model.named_parameters())

    # phase offload of the sharded state (DTensor params, grads, Adam moments), copied for real
    # (force: this is CPU), then two more steps on both sides (the second forward reads weights the first step
    # updated after the move): nothing may have been lost or left stale.
    state = offload(model, opt, params=True, force=True)
    reload(model, opt, state)
    ppo_steps(ref, ref_opt, ids, old, adv, mask, n_tokens, dp_size=1, steps=2)
    ppo_steps(model, opt, *local, n_tokens, dp_size=info.world_size, steps=2)
    after_offload_diff, _ = max_diff_to(model, ref)
    with torch.no_grad():  # FSDP's forward must read the moved, updated shards (not stale storage)
        logit_diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "sharded": type(model).__name__,
        "max_param_diff": max_diff,
        "params_exact": exact,
        "changed": max(
            (a - b).abs().max().item() for a, b in zip(ref.parameters(), tiny_llama(0).parameters())
        ),
        "sync_equal": sync_equal,
        "sync_buckets": record.buckets,
        "sync_bytes": record.bytes,
        "model_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
        "offload_bytes": state.records[0].bytes,
        "after_offload_diff": after_offload_diff,
        "after_offload_logit_diff": logit_diff,
    }


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=timeout_s)
    if scenario == "raise":
        if info.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        t = torch.ones(1)
        dist.all_reduce(t)  # never completes: rank 1 is gone
        raise AssertionError("all_reduce returned although rank 1 died")
    if scenario == "train":
        result = scenario_train(info, out)
        (out / f"rank{info.rank}.json").write_text(json.dumps(result))
        finish(0)  # os._exit under a process group: no interpreter teardown of gloo
        return
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
