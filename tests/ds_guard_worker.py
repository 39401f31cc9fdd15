"""Worker for tests/test_pipeline_deepspeed.py: zero3.guarded_step on a ZeRO-3 engine,
2 ranks on CPU with gloo (torchrun's environment set by hand, DS_ACCELERATOR=cpu).

    python tests/ds_guard_worker.py OUT_DIR [TIMEOUT_S]

A small float32 MLP trained through prepare_zero3 (AdamW, clipped at MAX_GRAD_NORM), each rank on its
half of every global batch. Step 2 gives only rank 1 a NaN loss (a constant added: its gradients stay
finite, so only the all-reduced loss flag can make rank 0 skip; the step is skipped before backward);
step 4 gives only rank 0 an inf gradient with a finite loss (a hook on the output), which only
ZeRO-3's global norm over the partitions can see. Every rank must skip both, and the final weights
must equal plain torch over whole batches without those steps (clip_grad_norm_, the same AdamW). Then
a guard with limit 0 and a NaN loss on rank 1: both ranks must raise NonFiniteError.
Each rank writes OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from rlp_engine.engine.distributed import finish, init_distributed
from rlp_engine.engine.guards import NonFiniteError, NonFiniteGuard
from rlp_engine.engine.layout import zero3

STEPS, D_IN, D_OUT, B = 6, 5, 3, 8  # B rows per global batch, B // 2 per rank
NAN_LOSS_RANK1, BAD_GRAD_RANK0 = 2, 4
MAX_GRAD_NORM = 0.5
LR = 1e-2


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 4), torch.nn.Tanh(), torch.nn.Linear(4, D_OUT))


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01)


def batches():
    g = torch.Generator().manual_seed(7)  # the same global batches on every rank
    return [(torch.randn(B, D_IN, generator=g), torch.randn(B, D_OUT, generator=g)) for _ in range(STEPS)]


def reference(data) -> tuple[list[float], list[float]]:
    """Plain torch on whole batches, the two bad steps left out: (weights, pre-clip norms)."""
    model = make_model()
    opt = adamw(model.parameters())
    norms = []
    for step, (x, y) in enumerate(data):
        if step in (NAN_LOSS_RANK1, BAD_GRAD_RANK0):
            continue
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist(), norms


def gathered(route) -> list[float]:
    return torch.cat([t.reshape(-1).clone() for _, t in zero3.iter_zero3_params(route.module)]).tolist()


def train(rank: int, data) -> dict:
    routes, engine, _ = zero3.prepare_zero3({"net": make_model()}, adamw, MAX_GRAD_NORM)
    net = routes["net"]
    guard = NonFiniteGuard(5, "zero3")
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    applied, norms = [], []
    for step, (x, y) in enumerate(data):
        out = net(x[rows])
        if step == BAD_GRAD_RANK0 and rank == 0:
            out.register_hook(lambda g: g + float("inf"))  # finite loss, inf gradients
        loss = ((out - y[rows]) ** 2).mean()
        if step == NAN_LOSS_RANK1 and rank == 1:
            loss = loss + float("nan")  # gradients stay finite
        ok, norm = zero3.guarded_step(loss, engine, guard=guard, step=step)
        applied.append(ok)
        if ok:
            norms.append(float(norm))
    return {
        "applied": applied,
        "count": guard.count,
        "last_step": guard.last_step,
        "weights": gathered(net),
        "norms": norms,
    }


def strict(rank: int, data) -> str:
    routes, engine, _ = zero3.prepare_zero3({"net": make_model()}, adamw, MAX_GRAD_NORM)
    x, y = data[0]
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    loss = ((routes["net"](x[rows]) - y[rows]) ** 2).mean()
    if rank == 1:
        loss = loss + float("nan")
    try:
        zero3.guarded_step(loss, engine, guard=NonFiniteGuard(0, "strict"), step=0)
    except NonFiniteError as err:
        return str(err)
    return ""


def main() -> None:
    out = Path(sys.argv[1])
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    torch.set_num_threads(1)
    info = init_distributed(timeout_s=timeout_s)
    data = batches()
    ref_weights, ref_norms = reference(data)
    result = train(info.rank, copy.deepcopy(data))
    result.update(ref_weights=ref_weights, ref_norms=ref_norms, strict_raised=strict(info.rank, data))
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    finish(0)  # os._exit under a process group: no interpreter teardown of gloo


if __name__ == "__main__":
    main()
