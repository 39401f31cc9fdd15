"""rlp_engine.compat.verl against the installed verl 0.9.1's own functions (core_algos and
torch_functional, loaded by test_compat_peers.verl_modules): signatures, values, gradients, dtypes,
shapes and exceptions on fresh random inputs, over every aggregation mode, KL kind, dtype and mask
dtype, with masks that have holes and empty rows, and with dp_size > 1."""

import pytest
import torch
from omegaconf import OmegaConf
from test_compat_peers import DTYPES, LOWP, check_like_peer, masks, params, seeded, to64, verl_modules

from rlp_engine.compat import verl as ours

_ = seeded
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KINDS = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "abs+", "k2+", "k3+", "low_var_kl+"]
B, T = 6, 13
_ACTOR = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}


@pytest.fixture(scope="module")
def verl():
    core_algos, torch_functional = verl_modules()
    return core_algos, torch_functional


def _norms(dp_size, mode, mask):
    """Global normalisers as verl's workers pass them (ints), chosen so that dp_size matters."""
    if dp_size == 1:
        return {}
    return {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()) * dp_size + 3,
        "global_batch_size": B * dp_size - 1,
        "loss_scale_factor": 17 if mode.endswith("norm") else None,
    }


@pytest.mark.parametrize(
    "name",
    [
        "agg_loss",
        "compute_policy_loss_vanilla",
        "compute_value_loss",
        "kl_penalty",
        "kl_penalty_forward",
        "compute_gae_advantage_return",
        "compute_rewards",
    ],
)
def test_core_algos_signatures(verl, name):
    assert params(getattr(ours, name)) == params(getattr(verl[0], name))


@pytest.mark.parametrize(
    "name",
    [
        "masked_sum",
        "masked_mean",
        "masked_var",
        "masked_whiten",
        "clip_by_value",
        "logprobs_from_logits",
        "entropy_from_logits",
    ],
)
def test_torch_functional_signatures(verl, name):
    assert params(getattr(ours, name)) == params(getattr(verl[1], name))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_agg_loss(verl, mode, dtype):
    lowp = dtype if dtype in LOWP else None
    # An fp16 mask is left out: verl's row count + 1e-8 is 0 in fp16, so its gradient on empty rows is NaN.
    mask_dtypes = (torch.float32, torch.bool, torch.int64) + ((dtype,) if dtype != torch.float16 else ())
    for mask in masks(B, T, mask_dtypes):
        for dp_size in (1, 3):
            kw = _norms(dp_size, mode, mask)
            L = (torch.randn(B, T) * 2).to(dtype).requires_grad_(True)
            got = ours.agg_loss(L, mask, mode, **kw)
            want = verl[0].agg_loss(L, mask, mode, **kw)
            (L64,) = to64(L.detach())
            L64.requires_grad_(True)
            want64 = verl[0].agg_loss(L64, mask, mode, **kw)
            check_like_peer(got, want, want64, lowp, rtol=1e-6 if dtype == torch.float64 else 1e-5)
            (g,), (gw,), (g64,) = (torch.autograd.grad(x, y) for x, y in ((got, L), (want, L), (want64, L64)))
            check_like_peer(g, gw, g64, lowp)


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_empty_batch_and_errors(verl, mode):
    L = torch.randn(B, T)
    empty = torch.zeros(B, T)
    got, want = ours.agg_loss(L, empty, mode), verl[0].agg_loss(L, empty, mode)
    torch.testing.assert_close(got, want, equal_nan=True)  # NaN (0 / 0) except token-sum's 0
    assert got.isnan().item() == (mode != "token-sum")
    if mode != "token-sum":
        with pytest.raises(ValueError) as want_err:
            verl[0].agg_loss(L, masks(B, T)[0], mode, dp_size=2)
        with pytest.raises(ValueError, match=str(want_err.value).replace("(", r"\(").replace(")", r"\)")):
            ours.agg_loss(L, masks(B, T)[0], mode, dp_size=2)
    for fn in (ours.agg_loss, verl[0].agg_loss):
        with pytest.raises(ValueError, match="Invalid loss_agg_mode: mean"):
            fn(L, masks(B, T)[0], "mean")


