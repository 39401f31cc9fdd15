"""Property-based tests (hypothesis) of the public ops in rlp_engine.ops against float64 references
written here from DESIGN "Op semantics" (independent of the kernels' own *_ref code). Random shapes
(B, T = 1 and odd sizes), masks with holes and empty rows, fp32/fp64, extreme but finite values;
forward values and gradients. Default CPU backend (cpp) and "torch"; "triton" (interpreter) for
kl_penalty and gaussian_symmetric_kl with few examples. Derandomized: CI sees the same examples."""

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlp_engine import ops

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,  # no replay of examples saved by earlier runs: every run sees the same examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(SETTINGS, max_examples=5)

BACKENDS = [None, "torch"]  # None: the default for CPU tensors (cpp)
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def on(backend):
    return contextlib.nullcontext() if backend is None else ops.backend(backend)


def mats(shape, lo=-10.0, hi=10.0):
    return arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False))


@st.composite
def bt(draw, b_max=5, t_max=9, b_min=0, t_min=0):
    """(B, T): 0 (empty: every op here accepts it), 1, odd and even sizes."""
    return draw(st.integers(b_min, b_max)), draw(st.integers(t_min, t_max))


@st.composite
def masks(draw, shape):
    """Bool masks with holes; rows are often empty (a third of rows on average)."""
    m = draw(arrays(np.bool_, shape, elements=st.booleans()))
    empty = draw(arrays(np.bool_, shape[:1], elements=st.sampled_from([False, False, True])))
    m[empty] = False
    return torch.from_numpy(m)


def amax(x):
    """max |x| as a float, 0 for an empty tensor."""
    return float(x.detach().abs().max()) if x.numel() else 0.0


def t(a, dtype, grad=False):
    x = torch.as_tensor(np.asarray(a)).to(dtype)
    return x.requires_grad_(grad)


def close(got, want, dtype, scale=1.0):
    tol = TOL[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=False
    )


# ---- KL estimators -----------------------------------------------------------------------------


def kl_ref(r, kind):
    """Value per DESIGN "KL estimators" in fp64 (autograd gives the gradient; '+' -> k2's gradient)."""
    base = kind.rstrip("+")
    if base in ("k1", "kl"):
        v = r
    elif base == "abs":
        v = r.abs()
    elif base in ("k2", "mse"):
        v = 0.5 * r * r
    elif base == "k1_nonneg":
        v = r.clamp(min=0)
    else:
        k = (-r).clamp(-20, 20)
        v = (k.exp() - k - 1).clamp(-10, 10)
    if kind.endswith("+"):
        st_ = 0.5 * r * r
        v = st_ + (v - st_).detach()
    return v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), kind=st.sampled_from(ops.KL_KINDS))
