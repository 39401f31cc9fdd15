"""Numerical guards: guarded_step (skip non-finite steps, count, stop past the limit, clip) against
plain reference loops, masked_stats against float64 torch, and a 2-process gloo run where one
rank's NaN must make every rank skip (tests/guards_worker.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks

from rlp_engine.engine.guards import NonFiniteError, NonFiniteGuard, guarded_step
from rlp_engine.engine.metrics import masked_stats

NAN, INF = float("nan"), float("inf")


def tiny():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.01)
    return model, opt


def make_batches(n: int):
    # fresh random data per test (conftest seeds each test from its name)
    return [(torch.randn(4, 6), 3 * torch.randn(4, 2)) for _ in range(n)]


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def snapshot(model, opt):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(opt.state_dict())


def assert_bitwise_same(a, b):
    """Parameters (list of tensors) and optimizer state dicts: identical, bit for bit."""
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name, v in sa["state"][k].items():
            w = sb["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)


def poison(model, loss, kind: str, step: int):
    """A bad step of kind: 'nan_loss' (NaN loss, finite gradients), 'inf_loss' (loss times inf: inf
    loss and non-finite gradients), 'nan_grad' / 'inf_grad' (finite loss, one gradient entry NaN /
    inf via a hook on the last layer's weight). Returns (loss, hook handle or None)."""
    if kind == "nan_loss":
        return loss + torch.tensor(NAN), None
    if kind == "inf_loss":
        return loss * INF, None
    value = NAN if kind == "nan_grad" else INF
    w = model[2].weight
    row = step % w.shape[0]
    return loss, w.register_hook(lambda g: g.index_fill(0, torch.tensor([row]), value))


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_skipped_steps_change_nothing_and_the_rest_equals_a_loop_without_them(with_scheduler, capsys):
    steps, max_norm = 10, 0.5
    bad = {1: "nan_loss", 3: "inf_grad", 4: "inf_loss", 7: "nan_grad"}
    data = make_batches(steps)
    torch.manual_seed(123)
    model, opt = tiny()
    ref_model = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=3e-2, weight_decay=0.01)

    def schedule(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) if with_scheduler else None

    sched, ref_sched = schedule(opt), schedule(ref_opt)
    guard = NonFiniteGuard(limit=len(bad), stage="sft")
    clipped = 0
    for step, (x, y) in enumerate(data):
        loss, handle = mse(model, x, y), None
        if step in bad:
            loss, handle = poison(model, loss, bad[step], step)
        before = snapshot(model, opt)
        applied, norm = guarded_step(
            loss, model.parameters(), opt, max_grad_norm=max_norm, guard=guard, step=step, scheduler=sched
        )
        if handle is not None:
            handle.remove()
        assert applied == (step not in bad)
        if step in bad:
            assert_bitwise_same(before, snapshot(model, opt))
            assert all(p.grad is None for p in model.parameters())
            if bad[step] != "nan_loss":  # a NaN constant in the loss leaves the gradients finite
                assert not torch.isfinite(norm)
            continue
        clipped += float(norm) > max_norm
        # the reference: the plain loop on the good batches only
        ref_opt.zero_grad()
        mse(ref_model, x, y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), max_norm)
        ref_opt.step()
        if ref_sched is not None:
            ref_sched.step()
        assert torch.equal(norm, ref_norm)
        assert_bitwise_same(snapshot(model, opt), snapshot(ref_model, ref_opt))
    assert clipped > 0  # the threshold was reached: clipping was exercised, not just the no-op path
    assert guard.count == len(bad) and guard.last_step == max(bad)
    if with_scheduler:
        assert sched.last_epoch == steps - len(bad)  # the schedule counts applied updates only
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[rlp-engine]")]
    assert len(lines) == len(bad)
    assert lines[0].startswith("[rlp-engine] sft step 1: non-finite loss=nan grad_norm=")
    assert lines[0].endswith(f"; skipped (1 of {len(bad)})")
    assert lines[2].startswith("[rlp-engine] sft step 4: non-finite loss=inf grad_norm=")


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_error_exactly_when_the_count_exceeds_the_limit(limit):
    model, opt = tiny()
    guard = NonFiniteGuard(limit=limit, stage="rm")
    bad_steps = [2, 3, 5, 6, 8][: limit + 1]
    for step, (x, y) in enumerate(make_batches(max(bad_steps) + 1)):
        loss = mse(model, x, y)
        if step in bad_steps:
            loss = loss * NAN
        if step == bad_steps[-1]:
            with pytest.raises(NonFiniteError) as err:
                guarded_step(loss, model.parameters(), opt, max_grad_norm=1.0, guard=guard, step=step)
            msg = str(err.value)
            assert "rm:" in msg and "run.max_nonfinite_steps" in msg
            assert (
                f"{limit + 1} steps" in msg
                and f"max_nonfinite_steps={limit}" in msg
                and f"step {step}" in msg
            )
            assert isinstance(err.value, RuntimeError)
        else:
            applied, _ = guarded_step(
                loss, model.parameters(), opt, max_grad_norm=1.0, guard=guard, step=step
            )
            assert applied == (step not in bad_steps)
    assert guard.count == limit + 1


