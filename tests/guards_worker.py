"""Worker for the 2-process guard test (torchrun's environment set by hand, gloo on CPU).

    python tests/guards_worker.py OUT_DIR [TIMEOUT_S]

Three layouts, float64, each rank on its own half of every global batch:
  dp     a replicated Linear; gradients averaged by all_reduce_grads inside guarded_step.
  fsdp   Linear-Tanh-Linear, every parameter sharded by FSDP2 (DTensor gradients, reduced in backward).
  mixed  the same model with only the first Linear sharded: DTensor and plain gradients together.
In each, step 2 gives only rank 1 a NaN loss (a constant added: its gradients stay finite, so only
the flag all-reduce can make rank 0 skip) and step 4 gives only rank 0 a non-finite gradient (dp:
an inf through a hook; fsdp/mixed: the loss times inf). Every rank must skip both steps, and the
final weights must equal a one-process run over whole batches that leaves those steps out.
Then (dp) a guard with limit 0 sees a NaN loss on rank 1 only: both ranks must raise
NonFiniteError. Last, masked_stats(across_ranks=True) on tensors of different sizes per rank (one
case with rank 1's mask empty) against float64 torch over the union of the ranks' entries.
Each rank writes OUT_DIR/rank{r}.json with what it saw.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from rlp_engine.engine.distributed import finish, init_distributed
from rlp_engine.engine.guards import NonFiniteError, NonFiniteGuard, guarded_step
from rlp_engine.engine.metrics import masked_stats

STEPS, D_IN, D_OUT, B = 6, 5, 3, 8  # B rows per global batch, B // 2 per rank
NAN_LOSS_RANK1, BAD_GRAD_RANK0 = 2, 4
MAX_GRAD_NORM = 0.5


def make_model(layout: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    if layout == "dp":
        return torch.nn.Linear(D_IN, D_OUT).double()
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 4), torch.nn.Tanh(), torch.nn.Linear(4, D_OUT)).double()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def batches():
    g = torch.Generator().manual_seed(7)  # the same global batches on every rank
    return [
        (
            torch.randn(B, D_IN, generator=g, dtype=torch.float64),
            torch.randn(B, D_OUT, generator=g, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def loss_on(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat(model) -> list[float]:
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in full]).tolist()


def first_weight(model):
    return model.weight if isinstance(model, torch.nn.Linear) else model[0].weight


def train(layout: str, rank: int, data) -> dict:
    model = make_model(layout)
    ref = copy.deepcopy(model)
    if layout == "fsdp":
        fully_shard(model[0])
        fully_shard(model)
    elif layout == "mixed":
        fully_shard(model[0])
    opt = adamw(model)
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    guard = NonFiniteGuard(limit=5, stage=layout)
    applied = []
    for step, (x, y) in enumerate(data):
        loss = loss_on(model, x[half], y[half])
        handle = None
        if step == NAN_LOSS_RANK1 and rank == 1:
            loss = loss + torch.tensor(float("nan"), dtype=loss.dtype)
        if step == BAD_GRAD_RANK0 and rank == 0:
            if layout == "dp":
                inf_row = lambda g: g.index_fill(0, torch.tensor([1]), float("inf"))  # noqa: E731
                handle = first_weight(model).register_hook(inf_row)
            else:
                loss = loss * float("inf")
        ok, norm = guarded_step(
            loss, model.parameters(), opt, max_grad_norm=MAX_GRAD_NORM, guard=guard, step=step
        )
        if handle is not None:
            handle.remove()
        applied.append(ok)
        assert not isinstance(norm, DTensor) and norm.dim() == 0

    # one process, whole batches (mean of the two halves' losses: the same gradient as the average
    # of the ranks' gradients), the skipped steps left out
    ref_opt = adamw(ref)
    clipped = 0
    for step, (x, y) in enumerate(data):
        if step in (NAN_LOSS_RANK1, BAD_GRAD_RANK0):
            continue
        ref_opt.zero_grad()
        loss = 0.5 * (loss_on(ref, x[: B // 2], y[: B // 2]) + loss_on(ref, x[B // 2 :], y[B // 2 :]))
        loss.backward()
        clipped += (
            float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), MAX_GRAD_NORM)) > MAX_GRAD_NORM
        )
        ref_opt.step()
    return {
        "applied": applied,
        "count": guard.count,
        "last_step": guard.last_step,
        "weights": flat(model),
        "ref_weights": flat(ref),
        "clipped_steps": clipped,
        "_model": model,
        "_opt": opt,
    }


def stats_across_ranks(rank: int) -> list[dict]:
    """[{"got": masked_stats over ranks, "ref": float64 torch over the union}] for two cases."""
    g = torch.Generator().manual_seed(11)  # every rank draws every rank's data, keeps its own
    cases = []
    for empty_rank1 in (False, True):
        xs = [torch.randn(3 + 2 * r, 7, generator=g) * (r + 1) + r for r in range(2)]
        keeps = [torch.rand(x.shape, generator=g) > 0.4 for x in xs]
        if empty_rank1:
            keeps[1] = torch.zeros_like(keeps[1])
        x = torch.where(keeps[rank], xs[rank], torch.tensor(float("nan")))  # holes hold NaN
        got = masked_stats(x, keeps[rank], "adv", across_ranks=True)
        union = torch.cat([xs[r].double()[keeps[r]] for r in range(2)])
        ref = {"mean": union.mean(), "std": union.std(correction=0), "min": union.min(), "max": union.max()}
        cases.append(
            {"got": {k: float(v) for k, v in got.items()}, "ref": {k: float(v) for k, v in ref.items()}}
        )
    return cases


def main() -> None:
    out = Path(sys.argv[1])
    info = init_distributed(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 30.0)
    rank = info.rank
    data = batches()
    result = {layout: train(layout, rank, data) for layout in ("dp", "fsdp", "mixed")}

    model, opt = result["dp"].pop("_model"), result["dp"].pop("_opt")
    for layout in ("fsdp", "mixed"):
        del result[layout]["_model"], result[layout]["_opt"]
    strict = NonFiniteGuard(limit=0, stage="strict")
    x, y = data[0]
    half = slice(rank * B // 2, (rank + 1) * B // 2)
    loss = loss_on(model, x[half], y[half])
    if rank == 1:
        loss = loss * float("nan")
    result["strict_raised"] = ""
    try:
        guarded_step(loss, model.parameters(), opt, max_grad_norm=MAX_GRAD_NORM, guard=strict, step=0)
    except NonFiniteError as err:
        result["strict_raised"] = str(err)
    result["stats"] = stats_across_ranks(rank)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    finish(0)  # os._exit under a process group: no interpreter teardown of gloo


if __name__ == "__main__":
    main()