def test_kl_penalty(backend, dtype, data, kind):
    shape = data.draw(bt())
    ref = data.draw(mats(shape, -40, 0))
    diff = data.draw(mats(shape, -30, 30))  # log-prob differences up to +-30: all clamps hit
    lp = t(ref + diff, dtype, grad=True)
    rf = t(ref, dtype, grad=True)
    with on(backend):
        out = ops.kl_penalty(lp, rf, kind)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    r = (lp.detach() - rf.detach()).double().requires_grad_(True)  # r as the op forms it, in fp64
    want = kl_ref(r, kind)
    close(out, want, dtype)
    g = torch.randn(shape, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    (gr,) = torch.autograd.grad(want, r, g)
    close(lp.grad, gr, dtype, scale=10)
    close(rf.grad, -gr, dtype, scale=10)


@FEW
@given(data=st.data(), kind=st.sampled_from(["k3", "k1_nonneg", "abs+"]))
def test_kl_penalty_triton(data, kind):
    shape = data.draw(bt(3, 5))
    ref = data.draw(mats(shape, -40, 0))
    lp = t(ref + data.draw(mats(shape, -30, 30)), torch.float32, grad=True)
    with ops.backend("triton"):
        out = ops.kl_penalty(lp, t(ref, torch.float32), kind)
    r = (lp.detach() - t(ref, torch.float32)).double().requires_grad_(True)
    want = kl_ref(r, kind)
    close(out, want, torch.float32)
    out.sum().backward()
    close(lp.grad, torch.autograd.grad(want.sum(), r)[0], torch.float32, scale=10)


# ---- GAE ---------------------------------------------------------------------------------------


def gae_loop(r, v, m, gamma, lam, mode):
    r, v, m = r.double(), v.double(), m.double()
    if mode == "zero":
        r, v = r * m, v * m
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        nv = g = 0.0
        for i in reversed(range(T)):
            if mode == "zero":
                nv = v[b, i + 1].item() if i + 1 < T else 0.0
            delta = r[b, i].item() + gamma * nv - v[b, i].item()
            g2 = delta + gamma * lam * g
            if mode == "carry":
                mi = m[b, i].item()
                nv = mi * v[b, i].item() + (1 - mi) * nv
                g = mi * g2 + (1 - mi) * g
            else:
                g = g2
            adv[b, i] = g
    return adv, adv + v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    data=st.data(),
    gamma=st.sampled_from([0.0, 1.0]) | st.floats(0, 1),
    lam=st.sampled_from([0.0, 1.0]) | st.floats(0, 1),
    mode=st.sampled_from(["carry", "zero"]),
)
def test_compute_gae(backend, dtype, data, gamma, lam, mode):
    shape = data.draw(bt(5, 17))
    r, v = t(data.draw(mats(shape)), dtype), t(data.draw(mats(shape)), dtype)
    m = data.draw(masks(shape))
    with on(backend):
        adv, ret = ops.compute_gae(r, v, m, gamma, lam, mode)
    assert adv.dtype == ret.dtype == torch.float32 and not adv.requires_grad
    want_adv, want_ret = gae_loop(r, v, m, gamma, lam, mode)
    close(adv, want_adv, torch.float32, scale=20)
    close(ret, want_ret, torch.float32, scale=20)


# ---- masked reductions, whitening, aggregation ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), poison=st.sampled_from([math.nan, math.inf, 1e30]))
def test_masked_reductions(dtype, data, poison):
    shape = data.draw(bt())
    x = data.draw(mats(shape, -100, 100))
    m = data.draw(masks(shape))
    xp = t(np.where(m.numpy(), x, poison), dtype)  # off-mask values never matter
    xd, md = torch.as_tensor(x), m.double()
    n = md.sum()
    close(ops.masked_sum(xp, m), (xd * md).sum(), dtype, scale=100)
    close(ops.masked_sum(xp, m, dim=-1), (xd * md).sum(-1), dtype, scale=100)
    mean = (xd * md).sum() / (n + 1e-8)
    close(ops.masked_mean(xp, m), mean, dtype, scale=100)
    close(ops.masked_mean(xp, m, dim=-1), (xd * md).sum(-1) / (md.sum(-1) + 1e-8), dtype, scale=100)
    if n < 2:
        with pytest.raises(ValueError, match="masked_var"):
            ops.masked_var(xp, m)
        with pytest.raises(ValueError):
            ops.masked_whiten(xp, m)
        return
    biased = (((xd - mean) ** 2) * md).sum() / (n + 1e-8)  # masked_mean's "+ 1e-8" (verl's)
    var = biased * n / (n - 1)
    close(ops.masked_var(xp, m), var, dtype, scale=1e4)
    close(ops.masked_var(xp, m, unbiased=False), biased, dtype, scale=1e4)
    for shift in (True, False):
        w = ops.masked_whiten(xp, m, shift_mean=shift)
        assert w.dtype == dtype
        want = (xd - mean) / torch.sqrt(var + 1e-8) + (0 if shift else mean)
        # statistics in fp32: the error grows with |x| / std
        scale = 100 * (1 + xd.abs().max()) / torch.sqrt(var + 1e-8)
        tol = dict(rtol=1e-4, atol=1e-5 * float(scale))
        torch.testing.assert_close(w.double()[m], want[m], **tol)