def _policy_batch(dtype):
    lp = (torch.randn(B, T) * 0.5 - 1.0).to(dtype)
    old = (lp.double() + torch.randn(B, T) * 0.3).to(dtype)
    adv = torch.randn(B, T).to(dtype)
    return lp, old, adv


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_policy_loss(verl, mode, dtype, with_is_weights):
    lowp = dtype if dtype in LOWP else None
    for mask in masks(B, T, (torch.float32, torch.int64)):
        for dp_size in (1, 4):
            lp, old, adv = _policy_batch(dtype)
            isw = torch.rand(B, T).to(dtype) + 0.5 if with_is_weights else None
            fields = {
                "clip_ratio": 0.2,
                "clip_ratio_low": 0.15,
                "clip_ratio_high": None,
                "clip_ratio_c": 2.5,
                "global_batch_info": _norms(dp_size, mode, mask),
            }
            # verl's workers pass an ActorConfig; a DictConfig is accepted as well.
            cfg = OmegaConf.create(fields) if dp_size == 1 else verl[0].ActorConfig(**_ACTOR, **fields)
            results = []
            for fn, (lp_, old_, adv_, isw_) in [
                (ours.compute_policy_loss_vanilla, (lp, old, adv, isw)),
                (verl[0].compute_policy_loss_vanilla, (lp, old, adv, isw)),
                (verl[0].compute_policy_loss_vanilla, to64(lp, old, adv, isw)),
            ]:
                x = lp_.clone().requires_grad_(True)
                loss, metrics = fn(
                    old_, x, adv_, mask, loss_agg_mode=mode, config=cfg, rollout_is_weights=isw_
                )
                results.append((loss, metrics, torch.autograd.grad(loss, x)[0]))
            (got, gm, gg), (want, wm, wg), (want64, wm64, wg64) = results
            check_like_peer(got, want, want64, lowp)
            check_like_peer(gg, wg, wg64, lowp)
            assert set(gm) == set(wm) and all(isinstance(v, float) for v in gm.values())
            for k in gm:  # the metrics come from the fp32 kernel: compare with verl's exact values
                assert gm[k] == pytest.approx(wm64[k] if lowp else wm[k], rel=1e-5, abs=1e-6), k


def test_policy_loss_config_errors(verl):
    lp, old, adv = _policy_batch(torch.float32)
    mask = masks(B, T)[0]
    clip = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None}
    bad_c = OmegaConf.create({**clip, "clip_ratio_c": 0.9, "global_batch_info": {}})
    no_norm = OmegaConf.create({**clip, "global_batch_info": {"dp_size": 2}})
    for fn in (ours.compute_policy_loss_vanilla, verl[0].compute_policy_loss_vanilla):
        with pytest.raises(AssertionError):
            fn(old, lp, adv, mask, config=None)
        with pytest.raises(AssertionError, match="clip_ratio_c"):
            fn(old, lp, adv, mask, config=bad_c)
        with pytest.raises(ValueError, match="batch_num_tokens is required"):
            fn(old, lp, adv, mask, config=no_norm)
        with pytest.raises(ValueError, match="global_batch_size is required"):
            fn(old, lp, adv, mask, loss_agg_mode="seq-mean-token-mean", config=no_norm)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_value_loss(verl, mode, dtype):
    lowp = dtype if dtype in LOWP else None
    for mask in masks(B, T, (torch.float32, torch.bool, torch.float64)):
        for dp_size in (1, 2):
            # A non-dyadic clip range (0.2): at an exact tie v - v_old == c, common on the bf16 grid for
            # c = 0.25, torch.min/max split the gradient in half while the fused kernel takes one side.
            v = torch.randn(B, T).to(dtype)
            old = (v.double() + 0.4 * torch.randn(B, T)).to(dtype)
            ret = torch.randn(B, T).to(dtype)
            kw = dict(loss_agg_mode=mode, **_norms(dp_size, mode, mask))
            results = []
            for fn, (v_, ret_, old_) in [
                (ours.compute_value_loss, (v, ret, old)),
                (verl[0].compute_value_loss, (v, ret, old)),
                (verl[0].compute_value_loss, to64(v, ret, old)),
            ]:
                x = v_.clone().requires_grad_(True)
                loss, clipfrac = fn(x, ret_, old_, mask, 0.2, **kw)
                results.append((loss, clipfrac, torch.autograd.grad(loss, x)[0]))
            (got, gc, gg), (want, wc, wg), (want64, wc64, wg64) = results
            check_like_peer(got, want, want64, lowp)
            check_like_peer(gg, wg, wg64, lowp)
            assert gc.dtype == wc.dtype and gc.shape == wc.shape
            torch.testing.assert_close(gc, (wc64 if lowp else wc).to(wc.dtype))


