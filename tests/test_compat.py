"""The drop-in modules against eager float64 computations written from verl 0.9.1's / TRL's /
OpenRLHF's math (their code is not imported here: tests/test_compat_{verl,trl,openrlhf}.py compare
with the installed packages themselves), on fresh random inputs with masked holes."""

from types import SimpleNamespace

import pytest
import torch

from rlp_engine.compat import openrlhf as orl
from rlp_engine.compat import trl, verl


def _batch(B=5, T=23, dtype=torch.float32):
    mask = (torch.rand(B, T) > 0.25).float()
    mask[1] = 0.0  # an empty row
    mask[2, :3] = 1.0
    lp = torch.randn(B, T, dtype=dtype) * 0.5 - 1.0
    old = lp + torch.randn(B, T, dtype=dtype) * 0.3
    adv = torch.randn(B, T, dtype=dtype)
    return lp, old, adv, mask


def _agg64(L, m, mode, dp_size=1, n_tokens=None, n_seqs=None, scale=None):
    """verl 0.9.1's agg_loss: the seq-mean modes divide by the (global) non-empty sequence count,
    seq-mean-token-sum-norm then also by loss_scale_factor (default T); token-sum scales by dp_size."""
    L, m = L.double(), m.double()
    seq_sum = (L * m).sum(-1)
    row = m.sum(-1)
    nonempty = (row > 0).double()
    n_seqs = nonempty.sum() if n_seqs is None else n_seqs
    if mode == "token-mean":
        return (L * m).sum() / (m.sum() if n_tokens is None else n_tokens) * dp_size
    if mode == "token-sum":
        return (L * m).sum() * dp_size
    if mode == "seq-mean-token-sum":
        return (seq_sum * nonempty).sum() / n_seqs * dp_size
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / (row + 1e-8)
        return (per_seq * nonempty).sum() / n_seqs * dp_size
    return (seq_sum * nonempty).sum() / n_seqs * dp_size / (m.shape[-1] if scale is None else scale)


def _policy64(lp, old, adv, m, clip_low, clip_high, c, mode):
    lp, old, adv = lp.double(), old.double(), adv.double()
    nk = (lp - old).clamp(-20, 20)
    rho = nk.exp()
    l1 = -adv * rho
    l2 = -adv * rho.clamp(1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * c
    L = torch.where(adv < 0, torch.minimum(l3, c1), c1)
    mm = lambda x: (x * m).sum() / (m.sum() + 1e-8)  # noqa: E731
    metrics = {
        "actor/pg_clipfrac": mm((l2 > l1).double()).item(),
        "actor/ppo_kl": mm(-nk).item(),
        "actor/pg_clipfrac_lower": mm(((c1 > l3) & (adv < 0)).double()).item(),
    }
    return _agg64(L, m, mode), metrics


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_verl_policy_loss_matches_formula(mode):
    lp, old, adv, mask = _batch()
    lp.requires_grad_(True)
    cfg = SimpleNamespace(
        clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0, global_batch_info={}
    )
    loss, metrics = verl.compute_policy_loss_vanilla(old, lp, adv, mask, loss_agg_mode=mode, config=cfg)
    lp64 = lp.detach().double().requires_grad_(True)
    ref, ref_metrics = _policy64(lp64, old, adv, mask, 0.15, 0.28, 3.0, mode)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, lp)
    (g64,) = torch.autograd.grad(ref, lp64)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)
    assert set(metrics) == set(ref_metrics)
    for k in metrics:
        assert isinstance(metrics[k], float)
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6)


def test_verl_policy_loss_global_batch_info_and_errors():
    lp, old, adv, mask = _batch()
    info = {"dp_size": 4, "batch_num_tokens": 321, "global_batch_size": 9}
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "global_batch_info": info}
    loss, _ = verl.compute_policy_loss_vanilla(old, lp, adv, mask, config=cfg)
    ref, _ = _policy64(lp, old, adv, mask, 0.2, 0.2, 3.0, "token-mean")
    torch.testing.assert_close(loss.double(), ref * mask.sum() / 321 * 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):
        verl.compute_policy_loss_vanilla(old, lp, adv, mask, config=None)
    with pytest.raises(AssertionError, match="clip_ratio_c"):
        verl.compute_policy_loss_vanilla(old, lp, adv, mask, config={**cfg, "clip_ratio_c": 0.9})