def agg_ref(L, m, mode):
    """agg_loss per DESIGN "PPO policy loss" aggregation modes, written as loops over rows (fp64)."""
    L, m = L.double(), m.double()
    B, T = L.shape
    zero = torch.where(m > 0, L, 0.0).sum() * 0  # keeps the graph when no row counts
    rows = [torch.where(m[b] > 0, L[b], 0.0).sum() for b in range(B)]
    lens = [float(m[b].sum()) for b in range(B)]
    nonempty = [b for b in range(B) if lens[b] > 0]
    seqs = max(len(nonempty), 1)
    if mode == "token-sum":
        return zero + sum(rows)
    if mode == "token-mean":
        return zero + sum(rows) / max(sum(lens), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return zero + (sum(rows) / T if T else 0.0)  # T = 0: nothing to sum
    if mode == "seq-mean-token-sum":
        return zero + sum(rows[b] for b in nonempty) / seqs
    return zero + sum(rows[b] / (lens[b] + 1e-8) for b in nonempty) / seqs  # agg_weights: row + 1e-8


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), mode=st.sampled_from(ops.AGG_MODES))
def test_agg_loss(dtype, data, mode):
    shape = data.draw(bt())
    m = data.draw(masks(shape))
    L = t(data.draw(mats(shape, -100, 100)), dtype, grad=True)
    out = ops.agg_loss(L, m, mode)
    Ld = L.detach().double().requires_grad_(True)
    want = agg_ref(Ld, m, mode)
    close(out, want, torch.float32, scale=100)
    out.backward()
    (gw,) = torch.autograd.grad(want, Ld)
    close(L.grad, gw, torch.float32)


# ---- PPO losses --------------------------------------------------------------------------------


def policy_ref(lp, old, adv, m, cl, ch, dual, mode):
    nk = (lp - old).clamp(-20, 20)
    rho = nk.exp()
    pg1, pg2 = -adv * rho, -adv * rho.clamp(1 - cl, 1 + ch)
    c1 = torch.maximum(pg1, pg2)
    L = c1
    lower = torch.zeros_like(lp)
    if dual is not None:
        c2 = torch.minimum(-adv * dual, c1)
        L = torch.where(adv < 0, c2, c1)
        lower = ((c1 > -adv * dual) & (adv < 0)).double()
    md = m.double()
    n = md.sum() + 1e-8
    metrics = {
        "clipfrac": ((pg2 > pg1).double() * md).sum() / n,
        "approx_kl": (-nk * md).sum() / n,
        "clipfrac_lower": (lower * md).sum() / n,
    }
    return agg_ref(L, m, mode), metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    data=st.data(),
    mode=st.sampled_from(ops.AGG_MODES),
    clip=st.tuples(st.floats(0, 0.5), st.floats(0, 0.5)),
    dual=st.none() | st.floats(1.01, 10),
)
def test_ppo_policy_loss(backend, dtype, data, mode, clip, dual):
    shape = data.draw(bt())
    old = data.draw(mats(shape, -30, 0))
    lp = t(old + data.draw(mats(shape, -30, 30)), dtype, grad=True)  # ratios far past the clamp
    oldt, adv = t(old, dtype), t(data.draw(mats(shape, -5, 5)), dtype)
    m = data.draw(masks(shape))
    with on(backend):
        loss, met = ops.ppo_policy_loss(lp, oldt, adv, m, clip[0], clip[1], dual, mode)
    x = lp.detach().double().requires_grad_(True)
    want, want_met = policy_ref(x, oldt.double(), adv.double(), m, clip[0], clip[1], dual, mode)
    # exp(20) * |A| ~ 2.4e9: compare relative to the largest per-token term
    scale = max(1.0, amax(adv.double() * (x.detach() - oldt.double()).clamp(-20, 20).exp()))
    close(loss, want, dtype, scale=scale)
    for k, v in want_met.items():
        assert met[k].dtype == torch.float32 and met[k].dim() == 0
        close(met[k], v, torch.float32, scale=10)
    loss.backward()
    (gw,) = torch.autograd.grad(want, x)
    # Gradients where the subgradient is unique: no max/min tie, not on a clamp edge.
    a_, nk = adv.double(), (x.detach() - oldt.double())
    rho = nk.clamp(-20, 20).exp()
    smooth = (rho != 1 - clip[0]) & (rho != 1 + clip[1]) & (nk.abs() != 20)
    if dual is not None:
        c1 = torch.maximum(-a_ * rho, -a_ * rho.clamp(1 - clip[0], 1 + clip[1]))
        smooth &= c1 != -a_ * dual
    close(lp.grad[smooth], gw[smooth], dtype, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), mode=st.sampled_from(ops.AGG_MODES), clip=st.none() | st.floats(0, 1))