def test_value_loss_empty_batch_and_errors(verl):
    v, old, ret = torch.randn(3, B, T).unbind(0)
    empty = torch.zeros(B, T)
    for mode in MODES:
        got = ours.compute_value_loss(v, ret, old, empty, 0.2, mode)
        want = verl[0].compute_value_loss(v, ret, old, empty, 0.2, mode)
        torch.testing.assert_close(got, want, equal_nan=True)
    for fn in (ours.compute_value_loss, verl[0].compute_value_loss):
        with pytest.raises(ValueError, match="batch_num_tokens is required"):
            fn(v, ret, old, masks(B, T)[0], 0.2, dp_size=2)
        with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
            fn(v, ret, old, masks(B, T)[0], 0.2, "mean")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_penalty(verl, kind, dtype):
    lowp = dtype if dtype in LOWP else None
    lp = (torch.randn(B, T) * 3).to(dtype)
    ref = (torch.randn(B, T) * 3).to(dtype)
    results = []
    for fn, (lp_, ref_) in [
        (ours.kl_penalty, (lp, ref)),
        (verl[0].kl_penalty, (lp, ref)),
        (verl[0].kl_penalty, to64(lp, ref)),
    ]:
        x, r = lp_.clone().requires_grad_(True), ref_.clone().requires_grad_(True)
        out = fn(x, r, kind)
        results.append((out, *torch.autograd.grad((out * torch.linspace(-1, 2, T)).sum(), (x, r))))
    (got, g1, g2), (want, w1, w2), (want64, w1_64, w2_64) = results
    check_like_peer(got, want, want64, lowp)
    check_like_peer(g1, w1, w1_64, lowp)
    check_like_peer(g2, w2, w2_64, lowp)
    if not kind.endswith("+"):
        check_like_peer(
            ours.kl_penalty_forward(lp, ref, kind), verl[0].kl_penalty_forward(lp, ref, kind), want64, lowp
        )


@pytest.mark.parametrize("kind", ["full", "k9", "k1_nonneg", "full+", "+"])
def test_kl_penalty_unknown_kinds_raise(verl, kind):
    lp, ref = torch.randn(2, B, T).unbind(0)
    for fn in (ours.kl_penalty, verl[0].kl_penalty, ours.kl_penalty_forward, verl[0].kl_penalty_forward):
        with pytest.raises(NotImplementedError):
            fn(lp, ref, kind)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gae(verl, dtype):
    lowp = dtype if dtype in LOWP else None
    for mask in masks(B, T, (torch.float32, torch.int64, dtype)):
        r = torch.randn(B, T).to(dtype)
        v = torch.randn(B, T).to(dtype)
        got = ours.compute_gae_advantage_return(r, v, mask, 0.97, 0.9)
        want = verl[0].compute_gae_advantage_return(r, v, mask, 0.97, 0.9)
        want64 = verl[0].compute_gae_advantage_return(*to64(r, v), mask, 0.97, 0.9)
        for o, w, w64 in zip(got, want, want64):
            assert not o.requires_grad
            check_like_peer(o, w, w64, lowp, rtol=1e-5, atol=1e-5)  # the fused GAE runs in fp32