@pytest.mark.parametrize(
    "mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_verl_agg_loss(mode):
    L = torch.randn(6, 11)
    mask = (torch.rand(6, 11) > 0.3).float()
    L[mask == 0] = float("nan")  # never leaks
    scale = 7 if mode.endswith("norm") else None
    got = verl.agg_loss(
        L, mask, mode, dp_size=2, batch_num_tokens=53, global_batch_size=9, loss_scale_factor=scale
    )
    ref = _agg64(torch.nan_to_num(L), mask, mode, dp_size=2, n_tokens=53, n_seqs=9, scale=scale)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        verl.agg_loss(L, mask, "mean")
    if mode != "token-sum":  # verl 0.9.1: the global normaliser is required when dp_size > 1
        with pytest.raises(ValueError, match="is required when dp_size > 1"):
            verl.agg_loss(L, mask, mode, dp_size=2)


def test_verl_value_loss():
    v = torch.randn(4, 9, requires_grad=True)
    old = v.detach() + 0.3 * torch.randn(4, 9)
    ret = torch.randn(4, 9)
    mask = (torch.rand(4, 9) > 0.2).float()
    loss, clipfrac = verl.compute_value_loss(v, ret, old, mask, cliprange_value=0.2)
    v64 = v.detach().double().requires_grad_(True)
    clipped = torch.max(torch.min(v64, old.double() + 0.2), old.double() - 0.2)
    l1, l2 = (v64 - ret.double()) ** 2, (clipped - ret.double()) ** 2
    ref = 0.5 * _agg64(torch.max(l1, l2), mask, "token-mean")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clipfrac.double(), ((l2 > l1).double() * mask).sum() / (mask.sum() + 1e-8))
    torch.testing.assert_close(torch.autograd.grad(loss, v)[0].double(), torch.autograd.grad(ref, v64)[0])


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "abs+"])
def test_verl_kl_penalty(kind):
    lp = torch.randn(3, 8, requires_grad=True)
    ref = torch.randn(3, 8)
    out = verl.kl_penalty(lp, ref, kind)
    r = lp.detach().double() - ref.double()
    base = kind.rstrip("+")
    expected = {
        "kl": r,
        "k1": r,
        "abs": r.abs(),
        "mse": r**2 / 2,
        "k2": r**2 / 2,
        "low_var_kl": ((-r).clamp(-20, 20).exp() - (-r).clamp(-20, 20) - 1).clamp(-10, 10),
        "k3": ((-r).clamp(-20, 20).exp() - (-r).clamp(-20, 20) - 1).clamp(-10, 10),
    }[base]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), lp)
    if kind.endswith("+"):
        torch.testing.assert_close(g.double(), r)  # straight-through: k2's gradient
    with pytest.raises(NotImplementedError):
        verl.kl_penalty(lp, ref, "full")
    with pytest.raises(NotImplementedError):
        verl.kl_penalty_forward(lp, ref, "k9")


def test_verl_names_are_the_ops_names():
    """The drop-in keeps verl's own name lists (it must refuse what verl refuses), and every name in
    them is one the ops accept: the "+" kinds are verl's names plus the suffix, as in the ops."""
    from rlp_engine import ops

    assert set(verl._VERL_KL) < set(ops.KL_KINDS)
    assert {k + "+" for k in verl._VERL_KL} < set(ops.KL_KINDS)
    assert set(verl._NUMERATOR) == set(ops.AGG_MODES)
    assert {mode for mode, _ in verl._NUMERATOR.values()} <= set(ops.AGG_MODES)


def _gae_carry64(r, v, m, gamma, lam):
    r, v, m = r.double(), v.double(), m.double()
    B, T = r.shape
    nv = torch.zeros(B, dtype=torch.float64)
    g = torch.zeros(B, dtype=torch.float64)
    adv = torch.zeros(B, T, dtype=torch.float64)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * nv - v[:, t]
        g_new = delta + gamma * lam * g
        nv = v[:, t] * m[:, t] + (1 - m[:, t]) * nv
        g = g_new * m[:, t] + (1 - m[:, t]) * g
        adv[:, t] = g
    return adv, adv + v