@pytest.mark.parametrize("max_norm", [0.3, 1e6, 0.0, -1.0, INF])
def test_clipping_matches_clip_grad_norm_in_float64(max_norm):
    # loss = sum(p * c): the gradient is exactly c; SGD with lr 1 makes the update minus the clipped
    # gradient, so the update shows what guarded_step clipped to.
    params = [torch.randn(7, 3, requires_grad=True), torch.randn(11, requires_grad=True)]
    coefs = [torch.randn(7, 3) * 4, torch.randn(11) * 0.01]
    opt = torch.optim.SGD(params, lr=1.0)
    before = [p.detach().clone() for p in params]
    loss = sum((p * c).sum() for p, c in zip(params, coefs))
    applied, norm = guarded_step(
        loss, params, opt, max_grad_norm=max_norm, guard=NonFiniteGuard(limit=0, stage="ppo"), step=0
    )
    assert applied
    ref = [c.double().clone().requires_grad_() for c in coefs]
    for r in ref:
        r.grad = r.detach().clone()
    clip_to = max_norm if 0 < max_norm < INF else INF
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, clip_to)
    torch.testing.assert_close(norm.double(), ref_norm, rtol=1e-6, atol=0)
    for b, p, r, c in zip(before, params, ref, coefs):
        update = (b - p.detach()).double()
        torch.testing.assert_close(update, r.grad, rtol=1e-5, atol=1e-6)
        if clip_to == INF or max_norm == 1e6:  # unclipped: the update is the raw gradient
            assert torch.equal(p.detach(), b - c)
    if max_norm == 0.3:
        assert float(ref_norm) > 1.0  # it did clip
        total = torch.sqrt(sum(((b - p.detach()).double() ** 2).sum() for b, p in zip(before, params)))
        torch.testing.assert_close(total, torch.tensor(0.3, dtype=torch.float64), rtol=1e-5, atol=0)


def test_bad_arguments_are_named():
    model, opt = tiny()
    with pytest.raises(ValueError, match="run.max_nonfinite_steps"):
        NonFiniteGuard(limit=-1, stage="sft")
    guard = NonFiniteGuard(limit=1, stage="sft")
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match="loss must be a 0-dim tensor"):
        guarded_step((model(x) - y) ** 2, model.parameters(), opt, max_grad_norm=1.0, guard=guard, step=0)
    with pytest.raises(ValueError, match="max_grad_norm is NaN"):
        guarded_step(mse(model, x, y), model.parameters(), opt, max_grad_norm=NAN, guard=guard, step=0)