def test_ppo_value_loss(backend, dtype, data, mode, clip):
    shape = data.draw(bt())
    v = t(data.draw(mats(shape)), dtype, grad=True)
    vo, R = t(data.draw(mats(shape)), dtype), t(data.draw(mats(shape)), dtype)
    m = data.draw(masks(shape))
    with on(backend):
        loss, met = ops.ppo_value_loss(v, vo, R, m, clip, mode)
    x = v.detach().double().requires_grad_(True)
    e1 = (x - R.double()) ** 2
    if clip is None:
        L = e1
        frac = torch.zeros((), dtype=torch.float64)
    else:
        vc = torch.maximum(torch.minimum(x, vo.double() + clip), vo.double() - clip)
        e2 = (vc - R.double()) ** 2
        L = torch.maximum(e1, e2)
        frac = ((e2 > e1).double() * m.double()).sum() / (m.double().sum() + 1e-8)
    want = 0.5 * agg_ref(L, m, mode)
    close(loss, want, dtype, scale=400)
    close(met["clipfrac"], frac, torch.float32)
    loss.backward()
    (gw,) = torch.autograd.grad(want, x)
    # Gradients where the subgradient is unique: no max tie, not on a clamp edge.
    smooth = torch.ones(shape, dtype=torch.bool)
    if clip is not None:
        xd, vod = x.detach(), vo.double()
        smooth = (e1 != e2) & (xd != vod + clip) & (xd != vod - clip)
    close(v.grad[smooth], gw[smooth], dtype, scale=40)


# found by this file: T = 0 with seq-mean-token-sum-norm divided by zero in row_scale (fixed)
@pytest.mark.parametrize("shape", [(0, 0), (3, 0)])
@pytest.mark.parametrize("which", ["policy", "value"])
def test_ppo_losses_empty_time_norm_mode(shape, which):
    x, m = torch.zeros(shape, requires_grad=True), torch.zeros(shape, dtype=torch.bool)
    fn = ops.ppo_policy_loss if which == "policy" else ops.ppo_value_loss
    loss = fn(x, x.detach(), x.detach(), m, agg="seq-mean-token-sum-norm")[0]
    assert float(loss) == float(ops.agg_loss(x, m, "seq-mean-token-sum-norm")) == 0.0


# ---- log-probs -----------------------------------------------------------------------------------


def logprob_ref(z, y, temperature, ignore_index=-100):
    z = z.double() / temperature
    lse = torch.logsumexp(z, -1)
    keep = y != ignore_index
    lp = torch.where(keep, z.gather(-1, torch.where(keep, y, 0)[..., None])[..., 0] - lse, 0.0)
    p = torch.softmax(z, -1)
    ent = torch.where(keep, lse - (p * z).sum(-1), 0.0)
    return lp, ent


@st.composite
def labels(draw, shape, vocab):
    y = draw(arrays(np.int64, shape, elements=st.integers(0, vocab - 1) | st.just(-100)))
    return torch.from_numpy(y)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data(), temperature=st.sampled_from([1.0, 0.7]) | st.floats(0.05, 5))
