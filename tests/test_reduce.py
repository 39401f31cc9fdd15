"""Masked reductions and loss aggregation against hand-written float64 formulas (verl's
torch_functional.masked_* and core_algos.agg_loss)."""

import pytest
import torch

from rlp_engine.ops import (
    AGG_MODES,
    agg_loss,
    agg_weights,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def make(B=5, T=13, empty_row=True):
    x = torch.randn(B, T, dtype=torch.float64) * 2 + 0.5
    mask = torch.rand(B, T) < 0.6
    mask[0, :3] = True  # at least a few valid tokens
    if empty_row:
        mask[B // 2] = False
    return x, mask


def poison(x, mask):
    """x with NaN / inf at every masked-out position."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    return torch.where(mask, x, bad[torch.randint(0, 3, x.shape)])


def verl_agg(L, m, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """verl's agg_loss in float64 on a clean loss matrix (plus token-sum = sum(L * m))."""
    L, m = L.double(), m.double()
    if mode == "token-sum":
        return (L * m).sum()
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return (L * m).sum() / n * dp_size
    if mode == "seq-mean-token-sum-norm":
        scale = m.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return (L * m).sum() / scale
    count = m.sum(-1)
    seq = (L * m).sum(-1) if mode == "seq-mean-token-sum" else (L * m).sum(-1) / (count + 1e-8)
    seq_mask = (count > 0).double()
    gbs = seq_mask.sum() if global_batch_size is None else global_batch_size
    return (seq * seq_mask).sum() / gbs * dp_size


def test_masked_sum_and_mean():
    x, m = make()
    xm = x * m
    torch.testing.assert_close(masked_sum(x, m), xm.sum())
    torch.testing.assert_close(masked_sum(x, m, dim=-1), xm.sum(-1))
    torch.testing.assert_close(masked_mean(x, m), xm.sum() / (m.sum() + 1e-8))
    row_mean = masked_mean(x, m, dim=1)
    torch.testing.assert_close(row_mean, xm.sum(1) / (m.sum(1) + 1e-8))
    assert row_mean[2] == 0  # the empty row: 0, not NaN


def test_masked_var():
    x, m = make()
    vals = x[m]
    torch.testing.assert_close(masked_var(x, m), vals.var(unbiased=True))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), vals.var(unbiased=False))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    x, m = make()
    vals = x[m]
    mean, var = vals.mean(), vals.var(unbiased=True)
    want = (x - mean) / torch.sqrt(var + 1e-8) + (0 if shift_mean else mean)
    got = masked_whiten(x, m, shift_mean=shift_mean)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got[m], want[m], rtol=1e-6, atol=1e-6)  # statistics in fp32
    whitened = got[m].double()
    if shift_mean:
        torch.testing.assert_close(whitened.mean(), torch.zeros((), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(whitened.std(), torch.ones((), dtype=torch.float64), atol=1e-5, rtol=0)


def test_masked_whiten_bf16():
    x, m = make()
    got = masked_whiten(x.bfloat16(), m)
    assert got.dtype == torch.bfloat16
    xb = x.bfloat16().double()
    vals = xb[m]
    want = (xb - vals.mean()) / torch.sqrt(vals.var() + 1e-8)
    torch.testing.assert_close(got[m].double(), want[m], rtol=1e-2, atol=1e-2)


def test_nan_outside_mask_does_not_leak():
    x, m = make()
    xp = poison(x, m)
    torch.testing.assert_close(masked_sum(xp, m), masked_sum(x, m))
    torch.testing.assert_close(masked_mean(xp, m, dim=-1), masked_mean(x, m, dim=-1))
    torch.testing.assert_close(masked_var(xp, m), masked_var(x, m))
    torch.testing.assert_close(masked_whiten(xp, m)[m], masked_whiten(x, m)[m])
    for mode in AGG_MODES:
        torch.testing.assert_close(agg_loss(xp, m, mode), agg_loss(x, m, mode))


@pytest.mark.parametrize("n_valid", [0, 1])
def test_fewer_than_two_tokens_raise(n_valid):
    x, _ = make()
    m = torch.zeros(x.shape, dtype=torch.bool)
    m[0, :n_valid] = True
    with pytest.raises(ValueError, match="masked_var: the mask selects"):
        masked_var(x, m)
    with pytest.raises(ValueError, match="at least 2 are needed"):
        masked_whiten(x, m)


def test_masked_var_biased_single_token():
    x, _ = make()
    m = torch.zeros(x.shape, dtype=torch.bool)
    m[1, 4] = True
    # mean = x / (1 + 1e-8), so the biased variance is (1e-8 x)^2, not exactly 0
    assert masked_var(x, m, unbiased=False) < 1e-14
    assert masked_var(x, m, unbiased=False).dtype == torch.float64


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(dp_size=4),
        dict(dp_size=2, batch_num_tokens=100, global_batch_size=16),
        dict(loss_scale_factor=7.5),
        dict(dp_size=3, batch_num_tokens=torch.tensor(57.0), global_batch_size=torch.tensor(9.0)),
    ],
)
def test_agg_loss_matches_verl(mode, kwargs):
    L, m = make()
    want = verl_agg(L, m, mode, **kwargs)
    torch.testing.assert_close(agg_loss(L.float(), m, mode, **kwargs).double(), want, rtol=1e-5, atol=1e-6)
    w = agg_weights(m, mode, **kwargs)
    assert w.dtype == torch.float32 and w.shape == L.shape
    assert torch.all(w[~m] == 0)
    torch.testing.assert_close((w.double() * L).sum(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_fractional_and_float_masks(mode):
    L, m = make()
    frac = torch.rand(m.shape, dtype=torch.float64) * m
    torch.testing.assert_close(
        agg_loss(L, frac, mode).double(), verl_agg(L, frac, mode), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(agg_loss(L, m.int(), mode), agg_loss(L, m, mode))


def test_agg_loss_empty_batch_is_zero():
    # Our defaults clamp the token / sequence counts at 1 (verl would divide 0 by 0).
    L, _ = make()
    m = torch.zeros(L.shape, dtype=torch.bool)
    for mode in AGG_MODES:
        assert agg_loss(L, m, mode) == 0


def test_agg_loss_gradient():
    L, m = make()
    L = L.float().requires_grad_(True)
    agg_loss(L, m, "seq-mean-token-mean", dp_size=2).backward()
    torch.testing.assert_close(L.grad, agg_weights(m, "seq-mean-token-mean", dp_size=2))


def test_bad_arguments():
    x, m = make()
    with pytest.raises(ValueError, match="agg_loss: unknown mode"):
        agg_loss(x, m, "seq-sum")
    with pytest.raises(ValueError, match="agg_loss: mask has shape"):
        agg_loss(x, m[:, :4], "token-mean")
    with pytest.raises(ValueError, match="agg_loss: loss_mat must have 2 dims"):
        agg_loss(x[0], m[0], "token-mean")
    with pytest.raises(ValueError, match="agg_loss: mask must be"):
        agg_weights(m[0], "token-mean")
    with pytest.raises(TypeError, match="masked_sum: x must be a floating"):
        masked_sum(m.long(), m)
    with pytest.raises(ValueError, match="masked_whiten: mask has shape"):
        masked_whiten(x, m[:1])
    with pytest.raises(TypeError, match="masked_mean: mask must be a torch.Tensor"):
        masked_mean(x, m.tolist())
    with pytest.raises(TypeError, match="agg_loss: mask must be a torch.Tensor"):
        agg_weights(m.tolist(), "token-mean")
