"""rlp_engine.compat.openrlhf against the installed OpenRLHF 0.11.2's own functions
(openrlhf.models.utils and the experience maker's GAE, loaded by test_compat_peers.openrlhf_modules):
signatures, values, gradients, dtypes and exceptions on fresh random inputs."""

import inspect

import pytest
import torch
from test_compat_peers import DTYPES, LOWP, check_like_peer, masks, openrlhf_modules, params, seeded, to64

from rlp_engine.compat import openrlhf as ours

_ = seeded


@pytest.fixture(scope="module")
def orl():
    utils, maker = openrlhf_modules()
    gae = maker.RemoteExperienceMaker.get_advantages_and_returns
    return {
        "compute_approx_kl": utils.compute_approx_kl,
        "log_probs_from_logits": utils.log_probs_from_logits,
        # @torch.compile'd in OpenRLHF: the eager function it wraps (same signature, no compile here).
        "compute_entropy": inspect.unwrap(utils.compute_entropy),
        "masked_mean": utils.masked_mean,
        "get_advantages_and_returns": lambda *a, **k: gae(None, *a, **k),
        "_gae_method": gae,
        "KL_IS_WEIGHT_CLIP": utils.KL_IS_WEIGHT_CLIP,
    }


@pytest.mark.parametrize(
    "name", ["compute_approx_kl", "log_probs_from_logits", "compute_entropy", "masked_mean"]
)
def test_signatures(orl, name):
    assert params(getattr(ours, name)) == params(orl[name])


def test_gae_signature_is_the_method_without_self(orl):
    assert params(ours.get_advantages_and_returns) == params(orl["_gae_method"], drop_self=True)
    assert orl["KL_IS_WEIGHT_CLIP"] == ours.KL_IS_WEIGHT_CLIP


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unbiased", ["off", "on-policy", "off-policy"])
def test_compute_approx_kl(orl, estimator, dtype, unbiased):
    lp = (torch.randn(4, 9) * 4).to(dtype)
    base = (torch.randn(4, 9) * 4).to(dtype)
    old = (lp.double() + 0.5 * torch.randn(4, 9)).to(dtype) if unbiased == "off-policy" else None
    kw = {"kl_estimator": estimator, "unbiased_gradient": unbiased != "off"}
    results = []
    for fn in (ours.compute_approx_kl, orl["compute_approx_kl"]):
        x, b = lp.clone().requires_grad_(True), base.clone().requires_grad_(True)
        out = fn(x, b, old, **kw)
        results.append((out, *torch.autograd.grad((out * torch.linspace(-1, 2, 9)).sum(), (x, b))))
    # Both compute in fp32 (OpenRLHF calls .float() first): same values, fp32 out.
    for got, want in zip(*results):
        check_like_peer(got, want, rtol=1.3e-6, atol=1e-7)
    with pytest.raises(ValueError, match="Unknown kl_estimator: k4"):
        ours.compute_approx_kl(lp, base, kl_estimator="k4")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_from_logits(orl, dtype, temperature):
    lowp = dtype if dtype in LOWP else None
    logits = (torch.randn(3, 6, 29) * 3).to(dtype)
    labels = torch.randint(0, 29, (3, 6))
    before = logits.clone()
    results = []
    for fn, z in (
        (ours.log_probs_from_logits, logits),
        *((orl["log_probs_from_logits"], z) for z in (logits, *to64(logits))),
    ):
        leaf = z.clone().requires_grad_(True)
        # OpenRLHF divides its argument in place: give it a non-leaf copy, as its callers do.
        out = fn(leaf.clone() if fn is not ours.log_probs_from_logits else leaf, labels, temperature)
        results.append((out, torch.autograd.grad((out * torch.linspace(-1, 1, 6)).sum(), leaf)[0]))
    (got, gg), (want, wg), (want64, wg64) = results
    check_like_peer(got, want, want64, lowp, rtol=1e-5, atol=2e-5)  # the fused kernel runs in fp32
    check_like_peer(gg, wg, wg64, lowp, rtol=1e-5, atol=2e-5)
    assert torch.equal(logits, before)  # ours never divides in place


def test_log_probs_bad_labels_raise_like_gather(orl):
    logits = torch.randn(2, 5, 11)
    for labels in (torch.full((2, 5), 11), torch.full((2, 5), -100)):
        for fn in (ours.log_probs_from_logits, orl["log_probs_from_logits"]):
            with pytest.raises(RuntimeError):
                fn(logits.clone(), labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compute_entropy(orl, dtype):
    lowp = dtype if dtype in LOWP else None
    logits = (torch.randn(2, 7, 33) * 3).to(dtype)
    results = []
    for fn, z in (
        (ours.compute_entropy, logits),
        (orl["compute_entropy"], logits),
        (orl["compute_entropy"], *to64(logits)),
    ):
        x = z.clone().requires_grad_(True)
        out = fn(x)
        results.append((out, torch.autograd.grad((out * torch.linspace(-1, 1, 7)).sum(), x)[0]))
    (got, gg), (want, wg), (want64, wg64) = results
    check_like_peer(got, want, want64, lowp, rtol=1e-5, atol=2e-5)
    check_like_peer(gg, wg, wg64, lowp, rtol=1e-5, atol=2e-5)


def test_masked_mean(orl):
    x = torch.randn(4, 9)
    for mask in masks(4, 9):
        for dim in (None, 0, 1):
            torch.testing.assert_close(
                ours.masked_mean(x, mask, dim), orl["masked_mean"](x, mask, dim), equal_nan=True
            )
    torch.testing.assert_close(ours.masked_mean(x, None, 1), orl["masked_mean"](x, None, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae(orl, dtype):
    lowp = dtype if dtype in LOWP else None
    for mask in (*masks(5, 12, (torch.float32, torch.int64, torch.bool, dtype)), None):
        v, r = (torch.randn(5, 12).to(dtype) for _ in range(2))
        got = ours.get_advantages_and_returns(v, r, mask, 0.95, 0.9)
        want = orl["get_advantages_and_returns"](v, r, mask, 0.95, 0.9)
        want64 = orl["get_advantages_and_returns"](*to64(v, r), mask, 0.95, 0.9)
        for o, w, w64 in zip(got, want, want64):
            assert not o.requires_grad
            check_like_peer(o, w, w64, lowp, rtol=1e-5, atol=1e-5)  # the fused GAE runs in fp32