def test_logprobs_from_logits(backend, data, temperature):
    B, T = data.draw(bt(3, 5))
    V = data.draw(st.integers(1, 37))
    z = t(data.draw(mats((B, T, V), -50, 50)), torch.float32, grad=True)
    y = data.draw(labels((B, T), V))
    with on(backend):
        lp, ent = ops.logprobs_from_logits(z, y, temperature, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    zd = z.detach().double().requires_grad_(True)
    wlp, went = logprob_ref(zd, y, temperature)
    close(lp, wlp, torch.float32, scale=50 / temperature)
    close(ent, went, torch.float32, scale=50 / temperature)
    g1, g2 = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    ((lp * g1.float()).sum() + (ent * g2.float()).sum()).backward()
    (gz,) = torch.autograd.grad((wlp * g1).sum() + (went * g2).sum(), zd)
    close(z.grad, gz, torch.float32, scale=50 / temperature)


# "torch" only: the CPU default (cpp) runs this same chunked torch path for the fused-linear ops
# (tests/test_fused_linear.py test_cpp_is_the_torch_path checks the alias once).
@pytest.mark.parametrize("backend", ["torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), temperature=st.floats(0.3, 3), with_bias=st.booleans())
def test_fused_linear_logprobs(backend, dtype, data, temperature, with_bias):
    N, H = data.draw(bt(7, 9, t_min=1))
    V = data.draw(st.integers(1, 70))
    h = t(data.draw(mats((N, H), -2, 2)), dtype, grad=True)
    w = t(data.draw(mats((V, H), -2, 2)), dtype, grad=True)
    b = t(data.draw(mats((V,), -2, 2)), dtype, grad=True) if with_bias else None
    y = data.draw(labels((N,), V))
    with on(backend):
        lp, ent = ops.fused_linear_logprobs(h, w, y, temperature, bias=b, return_entropy=True)
    leaves = [x.detach().double().requires_grad_(True) for x in (h, w) + ((b,) if with_bias else ())]
    z = leaves[0] @ leaves[1].T + (leaves[2] if with_bias else 0)
    wlp, went = logprob_ref(z, y, temperature)
    close(lp, wlp, dtype, scale=50)
    close(ent, went, dtype, scale=50)
    g1, g2 = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    ((lp * g1.to(lp.dtype)).sum() + (ent * g2.to(ent.dtype)).sum()).backward()
    grads = torch.autograd.grad((wlp * g1).sum() + (went * g2).sum(), leaves)
    for got, want in zip((h.grad, w.grad) + ((b.grad,) if with_bias else ()), grads):
        close(got, want, dtype, scale=50)


# ---- information bottleneck ------------------------------------------------------------------------


def skl_ref(m1, lv1, m2, lv2):
    s1, s2, d2 = lv1.exp(), lv2.exp(), (m1 - m2) ** 2
    return 0.25 * ((s1 + d2) / s2 + (s2 + d2) / s1 - 2).sum(-1)


def _skl_case(backend, dtype, data, n_max=5, d_max=9):
    N, D = data.draw(bt(n_max, d_max, t_min=1))
    raw = [data.draw(mats((N, D), *rng)) for rng in ((-10, 10), (-6, 6), (-10, 10), (-6, 6))]
    xs = [t(a, dtype, grad=True) for a in raw]
    with on(backend):
        out = ops.gaussian_symmetric_kl(*xs)
    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    want = skl_ref(*leaves)
    # SKL reaches ~(20^2 + e^6) e^6 ~ 4e5: compare relative to its size
    scale = max(1.0, amax(want))
    assert out.shape == want.shape
    close(out, want, torch.float32, scale=scale)  # documented: fp32 output for every input dtype
    g = torch.randn(N, dtype=torch.float64)
    out.backward(g.to(out.dtype))
    for x, gw in zip(xs, torch.autograd.grad((want * g).sum(), leaves)):
        assert x.grad.dtype == dtype
        close(x.grad, gw, torch.float32, scale=scale)  # computed in fp32 (cpp) like the value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_gaussian_symmetric_kl(backend, dtype, data):
    _skl_case(backend, dtype, data)


# found by this file: with fp64 inputs the torch backend returned fp64, the cpp one fp32 (fixed)
def test_gaussian_symmetric_kl_fp64_dtype_same_on_backends():
    xs = [torch.rand(2, 3, dtype=torch.float64) for _ in range(4)]
    dts = set()
    for name in ("cpp", "torch"):
        with ops.backend(name):
            dts.add(ops.gaussian_symmetric_kl(*xs).dtype)
    assert dts == {torch.float32}


@FEW
@given(data=st.data())
def test_gaussian_symmetric_kl_triton(data):
    _skl_case("triton", torch.float32, data, 3, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    data=st.data(), negatives=st.sampled_from(["all", "roll"]), beta=st.floats(0, 2), seed=st.integers(0, 99)
)
def test_multiview_ib_loss(dtype, data, negatives, beta, seed):
    N, D = data.draw(bt(5, 6, b_min=2, t_min=1))
    raw = [data.draw(mats((N, D), *rng)) for rng in ((-3, 3), (-3, 3), (-3, 3), (-3, 3))]
    xs = [t(a, dtype, grad=True) for a in raw]
    A = torch.randn(D, D, dtype=dtype)

    def critic(z1, z2):  # bilinear T(z1, z2) = z1^T A z2
        return ((z1 @ A.to(z1.dtype)) * z2).sum(-1)

    loss, met = ops.multiview_ib_loss(
        *xs, critic, beta, torch.Generator().manual_seed(seed), negatives=negatives
    )
    gen = torch.Generator().manual_seed(seed)  # the same draws: eps1 then eps2, in the inputs' dtype
    e1 = torch.randn((N, D), generator=gen, dtype=dtype).double()
    e2 = torch.randn((N, D), generator=gen, dtype=dtype).double()
    m1, lv1, m2, lv2 = leaves = [x.detach().double().requires_grad_(True) for x in xs]
    z1, z2 = m1 + (lv1 / 2).exp() * e1, m2 + (lv2 / 2).exp() * e2
    S = (z1 @ A.double()) @ z2.T  # S[i, j] = T(z1[i], z2[j])
    pos = S.diagonal()
    neg = (
        S[~torch.eye(N, dtype=torch.bool)]
        if negatives == "all"
        else S[torch.arange(N), (torch.arange(N) - 1) % N]
    )
    mi = -F.softplus(-pos).mean() - F.softplus(neg).mean()
    skl = skl_ref(m1, lv1, m2, lv2).mean()
    want = -mi + beta * skl
    scale = float(max(1.0, S.detach().abs().max(), skl.detach()))
    # the SKL and the JSD bound are documented fp32 results, also for fp64 inputs
    close(loss, want, torch.float32, scale=scale)
    close(met["mi"], mi, torch.float32, scale=scale)
    close(met["skl"], skl, torch.float32, scale=scale)
    loss.backward()
    for x, gw in zip(xs, torch.autograd.grad(want, leaves)):
        close(x.grad, gw, torch.float32, scale=scale * 10)


# ---- preference losses -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(
    data=st.data(),
    loss_type=st.sampled_from(ops.DPO_LOSS_TYPES),
    beta=st.floats(0.01, 5),
    eps=st.floats(0, 0.49),
)
def test_dpo_loss(dtype, data, loss_type, beta, eps):
    B = data.draw(st.integers(0, 9))
    xs = [t(data.draw(mats((B,), -300, 0)), dtype, grad=True) for _ in range(4)]
    eps = eps if loss_type in ("sigmoid", "robust") else 0.0
    losses, rc, rr = ops.dpo_loss(*xs, beta=beta, loss_type=loss_type, label_smoothing=eps)
    pc, pr, qc, qr = leaves = [x.detach().double().requires_grad_(True) for x in xs]
    d = (pc - qc) - (pr - qr)
    z = beta * d
    if loss_type == "sigmoid":
        want = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        want = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        want = torch.relu(1 - z)
    else:
        want = (d - 1 / (2 * beta)) ** 2
    assert losses.dtype == rc.dtype == rr.dtype == dtype and not rc.requires_grad
    scale = max(1.0, amax(want))
    close(losses, want, dtype, scale=scale * 100)
    close(rc, beta * (pc - qc), dtype, scale=300 * beta)
    close(rr, beta * (pr - qr), dtype, scale=300 * beta)
    g = torch.randn(B, dtype=torch.float64)
    losses.backward(g.to(dtype))
    for x, gw in zip(xs, torch.autograd.grad((want * g).sum(), leaves)):
        close(x.grad, gw, dtype, scale=scale * 100)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), beta=st.floats(0.01, 10), ratio=st.floats(0, 2), eps=st.floats(0, 0.49))
