"""ops.dpo_loss and ops.simpo_loss: against a float64 computation with hand-derived gradients written
here, against TRL 1.12's real DPOTrainer._compute_loss and CPOTrainer.cpo_loss (loaded from the
installed package by test_compat_peers' loader, called unbound with a stub `self`), and bad input."""

from __future__ import annotations

import collections
import functools
import inspect
import types

import pytest
import torch
from test_compat_peers import DTYPES, LOWP, _load, check_like_peer, to64, trl_modules

from rlp_engine import ops

_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}  # (rtol, atol)


def _pairs(B, dtype, average=False):
    """Fresh (policy_chosen, policy_rejected, ref_chosen, ref_rejected) log-probs [B]: sums over
    5-200 tokens, the policy within a few nats of the reference; per-token averages if `average`."""
    ref = -torch.empty(2, B, dtype=torch.float64).uniform_(5, 200)
    pol = (ref + 6 * torch.randn(2, B, dtype=torch.float64)).clamp(max=-1.0)
    if average:
        n = torch.randint(5, 200, (2, B)).double()
        ref, pol = ref / n, pol / n
    return [t.to(dtype) for t in (pol[0], pol[1], ref[0], ref[1])]


def _softplus(x):  # log(1 + e^x)
    return torch.logaddexp(torch.zeros_like(x), x)