def test_gae_errors(verl):
    r, v = torch.randn(2, B, T).unbind(0)
    one = torch.zeros(B, T)
    one[0, 3] = 1
    for fn in (ours.compute_gae_advantage_return, verl[0].compute_gae_advantage_return):
        with pytest.raises(ValueError, match="sum of the mask is one"):
            fn(r, v, one, 1.0, 1.0)
        with pytest.raises(ValueError, match="At least one element"):
            fn(r, v, torch.zeros(B, T), 1.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_statistics(verl, dtype):
    lowp = dtype if dtype in LOWP else None
    F = verl[1]
    for mask in masks(B, T, (torch.float32, torch.bool, torch.int64, dtype)):
        x = (torch.randn(B, T) * 3 + 1).to(dtype)
        (x64,) = to64(x)
        cases = [
            ("masked_sum", (), {}),
            ("masked_sum", (), {"axis": -1}),
            ("masked_mean", (), {}),
            ("masked_mean", (), {"axis": 1}),
            ("masked_var", (), {}),
            ("masked_var", (False,), {}),
            ("masked_whiten", (), {}),
            ("masked_whiten", (False,), {}),
        ]
        for name, args, kw in cases:
            got = getattr(ours, name)(x, mask, *args, **kw)
            want = getattr(F, name)(x, mask, *args, **kw)
            check_like_peer(got, want, getattr(F, name)(x64, mask, *args, **kw), lowp, rtol=1e-6, atol=1e-6)
    lo = torch.zeros(B, T)
    for fn in (ours.masked_whiten, F.masked_whiten, ours.masked_var, F.masked_var):
        with pytest.raises(ValueError, match="At least one element"):
            fn(x, lo)
        lo[2, 5] = 1
        with pytest.raises(ValueError, match="sum of the mask is one"):
            fn(x, lo)
        lo[2, 5] = 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_and_entropy(verl, dtype):
    lowp = dtype if dtype in LOWP else None
    F = verl[1]
    logits = (torch.randn(3, 7, 37) * 4).to(dtype)
    labels = torch.randint(0, 37, (3, 7))
    before = logits.clone()
    for name, args in [("logprobs_from_logits", (labels,)), ("entropy_from_logits", ())]:
        results = []
        for z in (logits, logits, *to64(logits)):
            x = z.clone().requires_grad_(True)
            fn = getattr(ours if not results else F, name)
            out = fn(x, *args)
            results.append((out, torch.autograd.grad((out * torch.linspace(-1, 1, 7)).sum(), x)[0]))
        (got, gg), (want, wg), (want64, wg64) = results
        check_like_peer(got, want, want64, lowp, rtol=1e-5, atol=2e-5)  # fused kernels run in fp32
        check_like_peer(gg, wg, wg64, lowp, rtol=1e-5, atol=2e-5)
    assert torch.equal(logits, before)


def test_logprobs_bad_labels_raise_like_gather(verl):
    logits = torch.randn(2, 5, 11)
    bad = [torch.full((2, 5), 11), torch.full((2, 5), -100), torch.randint(0, 11, (2, 4))]
    for labels in bad:
        for fn in (ours.logprobs_from_logits, verl[1].logprobs_from_logits):
            with pytest.raises(RuntimeError):
                fn(logits, labels)


def test_compute_rewards_and_clip_by_value(verl):
    s, lp, ref, v = torch.randn(4, B, T).unbind(0)
    torch.testing.assert_close(
        ours.compute_rewards(s, lp, ref, 0.1), verl[0].compute_rewards(s, lp, ref, 0.1)
    )
    torch.testing.assert_close(
        ours.clip_by_value(v, s - 0.1, s + 0.1), verl[1].clip_by_value(v, s - 0.1, s + 0.1)
    )