def test_simpo_loss(dtype, data, beta, ratio, eps):
    B = data.draw(st.integers(0, 9))
    xs = [t(data.draw(mats((B,), -30, 0)), dtype, grad=True) for _ in range(2)]
    losses, rc, rr = ops.simpo_loss(*xs, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    c, r = leaves = [x.detach().double().requires_grad_(True) for x in xs]
    z = beta * ((c - r) - ratio)
    want = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    scale = max(1.0, amax(want))
    close(losses, want, dtype, scale=scale * 10)
    close(rc, beta * c, dtype, scale=30 * beta)
    close(rr, beta * r, dtype, scale=30 * beta)
    losses.sum().backward()
    for x, gw in zip(xs, torch.autograd.grad(want.sum(), leaves)):
        close(x.grad, gw, dtype, scale=scale * 10)


# ---- outcome advantage estimators ------------------------------------------------------------------


def _groups(s, ids):
    """Per row: the scores of its group (fp64 list)."""
    return [[s[j] for j in range(len(s)) if ids[j] == ids[i]] for i in range(len(s))]


def _whiten_ref(x, m):
    md = m.double()
    n = md.sum()
    mean = (x * md).sum() / (n + 1e-8)
    var = (((x - mean) ** 2) * md).sum() / (n + 1e-8) * n / (n - 1)
    return (x - mean) / torch.sqrt(var + 1e-8) * md


@st.composite
def outcome_case(draw, dtype):
    B, T = draw(bt(7, 6))
    s = draw(mats((B,), -10, 10))
    ids = torch.from_numpy(draw(arrays(np.int64, (B,), elements=st.integers(0, 3))))
    return t(s, dtype), draw(masks((B, T))), ids


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), norm=st.booleans())
def test_grpo_and_rloo(dtype, data, norm):
    s, m, ids = data.draw(outcome_case(dtype))
    sd, md = s.double().tolist(), m.double()
    want_g, want_r = [], []
    for i, grp in enumerate(_groups(sd, ids.tolist())):
        n = len(grp)
        if n == 1:
            want_g.append(sd[i] / (1 + 1e-6) if norm else sd[i])
            want_r.append(sd[i])
            continue
        mu = sum(grp) / n
        std = math.sqrt(sum((x - mu) ** 2 for x in grp) / (n - 1))
        want_g.append((sd[i] - mu) / (std + 1e-6) if norm else sd[i] - mu)
        want_r.append(sd[i] - (sum(grp) - sd[i]) / (n - 1))
    got_g = ops.grpo_advantages(s, m, ids, norm_by_std=norm)
    # std + 1e-6 can be ~1e-6 for near-equal scores: the fp32 error scales with 1 / (std + eps)
    close(got_g, torch.tensor(want_g, dtype=torch.float64)[:, None] * md, dtype, scale=1e3)
    close(
        ops.rloo_advantages(s, m, ids),
        torch.tensor(want_r, dtype=torch.float64)[:, None] * md,
        dtype,
        scale=10,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data())
