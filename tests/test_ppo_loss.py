"""ppo_policy_loss / ppo_value_loss on every backend against independent float64 references written as
verl 0.9.1 writes them (compute_policy_loss_vanilla, compute_value_loss, agg_loss): loss, gradient,
metrics; agg modes and their normalisers, dual clip, IS weights, odd shapes, empty rows, NaN under the
mask, low precision, ties, opcheck and error paths."""

import pytest
import torch

from rlp_engine.ops import AGG_MODES, agg_weights, backend, ppo_policy_loss, ppo_value_loss
from rlp_engine.ops.reduce import row_scale


def agg64(L, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's agg_loss in float64 (L already zero outside the mask)."""
    m = mask.double()
    if mode == "token-mean":
        n = m.sum().clamp_min(1) if batch_num_tokens is None else batch_num_tokens
        return (L * m).sum() / n * dp_size
    if mode == "token-sum":
        return (L * m).sum()
    if mode == "seq-mean-token-sum-norm":
        return (L * m).sum() / (L.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    seq = (L * m).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (m.sum(-1) + 1e-8)
    seqs = (m.sum(-1) > 0).sum().clamp_min(1) if global_batch_size is None else global_batch_size
    return seq.sum() / seqs * dp_size


def mmean(x, mask):
    return (x.double() * mask).sum() / (mask.double().sum() + 1e-8)


def verl_policy(
    lp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=None, isw=None, agg="token-mean", **kw
):
    """compute_policy_loss_vanilla in float64 on inputs zeroed outside the mask -> loss, grad, metrics."""
    valid = mask.bool()
    lp = torch.where(valid, lp.double(), 0).detach().requires_grad_()
    old, adv = (torch.where(valid, t.double(), 0) for t in (old, adv))
    nk = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(nk)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(pg1, pg2)
    metrics = {"clipfrac": mmean(torch.gt(pg2, pg1), valid), "approx_kl": mmean(-nk, valid)}
    losses, metrics["clipfrac_lower"] = c1, torch.zeros((), dtype=torch.float64)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        metrics["clipfrac_lower"] = mmean(torch.gt(c1, pg3) * (adv < 0), valid)
        losses = torch.where(adv < 0, torch.min(pg3, c1), c1)
    if isw is not None:
        losses = losses * torch.where(valid, isw.double(), 0)
    loss = agg64(losses, valid, agg, **kw)
    loss.backward()
    return loss.detach(), lp.grad, {k: v.detach() for k, v in metrics.items()}


def verl_value(v, vo, ret, mask, clip=0.2, agg="token-mean", **kw):
    valid = mask.bool()
    v = torch.where(valid, v.double(), 0).detach().requires_grad_()
    vo, ret = (torch.where(valid, t.double(), 0) for t in (vo, ret))
    l1 = (v - ret) ** 2
    if clip is None:
        losses, clipfrac = l1, torch.zeros((), dtype=torch.float64)
    else:
        l2 = (torch.clamp(v, vo - clip, vo + clip) - ret) ** 2
        losses, clipfrac = torch.max(l1, l2), mmean(torch.gt(l2, l1), valid)
    loss = 0.5 * agg64(losses, valid, agg, **kw)
    loss.backward()
    return loss.detach(), v.grad, {"clipfrac": clipfrac}


def make_mask(B, T, empty_row=True):
    mask = torch.rand(B, T) < 0.8  # interior masked-out tokens
    mask[:, 0] = True
    if empty_row and B > 2:
        mask[1] = False
    return mask


def policy_inputs(B, T, dtype=torch.float32, nan=True):
    lp = -3 * torch.rand(B, T)
    old = lp + 0.3 * torch.randn(B, T)  # ratios around 1: some clipped, some not
    old.view(-1)[::7] += 25 * torch.randn(old.numel())[::7]  # |log-ratio| > 20 on some tokens
    adv = torch.randn(B, T)
    isw = torch.rand(B, T) + 0.5
    mask = make_mask(B, T)
    out = [t.to(dtype) for t in (lp, old, adv, isw)]
    if nan:
        for t in out:
            t[~mask] = float("nan")
    return (*out, mask)


def run_policy(backend_name, lp, old, adv, mask, **kw):
    lp = lp.detach().requires_grad_()
    with backend(backend_name):
        loss, metrics = ppo_policy_loss(lp, old, adv, mask, **kw)
    loss.backward()
    return loss, lp.grad, metrics


def assert_policy(backend_name, lp, old, adv, mask, isw=None, tol=1e-5, gtol=1e-5, **kw):
    loss, grad, metrics = run_policy(backend_name, lp, old, adv, mask, is_weights=isw, **kw)
    want, wgrad, wmetrics = verl_policy(lp, old, adv, mask, isw=isw, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), wgrad, rtol=gtol, atol=gtol)
    assert set(metrics) == {"clipfrac", "approx_kl", "clipfrac_lower"}
    for k, v in metrics.items():
        assert v.dim() == 0 and v.dtype == torch.float32, k
        torch.testing.assert_close(v.double(), wmetrics[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dual_clip,use_isw", [(None, False), (3.0, False), (None, True), (2.5, True)])
def test_policy_matches_verl(backend_name, agg, dual_clip, use_isw):
    lp, old, adv, isw, mask = policy_inputs(7, 129)
    assert_policy(
        backend_name,
        lp,
        old,
        adv,
        mask,
        isw if use_isw else None,
        dual_clip=dual_clip,
        agg=agg,
        clip_low=0.2,
        clip_high=0.28,
    )


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (3, 17), (2, 2050)])
def test_policy_shapes(backend_name, shape):
    lp, old, adv, isw, mask = policy_inputs(*shape)
    assert_policy(backend_name, lp, old, adv, mask, isw, dual_clip=3.0, agg="seq-mean-token-mean")


@pytest.mark.parametrize("agg", AGG_MODES)
def test_normalisers(backend_name, agg):
    lp, old, adv, _, mask = policy_inputs(5, 33)
    kw = dict(dp_size=4, batch_num_tokens=100, global_batch_size=9, loss_scale_factor=50)
    assert_policy(backend_name, lp, old, adv, mask, agg=agg, **kw)
    v, vo, ret, mask = value_inputs(5, 33)
    assert_value(backend_name, v, vo, ret, mask, agg=agg, **kw)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_row_scale_gives_verls_agg(agg):
    """row_scale (the normalisers of the PPO losses and of agg_weights alike) against verl's agg_loss
    in float64: sum(mask * s[:, None] * L) over the mask, in fp32 and in fp64."""
    mask = make_mask(6, 10)
    L = torch.randn(6, 10, dtype=torch.float64)
    for kw in (
        {},
        dict(dp_size=2, batch_num_tokens=torch.tensor(77.0), global_batch_size=5, loss_scale_factor=8),
    ):
        want = agg64(L, mask, agg, **kw)
        for dtype in (torch.float32, torch.float64):
            scale, n = row_scale(mask, agg, dtype, **kw)
            assert scale.dtype == dtype and scale.shape == (6,) and n == mask.sum()
            got = (mask.double() * scale.double()[:, None] * L).sum()
            exact = dtype == torch.float64 and not kw  # (the given fp32 batch_num_tokens rounds in fp32)
            torch.testing.assert_close(got, want, rtol=1e-12 if exact else 1e-6, atol=0)
        torch.testing.assert_close((agg_weights(mask, agg, **kw).double() * L).sum(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_low_precision(backend_name, dtype):
    lp, old, adv, isw, mask = policy_inputs(4, 65, dtype)
    loss, grad, _ = run_policy(backend_name, lp, old, adv, mask, is_weights=isw, dual_clip=3.0)
    want, wgrad, _ = verl_policy(lp, old, adv, mask, isw=isw, dual_clip=3.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)  # fp32 math on the rounded inputs
    torch.testing.assert_close(grad.double(), wgrad, rtol=1e-2, atol=1e-4)  # gradient rounded to dtype


def test_policy_float64(backend_name):
    lp, old, adv, isw, mask = policy_inputs(3, 40, torch.float64)
    loss, grad, _ = run_policy(backend_name, lp, old, adv, mask, is_weights=isw, dual_clip=3.0)
    want, wgrad, _ = verl_policy(lp, old, adv, mask, isw=isw, dual_clip=3.0)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    # tolerance allows for the fp32 clip-bound scalars the Triton kernel receives
    torch.testing.assert_close(loss, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad, wgrad, rtol=1e-7, atol=1e-9)


def test_policy_ties_and_boundaries(backend_name):
    # rho == 1 == 1 - clip_low (clamp boundary), A == 0 (pg1 == pg2), |log-ratio| == 20 exactly
    B, T = 3, 16
    lp = -torch.rand(B, T)
    old = lp.clone()
    old[:, 8:] -= 0.5
    lp[0, 1:3] = torch.tensor([-0.5, -0.25])  # log-ratio exactly +20 and -20 in fp32 too
    old[0, 1:3] = torch.tensor([-20.5, 19.75])
    adv = torch.randn(B, T)
    adv[:, ::3] = 0.0
    mask = torch.ones(B, T, dtype=torch.bool)
    assert_policy(backend_name, lp, old, adv, mask, clip_low=0.0, clip_high=0.3, dual_clip=3.0, gtol=1e-6)


def test_gradient_reaches_logprob_only(backend_name):
    lp, old, adv, isw, mask = policy_inputs(3, 9, nan=False)
    old, adv, isw = (t.requires_grad_() for t in (old, adv, isw))
    loss, _, _ = run_policy(backend_name, lp, old, adv, mask, is_weights=isw)
    assert old.grad is None and adv.grad is None and isw.grad is None


def value_inputs(B, T, dtype=torch.float32, nan=True):
    ret = torch.randn(B, T)
    vo = ret + 0.5 * torch.randn(B, T)
    v = vo + 0.3 * torch.randn(B, T)  # |v - v_old| on both sides of the clip
    mask = make_mask(B, T)
    out = [t.to(dtype) for t in (v, vo, ret)]
    if nan:
        for t in out:
            t[~mask] = float("nan")
    return (*out, mask)


def assert_value(backend_name, v, vo, ret, mask, tol=1e-5, **kw):
    vv = v.detach().requires_grad_()
    with backend(backend_name):
        loss, metrics = ppo_value_loss(vv, vo, ret, mask, **kw)
    loss.backward()
    want, wgrad, wmetrics = verl_value(v, vo, ret, mask, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    assert torch.isfinite(vv.grad).all()
    torch.testing.assert_close(vv.grad.double(), wgrad, rtol=tol, atol=tol)
    assert metrics["clipfrac"].dim() == 0 and metrics["clipfrac"].dtype == torch.float32
    torch.testing.assert_close(metrics["clipfrac"].double(), wmetrics["clipfrac"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("clip", [0.2, None])
def test_value_matches_verl(backend_name, agg, clip):
    v, vo, ret, mask = value_inputs(7, 129)
    assert_value(backend_name, v, vo, ret, mask, clip=clip, agg=agg)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (3, 17), (2, 2050)])
def test_value_shapes(backend_name, shape):
    v, vo, ret, mask = value_inputs(*shape)
    assert_value(backend_name, v, vo, ret, mask, clip=0.1, agg="seq-mean-token-sum")


def test_value_ties_low_precision_and_float64(backend_name):
    v, vo, ret, mask = value_inputs(4, 20, nan=False)
    vo[:, :5] = v[:, :5]  # clip = 0: clamp(v, v_old, v_old) == v, both terms tie
    assert_value(backend_name, v, vo, ret, mask, clip=0.0)
    v, vo, ret, mask = value_inputs(4, 33, torch.bfloat16)
    vv = v.detach().requires_grad_()
    with backend(backend_name):
        loss, _ = ppo_value_loss(vv, vo, ret, mask)
    loss.backward()
    want, wgrad, _ = verl_value(v, vo, ret, mask)
    assert loss.dtype == torch.float32 and vv.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vv.grad.double(), wgrad, rtol=1e-2, atol=1e-4)
    v, vo, ret, mask = value_inputs(3, 17, torch.float64)
    assert_value(backend_name, v, vo, ret, mask, tol=1e-9)


def test_opcheck_cpp_ops():
    ops = torch.ops.rlp  # its fake kernels and autograd formulas were registered at import
    lp, old, adv, isw, mask = policy_inputs(3, 11, nan=False)
    scale = torch.rand(3)
    for w, dual in ((None, None), (isw, 3.0)):
        args = (lp.clone().requires_grad_(), old, adv, mask, scale, w, 0.2, 0.28, dual)
        torch.library.opcheck(ops.ppo_policy_loss_fwd, args)
    v, vo, ret, mask = value_inputs(3, 11, nan=False)
    for clip in (0.2, None):
        torch.library.opcheck(
            ops.ppo_value_loss_fwd, (v.clone().requires_grad_(), vo, ret, mask, scale, clip)
        )
    with pytest.raises(RuntimeError, match="mask must be bool or uint8"):
        ops.ppo_value_loss_fwd(v, vo, ret, mask.float(), scale, 0.2)
    with pytest.raises(RuntimeError, match="row_scale must be"):
        ops.ppo_policy_loss_fwd(lp, old, adv, mask, scale[:2], None, 0.2, 0.2, None)


def test_policy_errors_name_the_argument(backend_name):
    lp, old, adv, _, mask = policy_inputs(2, 5, nan=False)
    with backend(backend_name):
        with pytest.raises(ValueError, match="old_logprob has shape"):
            ppo_policy_loss(lp, old[:, :4], adv, mask)
        with pytest.raises(ValueError, match="mask has shape"):
            ppo_policy_loss(lp, old, adv, mask[:1])
        with pytest.raises(TypeError, match="logprob must be a floating-point tensor"):
            ppo_policy_loss(lp.long(), old, adv, mask)
        with pytest.raises(ValueError, match="logprob must have 2 dims"):
            ppo_policy_loss(lp[0], old[0], adv[0], mask[0])
        with pytest.raises(ValueError, match="clip_low must be a number >= 0"):
            ppo_policy_loss(lp, old, adv, mask, clip_low=-0.1)
        with pytest.raises(ValueError, match="dual_clip must be None or a number > 1"):
            ppo_policy_loss(lp, old, adv, mask, dual_clip=1.0)
        with pytest.raises(ValueError, match="unknown agg 'mean'"):
            ppo_policy_loss(lp, old, adv, mask, agg="mean")
        with pytest.raises(ValueError, match="is_weights has shape"):
            ppo_policy_loss(lp, old, adv, mask, is_weights=adv[:1])


def test_value_errors_name_the_argument(backend_name):
    v, vo, ret, mask = value_inputs(2, 5, nan=False)
    with backend(backend_name):
        with pytest.raises(ValueError, match="returns has shape"):
            ppo_value_loss(v, vo, ret.T, mask)
        with pytest.raises(ValueError, match="clip must be a number >= 0"):
            ppo_value_loss(v, vo, ret, mask, clip=-1.0)
        with pytest.raises(TypeError, match="old_values must be a floating-point tensor"):
            ppo_value_loss(v, vo.int(), ret, mask)
        with pytest.raises(ValueError, match="unknown agg"):
            ppo_value_loss(v, vo, ret, mask, agg="token_mean")