def _bt(z, eps):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z) and its derivative in z."""
    loss = (1 - eps) * _softplus(-z) + eps * _softplus(z)
    return loss, -(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)


def dpo_reference(pc, pr, rc, rr, beta, loss_type, eps, dtype=torch.float64):
    """(losses, [dloss/dpc, dloss/dpr, dloss/drc, dloss/drr], chosen_rewards, rejected_rewards) in
    `dtype`, from the papers' formulas; the margin is grouped differently from the op on purpose."""
    pc, pr, rc, rr = (t.to(dtype) for t in (pc, pr, rc, rr))
    h = (pc - pr) - (rc - rr)  # the implicit reward margin / beta
    z = beta * h
    if loss_type == "sigmoid":  # DPO; conservative DPO for eps > 0
        loss, dz = _bt(z, eps)
    elif loss_type == "robust":  # rDPO: unbiased under labels flipped with probability eps
        loss = ((1 - eps) * _softplus(-z) - eps * _softplus(z)) / (1 - 2 * eps)
        dz = (-(1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.clamp(1 - z, min=0)
        dz = torch.where(z < 1, -1.0, 0.0).to(dtype)
    else:  # ipo: (h - 1/(2 beta))^2, so dloss/dh = 2 (h - 1/(2 beta)) = beta * dloss/dz
        loss = (h - 0.5 / beta) ** 2
        dz = 2 * (h - 0.5 / beta) / beta
    dh = beta * dz
    return loss, [dh, -dh, -dh, dh], beta * (pc - rc), beta * (pr - rr)


def simpo_reference(c, r, beta, ratio, eps, dtype=torch.float64):
    """(losses, [dloss/dc, dloss/dr], chosen_rewards, rejected_rewards): z = beta (c - r) - gamma."""
    c, r = c.to(dtype), r.to(dtype)
    z = beta * (c - r) - ratio * beta
    loss, dz = _bt(z, eps)
    return loss, [beta * dz, -beta * dz], beta * c, beta * r


def _check(got, ref64, plain, dtype):
    """fp64/fp32 within _TOL of the fp64 reference; fp16/bf16 by flash-attention's rule against the
    same formula computed plainly in that dtype (`plain`), and within an ulp of the reference."""
    assert got.dtype == dtype and got.shape == ref64.shape, (got.dtype, got.shape)
    if dtype not in LOWP:
        rtol, atol = _TOL[dtype]
        torch.testing.assert_close(got.double(), ref64, rtol=rtol, atol=atol)
        return
    check_like_peer(got, plain, ref64, dtype)
    # computed in fp32 and rounded once: within an ulp of the fp64 value
    err = (got.double() - ref64).abs()
    bound = torch.finfo(dtype).eps * ref64.abs() + 64 * torch.finfo(torch.float32).eps * ref64.abs().max()
    assert (err <= bound).all(), (err - bound).max()


def _run(fn, inputs, *args, **kw):
    """fn's outputs and the gradients of sum(g * losses) wrt every input, for a random g."""
    xs = [t.clone().requires_grad_(True) for t in inputs]
    losses, cr, rr = fn(*xs, *args, **kw)
    g = torch.rand_like(losses) + 0.5
    grads = torch.autograd.grad(losses, xs, grad_outputs=g)
    return losses, cr, rr, grads, g


_DPO_CASES = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.2),
    ("robust", 0.0),
    ("robust", 0.3),
    ("hinge", 0.0),
    ("ipo", 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, beta", [(1, 0.7), (7, None), (13, 0.03)])
@pytest.mark.parametrize("loss_type, eps", _DPO_CASES)
def test_dpo_loss_matches_float64_reference(loss_type, eps, B, beta, dtype):
    inputs = _pairs(B, dtype)
    before = [t.clone() for t in inputs]
    kw = {} if beta is None else {"beta": beta}
    losses, cr, rr, grads, g = _run(ops.dpo_loss, inputs, loss_type=loss_type, label_smoothing=eps, **kw)
    b = 0.1 if beta is None else beta  # the default
    want = dpo_reference(*inputs, b, loss_type, eps)
    plain = dpo_reference(*inputs, b, loss_type, eps, dtype=dtype)
    _check(losses, want[0], plain[0], dtype)
    for got, w, p in zip(grads, want[1], plain[1]):
        _check(got, g.double() * w, g * p, dtype)
    for got, w, p in zip((cr, rr), want[2:], plain[2:]):
        _check(got, w, p, dtype)
        assert not got.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, beta, ratio", [(1, 2.5, 0.3), (7, None, None), (13, 10.0, 1.2)])
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_simpo_loss_matches_float64_reference(eps, B, beta, ratio, dtype):
    inputs = _pairs(B, dtype, average=True)[:2]
    kw = {} if beta is None else {"beta": beta, "gamma_beta_ratio": ratio}
    losses, cr, rr, grads, g = _run(ops.simpo_loss, inputs, label_smoothing=eps, **kw)
    b, q = (2.0, 0.5) if beta is None else (beta, ratio)  # the defaults
    want = simpo_reference(*inputs, b, q, eps)
    plain = simpo_reference(*inputs, b, q, eps, dtype=dtype)
    _check(losses, want[0], plain[0], dtype)
    for got, w, p in zip(grads, want[1], plain[1]):
        _check(got, g.double() * w, g * p, dtype)
    for got, w, p in zip((cr, rr), want[2:], plain[2:]):
        _check(got, w, p, dtype)
        assert not got.requires_grad


def test_mixed_dtypes_and_empty_batch():
    pc, pr, rc, rr = _pairs(5, torch.float64)
    losses, cr, _ = ops.dpo_loss(pc.bfloat16(), pr.bfloat16(), rc.float(), rr.float())
    assert losses.dtype == cr.dtype == torch.float32  # promoted, as torch would
    want = dpo_reference(pc.bfloat16(), pr.bfloat16(), rc.float(), rr.float(), 0.1, "sigmoid", 0.0)[0]
    torch.testing.assert_close(losses.double(), want, rtol=1e-6, atol=1e-6)
    empty = torch.empty(0, dtype=torch.float16)
    for out in ops.dpo_loss(empty, empty, empty, empty, loss_type="ipo") + ops.simpo_loss(empty, empty):
        assert out.shape == (0,) and out.dtype == torch.float16


def test_signatures():
    def defaults(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    e = inspect.Parameter.empty
    logps = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    assert defaults(ops.dpo_loss) == [(n, e) for n in logps] + [
        ("beta", 0.1),
        ("loss_type", "sigmoid"),
        ("label_smoothing", 0.0),
    ]
    assert defaults(ops.simpo_loss) == [
        ("chosen_logps", e),
        ("rejected_logps", e),
        ("beta", 2.0),
        ("gamma_beta_ratio", 0.5),
        ("label_smoothing", 0.0),
    ]
    assert set(ops.DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "robust"}


# ---- against TRL 1.12 -------------------------------------------------------------------------------


@functools.cache
def _trl_trainers():
    """(DPOTrainer, CPOTrainer) from the installed TRL 1.12 files (pandas/datasets/pyarrow stubbed)."""
    trl_modules()  # the bare trl packages and transformers, set up as the compat tests do
    dpo, cpo = _load(
        "trl",
        bare=["trl", "trl.trainer"],
        stubs=["pandas", "datasets", "pyarrow"],
        modules=["trl.trainer.dpo_trainer", "trl.experimental.cpo.cpo_trainer"],
    )
    return dpo.DPOTrainer, cpo.CPOTrainer


def _trl_dpo(pc, pr, rc, rr, lengths, loss_type, beta, eps):
    """TRL's DPOTrainer._compute_loss (batch mean) and its logged metrics, with the reference
    log-probs precomputed and a stand-in model whose per-token log-probs over each completion of
    `lengths` tokens sum to the given policy log-probs."""
    dpo_trainer, _ = _trl_trainers()
    logps = torch.cat([pc, pr])  # (2B,): TRL's batch is [chosen; rejected]
    n, T = logps.shape[0], int(lengths.max()) + 1
    a = (logps / lengths)[:, None].expand(n, T)  # (2B, T) per-token log-prob
    # a two-token vocabulary [a, log(1 - e^a)]: its normaliser is log 1, so log_softmax gives a
    logits = torch.stack([a, torch.log(-torch.expm1(a))], dim=-1)  # (2B, T, 2)
    pos = torch.arange(T)
    inputs = {
        "input_ids": torch.zeros(n, T, dtype=torch.long),  # every label is token 0
        "attention_mask": torch.ones(n, T, dtype=torch.long),
        "completion_mask": ((pos >= 1) & (pos <= lengths[:, None])).long(),  # the prompt is token 0
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    acc = types.SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    stub = types.SimpleNamespace(  # the attributes _compute_loss reads
        model=types.SimpleNamespace(training=False),
        accelerator=acc,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        _metrics={"eval": collections.defaultdict(list)},
        _total_train_tokens=0,
    )
    loss = dpo_trainer._compute_loss(stub, lambda **kw: types.SimpleNamespace(logits=logits), inputs, False)
    return loss, stub._metrics["eval"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "loss_type, eps", [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.3), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_dpo_loss_matches_trl_dpo_trainer(loss_type, eps, dtype):
    B, beta = 7, 0.35
    inputs = _pairs(B, dtype)
    lengths = torch.randint(1, 6, (2 * B,))
    rtol, atol = (1e-9, 1e-9) if dtype == torch.float64 else (1e-5, 1e-5)
    # TRL's IPO divides each log-ratio by its completion length: ours on per-token averages
    ours_in = inputs
    if loss_type == "ipo":
        lc, lr = lengths.to(dtype).chunk(2)
        ours_in = [inputs[0] / lc, inputs[1] / lr, inputs[2] / lc, inputs[3] / lr]

    xs = [t.clone().requires_grad_(True) for t in inputs]  # the batch mean and its gradients
    loss, _ = _trl_dpo(*xs, lengths, loss_type, beta, eps)
    want_grads = torch.autograd.grad(loss, xs)
    ys = [t.clone().requires_grad_(True) for t in ours_in]
    losses, _, _ = ops.dpo_loss(*ys, beta=beta, loss_type=loss_type, label_smoothing=eps)
    got_grads = torch.autograd.grad(losses.mean(), ys)
    torch.testing.assert_close(losses.mean(), loss, rtol=rtol, atol=atol)
    if loss_type == "ipo":  # back to gradients wrt the summed log-probs
        got_grads = [g / lc if i % 2 == 0 else g / lr for i, g in enumerate(got_grads)]
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)

    _, cr, rr = ops.dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for i in range(B):  # per pair: the loss, and the rewards TRL logs (summed log-ratios)
        one = [t[i : i + 1] for t in inputs]
        loss_i, metrics = _trl_dpo(*one, lengths[[i, B + i]], loss_type, beta, eps)
        torch.testing.assert_close(losses[i], loss_i, rtol=rtol, atol=atol)
        assert metrics["rewards/chosen"][0] == pytest.approx(cr[i].item(), rel=rtol, abs=atol)
        assert metrics["rewards/rejected"][0] == pytest.approx(rr[i].item(), rel=rtol, abs=atol)


def test_trl_dpo_trainer_ignores_label_smoothing_for_sigmoid():
    """The one deliberate difference: TRL 1.12's DPOTrainer computes plain DPO for "sigmoid" whatever
    label_smoothing is; ours gives conservative DPO (as TRL's CPOTrainer, checked below)."""
    inputs = _pairs(7, torch.float64)
    trl_loss, _ = _trl_dpo(*inputs, torch.randint(1, 6, (14,)), "sigmoid", 0.2, 0.25)
    plain = ops.dpo_loss(*inputs, beta=0.2)[0].mean()
    conservative = ops.dpo_loss(*inputs, beta=0.2, label_smoothing=0.25)[0].mean()
    torch.testing.assert_close(trl_loss, plain, rtol=1e-9, atol=1e-9)
    assert (conservative - plain).abs() > 1e-3


def _cpo_loss(loss_type, beta, eps, chosen, rejected, simpo_gamma=None):
    """TRL's CPOTrainer.cpo_loss with a stub `self` carrying the attributes it reads."""
    _, cpo_trainer = _trl_trainers()
    stub = types.SimpleNamespace(
        alpha=0.0,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=simpo_gamma,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    return cpo_trainer.cpo_loss(stub, chosen, rejected)


def _compare_with_cpo(ours_fn, cpo_fn, inputs, dtype):
    """Outputs and input gradients of ours and of TRL's cpo_loss (on the inputs and on their fp64
    copies), compared value for value; fp16/bf16 by flash-attention's rule."""
    lowp = dtype if dtype in LOWP else None
    g = torch.rand(inputs[0].shape, dtype=torch.float64) + 0.5
    results = []
    for fn, xs in ((ours_fn, inputs), (cpo_fn, inputs), (cpo_fn, to64(*inputs))):
        xs = [t.clone().requires_grad_(True) for t in xs]
        losses, cr, rr = fn(*xs)
        grads = torch.autograd.grad(losses, xs, grad_outputs=g.to(losses.dtype))
        results.append([losses, cr, rr, *grads])
    for got, want, want64 in zip(*results):
        check_like_peer(got, want, want64, lowp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta, ratio, eps", [(2.0, 0.5, 0.0), (2.5, 0.3, 0.2), (0.7, 1.5, 0.1)])
def test_simpo_loss_matches_trl_cpo_simpo(beta, ratio, eps, dtype):
    inputs = _pairs(9, dtype, average=True)[:2]
    _compare_with_cpo(
        lambda c, r: ops.simpo_loss(c, r, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps),
        lambda c, r: _cpo_loss("simpo", beta, eps, c, r, simpo_gamma=ratio * beta),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_loss_matches_trl_cpo_on_log_ratios(loss_type, eps, dtype):
    """CPOTrainer's sigmoid (with conservative label smoothing), hinge and ipo losses are DPO's when fed
    the policy/reference log-ratios; its rewards are then beta * (policy - ref)."""
    beta = 0.15
    inputs = _pairs(9, dtype)
    _compare_with_cpo(
        lambda pc, pr, rc, rr: ops.dpo_loss(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps
        ),
        lambda pc, pr, rc, rr: _cpo_loss(loss_type, beta, eps, pc - rc, pr - rr),
        inputs,
        dtype,
    )


# ---- bad input -------------------------------------------------------------------------------------


def test_dpo_loss_bad_input():
    x = _pairs(5, torch.float32)
    names = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    for i in range(1, 4):
        for bad in (torch.randn(6), torch.randn(5, 1), torch.randn(5, device="meta")):
            args = list(x)
            args[i] = bad
            with pytest.raises(ValueError, match=names[i]):
                ops.dpo_loss(*args)
    for i, name in enumerate(names):
        for bad in (x[i].long(), x[i].tolist()):
            args = list(x)
            args[i] = bad
            with pytest.raises(TypeError, match=name):
                ops.dpo_loss(*args)
    for loss_type in ("kto", "", "SIGMOID", None):
        with pytest.raises(ValueError, match="loss_type"):
            ops.dpo_loss(*x, loss_type=loss_type)
    for beta in (0, 0.0, -0.1, float("nan"), float("inf"), "0.1", True, None):
        with pytest.raises(ValueError, match="beta"):
            ops.dpo_loss(*x, beta=beta)
    for loss_type in ("sigmoid", "robust"):
        for eps in (-0.1, 0.5, 0.9, float("nan"), None):
            with pytest.raises(ValueError, match="label_smoothing"):
                ops.dpo_loss(*x, loss_type=loss_type, label_smoothing=eps)
    for loss_type in ("hinge", "ipo"):  # they do not read it: a value would be silently dropped
        with pytest.raises(ValueError, match="label_smoothing"):
            ops.dpo_loss(*x, loss_type=loss_type, label_smoothing=0.1)


def test_simpo_loss_bad_input():
    c, r = _pairs(5, torch.float32, average=True)[:2]
    for bad in (torch.randn(4), torch.randn(1, 5)):
        with pytest.raises(ValueError, match="rejected_logps"):
            ops.simpo_loss(c, bad)
    with pytest.raises(TypeError, match="chosen_logps"):
        ops.simpo_loss(c.int(), r)
    for beta in (0, -2.0, float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="beta"):
            ops.simpo_loss(c, r, beta=beta)
    for ratio in (float("nan"), float("inf"), None, "0.5"):
        with pytest.raises(ValueError, match="gamma_beta_ratio"):
            ops.simpo_loss(c, r, gamma_beta_ratio=ratio)
    for eps in (-0.01, 0.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            ops.simpo_loss(c, r, label_smoothing=eps)