def test_reinforce_pp_baseline(dtype, data):
    s, m, ids = data.draw(outcome_case(dtype))
    sd = s.double().tolist()
    c = torch.tensor(
        [sd[i] - (sum(g) / len(g) if len(g) > 1 else 0.0) for i, g in enumerate(_groups(sd, ids.tolist()))]
    )
    if m.sum() < 2:
        with pytest.raises(ValueError):
            ops.reinforce_pp_baseline_advantages(s, m, ids)
        return
    want = _whiten_ref(c[:, None] * m.double(), m)
    got = ops.reinforce_pp_baseline_advantages(s, m, ids)
    close(got, want, dtype, scale=1e4)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(data=st.data(), gamma=st.sampled_from([1.0, 0.0]) | st.floats(0, 1))
def test_reinforce_pp_and_remax(dtype, data, gamma):
    B, T = data.draw(bt(5, 9))
    r = t(data.draw(mats((B, T))), dtype)
    base = t(data.draw(mats((B,))), dtype)
    m = data.draw(masks((B, T)))
    rd, md = r.double(), m.double()
    G = torch.zeros(B, T, dtype=torch.float64)
    S = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        g = acc = 0.0
        for i in reversed(range(T)):
            if m[b, i]:
                g = rd[b, i].item() + gamma * g
                acc += rd[b, i].item()
            G[b, i] = g * md[b, i]
            S[b, i] = acc * md[b, i]
    adv, ret = ops.remax_advantages(r, base, m)
    close(ret * md, S, dtype, scale=100)
    close(adv * md, S - base.double()[:, None] * md, dtype, scale=100)
    if m.sum() < 2:
        with pytest.raises(ValueError):
            ops.reinforce_pp_advantages(r, m, gamma)
        return
    adv, ret = ops.reinforce_pp_advantages(r, m, gamma)
    close(ret, G, torch.float32, scale=100)
    close(adv, _whiten_ref(G, m), torch.float32, scale=1e4)
