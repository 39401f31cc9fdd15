"""rlp_engine.compat.trl against the installed TRL 1.12's own functions (trl.trainer.utils and the
PPO trainer's masked statistics, loaded by test_compat_peers.trl_modules): signatures, values,
gradients, dtypes, shapes and exceptions on fresh random inputs in fp64, fp32, fp16 and bf16."""

import pytest
import torch
from test_compat_peers import DTYPES, LOWP, check_like_peer, masks, params, seeded, to64, trl_modules

from rlp_engine.compat import trl as ours

_ = seeded


@pytest.fixture(scope="module")
def trl():
    utils, ppo = trl_modules()
    return {
        "selective_log_softmax": utils.selective_log_softmax,
        "entropy_from_logits": utils.entropy_from_logits,
        "masked_mean": ppo.masked_mean,
        "masked_var": ppo.masked_var,
        "masked_whiten": ppo.masked_whiten,
    }


@pytest.mark.parametrize(
    "name", ["selective_log_softmax", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten"]
)
def test_signatures(trl, name):
    assert params(getattr(ours, name)) == params(trl[name])


def _compare(ours_fn, theirs_fn, logits, *args, weights=None):
    """(ours, TRL, TRL on fp64 logits) outputs and their gradients wrt the logits."""
    results = []
    for fn, z in ((ours_fn, logits), (theirs_fn, logits), (theirs_fn, *to64(logits))):
        x = z.clone().requires_grad_(True)
        out = fn(x, *args)
        w = torch.linspace(-1, 2, out.shape[-1]) if weights is None else weights
        results.append((out, torch.autograd.grad((out * w).sum(), x)[0]))
    return results


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_shape", ["(...)", "(..., 1)", "(..., 3)"])
def test_selective_log_softmax(trl, dtype, index_shape):
    lowp = dtype if dtype in LOWP else None
    logits = (torch.randn(3, 5, 41) * 4).to(dtype)
    before = logits.clone()
    k = {"(...)": None, "(..., 1)": 1, "(..., 3)": 3}[index_shape]
    index = torch.randint(0, 41, (3, 5) if k is None else (3, 5, k))
    (got, gg), (want, wg), (want64, wg64) = _compare(
        ours.selective_log_softmax, trl["selective_log_softmax"], logits, index
    )
    assert got.shape == index.shape
    check_like_peer(got, want, want64, lowp, rtol=1e-5, atol=2e-5)  # the fused kernel runs in fp32
    check_like_peer(gg, wg, wg64, lowp, rtol=1e-5, atol=2e-5)
    assert torch.equal(logits, before)


def test_selective_log_softmax_bad_index_raises_like_trl(trl):
    logits = torch.randn(2, 5, 11)
    bad = [torch.full((2, 5), 11), torch.full((2, 5, 2), -1), torch.randint(0, 11, (2,))]
    for index in bad:
        for fn in (ours.selective_log_softmax, trl["selective_log_softmax"]):
            with pytest.raises(RuntimeError):
                fn(logits, index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 4, 128])
def test_entropy_from_logits(trl, dtype, chunk_size):
    lowp = dtype if dtype in LOWP else None
    logits = (torch.randn(2, 9, 37) * 3).to(dtype)
    (got, gg), (want, wg), (want64, wg64) = _compare(
        ours.entropy_from_logits, trl["entropy_from_logits"], logits, chunk_size
    )
    check_like_peer(got, want, want64, lowp, rtol=1e-5, atol=2e-5)
    check_like_peer(gg, wg, wg64, lowp, rtol=1e-5, atol=2e-5)
    for fn in (ours.entropy_from_logits, trl["entropy_from_logits"]):  # a single distribution [V]
        assert fn(logits[0, 0].float(), chunk_size).shape == ()
    for bad in (0, -1):
        for fn in (ours.entropy_from_logits, trl["entropy_from_logits"]):
            with pytest.raises(RuntimeError):
                fn(logits, bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_statistics(trl, dtype):
    lowp = dtype if dtype in LOWP else None
    for mask in masks(5, 11, (torch.float32, torch.bool, torch.int64, dtype)):
        x = (torch.randn(5, 11) * 2 + 1).to(dtype)
        (x64,) = to64(x)
        cases = [
            ("masked_mean", (), {}),
            ("masked_mean", (), {"axis": 0}),
            ("masked_var", (), {}),
            ("masked_var", (False,), {}),
            ("masked_whiten", (), {}),
            ("masked_whiten", (False,), {}),
        ]
        for name, args, kw in cases:
            got = getattr(ours, name)(x, mask, *args, **kw)
            want = trl[name](x, mask, *args, **kw)
            check_like_peer(got, want, trl[name](x64, mask, *args, **kw), lowp, rtol=1e-6, atol=1e-6)
        got, want = ours.masked_mean(x, mask, axis=1), trl["masked_mean"](x, mask, axis=1)
        assert got.dtype == want.dtype and torch.equal(got.isnan(), want.isnan())  # the empty row: 0 / 0


def test_masked_var_errors(trl):
    x = torch.randn(5, 11)
    for fn in (ours.masked_var, trl["masked_var"], ours.masked_whiten, trl["masked_whiten"]):
        with pytest.raises(ValueError, match="The sum of the mask is zero"):
            fn(x, torch.zeros(5, 11))
    one = torch.zeros(5, 11)
    one[3, 4] = 1
    torch.testing.assert_close(ours.masked_var(x, one), trl["masked_var"](x, one), equal_nan=True)