def test_verl_gae_whitened_and_errors():
    r, v = torch.randn(4, 13), torch.randn(4, 13)
    mask = (torch.rand(4, 13) > 0.3).float()
    mask[0, :2] = 1
    adv, ret = verl.compute_gae_advantage_return(r, v, mask, gamma=torch.tensor(0.99), lam=torch.tensor(0.95))
    a64, ret64 = _gae_carry64(r, v, mask, 0.99, 0.95)
    m = mask.double()
    mean = (a64 * m).sum() / (m.sum() + 1e-8)
    var = ((a64 - mean) ** 2 * m).sum() / (m.sum() + 1e-8) * m.sum() / (m.sum() - 1)
    torch.testing.assert_close(adv.double(), (a64 - mean) * torch.rsqrt(var + 1e-8), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, rtol=1e-5, atol=1e-5)
    one = torch.zeros(4, 13)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="sum of the mask is one"):
        verl.compute_gae_advantage_return(r, v, one, 1.0, 1.0)
    with pytest.raises(ValueError, match="At least one element"):
        verl.masked_whiten(r, torch.zeros(4, 13))


def test_verl_logprobs_entropy_do_not_modify_inputs():
    logits = torch.randn(2, 5, 37) * 3
    labels = torch.randint(0, 37, (2, 5))
    before = logits.clone()
    lp = verl.logprobs_from_logits(logits, labels)
    ent = verl.entropy_from_logits(logits)
    l64 = logits.double().log_softmax(-1)
    torch.testing.assert_close(lp.double(), l64.gather(-1, labels[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(l64.exp() * l64).sum(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)


def test_trl_helpers():
    logits = torch.randn(3, 4, 19)
    idx = torch.randint(0, 19, (3, 4))
    l64 = logits.double().log_softmax(-1)
    torch.testing.assert_close(
        trl.selective_log_softmax(logits, idx).double(), l64.gather(-1, idx[..., None])[..., 0]
    )
    torch.testing.assert_close(trl.entropy_from_logits(logits).double(), -(l64.exp() * l64).sum(-1))
    x, m = torch.randn(5, 7), (torch.rand(5, 7) > 0.4).float()
    m[0, :2] = 1
    mean = (x * m).sum() / m.sum()
    var = ((x - mean) ** 2 * m).sum() / m.sum() * m.sum() / (m.sum() - 1)
    torch.testing.assert_close(
        trl.masked_whiten(x, m), (x - mean) * torch.rsqrt(var + 1e-8), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        trl.masked_whiten(x, m, shift_mean=False),
        (x - mean) * torch.rsqrt(var + 1e-8) + mean,
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="sum of the mask is zero"):
        trl.masked_var(x, torch.zeros(5, 7))


def test_openrlhf_helpers():
    lp, base = torch.randn(3, 9) * 4, torch.randn(3, 9) * 4
    r = lp.double() - base.double()
    for est, expected in [("k1", r), ("k2", r**2 / 2), ("k3", (-r).exp() - 1 + r)]:
        torch.testing.assert_close(
            orl.compute_approx_kl(lp, base, kl_estimator=est).double(),
            expected.clamp(-10, 10),
            rtol=1e-5,
            atol=1e-5,
        )
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        orl.compute_approx_kl(lp, base, kl_estimator="k4")
    rew, val = torch.randn(3, 9), torch.randn(3, 9)
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0
    adv, ret = orl.get_advantages_and_returns(val, rew, mask, gamma=0.9, lambd=0.8)
    v, rr = (val * mask).double(), (rew * mask).double()
    g = torch.zeros(3, dtype=torch.float64)
    expected = torch.zeros(3, 9, dtype=torch.float64)
    for t in reversed(range(9)):
        nxt = v[:, t + 1] if t < 8 else 0.0
        g = rr[:, t] + 0.9 * nxt - v[:, t] + 0.9 * 0.8 * g
        expected[:, t] = g
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), expected + v, rtol=1e-5, atol=1e-5)
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    before = logits.clone()
    out = orl.log_probs_from_logits(logits, labels, temperature=0.5)
    l64 = (logits.double() / 0.5).log_softmax(-1)
    torch.testing.assert_close(out.double(), l64.gather(-1, labels[..., None])[..., 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)