def reference_stats(x: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    v = x.double()[keep]
    if v.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": v.mean(), "std": v.std(correction=0), "min": v.min(), "max": v.max()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_stats_match_float64_torch(dtype):
    for shape in [(5, 9), (3, 4, 6), (17,)]:
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        keep = torch.rand(shape) > 0.35
        keep.view(-1)[0] = True
        # values outside the mask must not matter, however bad
        x = torch.where(keep, x, torch.tensor([NAN, INF, -INF])[torch.randint(3, shape)].to(dtype))
        mask = keep.float() if len(shape) == 2 else keep  # float and bool masks
        got = masked_stats(x, mask, prefix="adv")
        assert list(got) == ["adv_mean", "adv_std", "adv_min", "adv_max"]
        ref = reference_stats(x, keep)
        for k in ref:
            assert got[f"adv_{k}"].dtype == torch.float32 and got[f"adv_{k}"].dim() == 0
            torch.testing.assert_close(
                got[f"adv_{k}"].double(), torch.as_tensor(ref[k]).double(), rtol=1e-5, atol=1e-5
            )


def test_masked_stats_no_mask_empty_mask_nan_inside_and_errors():
    x = torch.randn(4, 5)
    got = masked_stats(x)
    assert list(got) == ["mean", "std", "min", "max"]
    ref = reference_stats(x, torch.ones_like(x, dtype=torch.bool))
    for k in ref:
        torch.testing.assert_close(got[k].double(), torch.as_tensor(ref[k]).double(), rtol=1e-5, atol=1e-6)
    one = masked_stats(x, torch.arange(20).view(4, 5) == 7, "v")  # a single entry: std 0, not NaN
    assert float(one["v_std"]) == 0.0 and float(one["v_mean"]) == float(x.view(-1)[7])
    empty = masked_stats(torch.full((3, 2), NAN), torch.zeros(3, 2), "ret")
    assert {k: float(v) for k, v in empty.items()} == {
        "ret_mean": 0.0,
        "ret_std": 0.0,
        "ret_min": 0.0,
        "ret_max": 0.0,
    }
    assert all(float(v) == 0.0 for v in masked_stats(torch.zeros(0, 3), torch.zeros(0, 3), "e").values())
    inside = masked_stats(torch.tensor([1.0, NAN, 2.0]), torch.tensor([1, 1, 0]), "s")
    assert all(torch.isnan(v) for v in inside.values())
    with pytest.raises(ValueError, match="mask must have x's shape"):
        masked_stats(x, torch.ones(4), "adv")
    with pytest.raises(TypeError, match="floating-point"):
        masked_stats(torch.ones(3, dtype=torch.long))


# 2-process run on CPU with gloo (torchrun's environment set by hand, as in test_distributed.py)

WORKER = Path(__file__).with_name("guards_worker.py")


def test_one_rank_nan_makes_every_rank_skip(tmp_path):
    codes, outs, _ = run_ranks([str(WORKER), str(tmp_path), "30"], 2, limit_s=90)
    assert codes == [0, 0], "\n".join(outs)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = [True, True, False, True, False, True]  # step 2: rank 1's loss, step 4: rank 0's grad
    for layout in ("dp", "fsdp", "mixed"):
        for r in res:
            got = r[layout]
            assert got["applied"] == expected and got["count"] == 2 and got["last_step"] == 4, layout
            assert got["clipped_steps"] > 0  # the reference clipped, so clipping is compared too
            # the skipped steps left no trace: the run equals one process over whole batches
            # without them (float64; only the summation order differs)
            torch.testing.assert_close(
                torch.tensor(got["weights"]), torch.tensor(got["ref_weights"]), rtol=0, atol=1e-12
            )
        assert res[0][layout]["weights"] == res[1][layout]["weights"], layout  # replicas agree bitwise
        lines = [ln for ln in outs[0].splitlines() if ln.startswith(f"[rlp-engine] {layout} step")]
        assert len(lines) == 2, outs[0]
        assert lines[0].startswith(f"[rlp-engine] {layout} step 2: non-finite loss=")
        assert lines[0].endswith("(non-finite loss on ranks [1]); skipped (1 of 5)")
        assert lines[1].startswith(f"[rlp-engine] {layout} step 4: non-finite loss=")
        assert lines[1].endswith("; skipped (2 of 5)")
    assert "[rlp-engine]" not in outs[1]  # rank 0 only prints
    # limit 0 and a NaN loss on rank 1 only: both ranks raise, naming the config key
    for r in res:
        assert "strict: 1 steps" in r["strict_raised"] and "run.max_nonfinite_steps=0" in r["strict_raised"]
    # masked_stats(across_ranks=True): the statistics of the union of the ranks' entries, on every rank
    for case in res[0]["stats"]:
        for k, v in case["ref"].items():
            assert case["got"][f"adv_{k}"] == pytest.approx(v, rel=1e-6, abs=1e-6), (k, case)
    assert res[0]["stats"] == res[1]["stats"]
