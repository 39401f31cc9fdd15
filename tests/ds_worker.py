"""Worker for tests/test_deepspeed.py: PPO-style updates under DeepSpeed ZeRO-3 on CPU (gloo).

    python tests/ds_worker.py OUT_DIR [TIMEOUT_S]

Run on every rank with torchrun's environment (and DS_ACCELERATOR=cpu). Each rank builds the same
tiny Llama and global batch as tests/dist_worker.py, steps a plain-torch copy on the whole batch
(the reference), then wraps its own copy with ZeRO-3 through rlp_engine.engine.layout.zero3 and
steps it on its half of the batch; it then gathers the partitioned weights, streams them into a
separate generation model, and writes OUT_DIR/rank{r}.json with what it measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from dist_worker import B, R, make_batch, tiny_llama  # same directory: the FSDP2 test's model and batch

from rlp_engine.engine.distributed import finish, init_distributed
from rlp_engine.engine.layout import zero3
from rlp_engine.engine.reshard import ModuleSink
from rlp_engine.models.policy import CausalLMLogprobs, response_logprobs
from rlp_engine.ops import ppo_policy_loss

STEPS = 2
LR = 1e-3
# Below the reference's gradient norms (2.59 and 0.51 at these seeds; the test asserts they exceed it),
# so clipping scales every step and ZeRO-3 must clip by the norm over all partitions.
CLIP = 0.25


def ppo_loss(lp, old, adv, mask, n_tokens: float, dp_size: int):
    """verl's clipped PPO loss, token-mean over the global batch: each rank's loss is
    sum(L * mask) / n_tokens * dp_size, and ZeRO-3 averages gradients over the dp_size ranks."""
    loss, _ = ppo_policy_loss(
        lp, old, adv, mask, clip_low=0.2, agg="token-mean", dp_size=dp_size, batch_num_tokens=n_tokens
    )
    return loss


def reference_steps(lm, ids, attn, old, adv, mask, n_tokens) -> list[float]:
    """STEPS AdamW steps of plain torch on the whole batch; returns the pre-clip gradient norms."""
    opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.01)
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        ppo_loss(response_logprobs(lm, ids, attn, R), old, adv, mask, n_tokens, dp_size=1).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(lm.parameters(), CLIP).item())
        opt.step()
    return norms


def gathered(engine) -> dict[str, torch.Tensor]:
    """Full copies of the ZeRO-3 weights under the causal LM's own names (the wrapper adds "lm.")."""
    return {name.removeprefix("lm."): t.clone() for name, t in zero3.iter_zero3_params(engine)}


def max_diff(full: dict[str, torch.Tensor], ref: torch.nn.Module) -> tuple[float, bool]:
    ref_params = dict(ref.named_parameters())
    if full.keys() != ref_params.keys():
        raise AssertionError(f"gathered names differ: {sorted(full.keys() ^ ref_params.keys())[:4]}")
    diffs = [(full[n] - p).abs().max().item() for n, p in ref_params.items()]
    return max(diffs), all(torch.equal(full[n], p) for n, p in ref_params.items())


def run(rank: int, world_size: int) -> dict:
    ids, mask, adv = make_batch()  # [B, T] ids, [B, R] mask and advantages, identical on every rank
    attn = torch.ones_like(ids)
    init = tiny_llama(seed=0)
    ref = tiny_llama(seed=0)
    with torch.no_grad():
        old = response_logprobs(ref, ids, attn, R)
    n_tokens = mask.sum().item()
    ref_norms = reference_steps(ref, ids, attn, old, adv, mask, n_tokens)

    # rank 1 starts from other weights: ZeRO-3's partitioning must broadcast rank 0's
    lm = tiny_llama(seed=rank)
    opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=0.01)
    config = zero3.zero3_config(B // world_size, bf16=False, grad_clip=CLIP)
    engine = zero3.initialize(CausalLMLogprobs(lm), opt, config)
    partitioned = all(p.numel() == 0 for p in lm.parameters())  # module params hold no data between uses
    _, init_exact = max_diff(gathered(engine), init)

    rows = torch.arange(B).chunk(world_size)[rank]  # this rank's half of the global batch
    zero_norms = []
    for _ in range(STEPS):
        lp = engine(ids[rows], attn[rows], R)
        engine.backward(ppo_loss(lp, old[rows], adv[rows], mask[rows], n_tokens, dp_size=world_size))
        engine.step()
        zero_norms.append(float(engine.get_global_grad_norm()))
    param_diff, _ = max_diff(gathered(engine), ref)

    gen = tiny_llama(seed=99)  # the generation side: every weight differs until the sync
    sink = ModuleSink(gen)
    record = zero3.sync_zero3(engine, sink, bucket_mb=0.05, name_map=lambda n: n.removeprefix("lm."))
    sink.check_complete()
    _, sync_exact = max_diff(gathered(engine), gen)
    # the training forward (gathering on the fly) and the synced model agree bit for bit
    with torch.no_grad():
        logprob_exact = torch.equal(engine(ids, attn, R), response_logprobs(gen, ids, attn, R))
    return {
        "rank": rank,
        "world_size": world_size,
        "engine": type(engine).__name__,
        "partitioned": partitioned,
        "init_exact": init_exact,
        "changed": max_diff(dict(ref.named_parameters()), init)[0],
        "max_param_diff": param_diff,
        "ref_norms": ref_norms,
        "zero_norms": zero_norms,
        "sync_exact": sync_exact,
        "sync_buckets": record.buckets,
        "sync_bytes": record.bytes,
        "model_bytes": sum(p.numel() * p.element_size() for p in ref.parameters()),
        "logprob_exact": logprob_exact,
    }


def main() -> None:
    out = Path(sys.argv[1])
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    torch.set_num_threads(1)
    # our process group (collective timeout, failing-rank excepthook); deepspeed.initialize adopts it
    info = init_distributed(timeout_s=timeout_s)
    result = run(info.rank, info.world_size)
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    finish(0)  # os._exit under a process group: no interpreter teardown of gloo


if __name__ == "__main__":
    main()
