"""Outcome advantage estimators (rlp_engine.ops.advantages) and their verl 0.9.1 drop-ins
(rlp_engine.compat.verl) against the installed verl's own core_algos functions: signatures, values,
dtypes and exceptions on fresh random inputs with groups of size 1, 2 and uneven sizes, masks with
holes and empty rows; hand-worked fp64 cases; argument errors of the ops."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_compat_peers import DTYPES, LOWP, check_like_peer, params, seeded, to64, verl_modules

from rlp_engine import ops
from rlp_engine.compat import verl as ours

_ = seeded
T = 7
# Group sizes 3, 1, 2, 1, 4 (uneven, singletons, a pair): B = 11 rows, shuffled.
SIZES = (3, 1, 2, 1, 4)
GROUP_FNS = [
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
]
ALL_FNS = GROUP_FNS + ["compute_reinforce_plus_plus_outcome_advantage", "compute_remax_outcome_advantage"]


@pytest.fixture(scope="module")
def verl():
    return verl_modules()[0]


def _index(kind):
    """Group keys as verl gets them: a numpy array of uid strings (object dtype, as in
    non_tensor_batch["uid"]), of fixed-width strings, or of ints; rows shuffled."""
    rows = np.concatenate([np.full(n, g) for g, n in enumerate(SIZES)])[torch.randperm(sum(SIZES)).numpy()]
    if kind == "int":
        return rows * 7 + 3
    uids = np.array([f"uid-{g:03d}" for g in rows])
    return uids.astype(object) if kind == "object" else uids


def _mask(dtype):
    """[B, T] with holes, an empty row (1) and a one-token row (4)."""
    m = torch.rand(sum(SIZES), T) > 0.3
    m[1] = False
    m[4] = False
    m[4, 2] = True
    return m.to(dtype)


def _tol(dtype):
    # fp64: verl divides a one-sequence group by fp32(1 + eps) (a fp32 0-d tensor), 5e-8 relative;
    # fp32: a few ulps.
    return {"rtol": 2e-7, "atol": 1e-7} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def _compare(got, want, want64, dtype, tol=None):
    lowp = dtype if dtype in LOWP else None
    assert len(got) == len(want)
    for o, w, w64 in zip(got, want, want64):
        assert not o.requires_grad
        check_like_peer(o, w, w64, lowp, **(tol or _tol(dtype)))


@pytest.mark.parametrize("name", ALL_FNS)
def test_signatures(verl, name):
    assert params(getattr(ours, name)) == params(getattr(verl, name))


@pytest.mark.parametrize("name", GROUP_FNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["object", "str", "int"])
def test_group_estimators_match_verl(verl, name, dtype, kind):
    index = _index(kind)
    for mask in (_mask(torch.float32), _mask(torch.bool), _mask(torch.int64), _mask(dtype)):
        r = (torch.randn(sum(SIZES), T) * 2).to(dtype)
        r[torch.rand(r.shape) < 0.5] = 0  # sparse token rewards; verl sums every position
        kw = {"epsilon": 1e-4} if name != GROUP_FNS[0] else {}
        r0, m0 = r.clone(), mask.clone()
        got = getattr(ours, name)(r, mask, index, **kw)
        want = getattr(verl, name)(r, mask, index, **kw)
        want64 = getattr(verl, name)(*to64(r), mask, index, **kw)
        _compare(got, want, want64, dtype)
        assert got[0] is got[1]  # verl returns the same tensor twice
        assert torch.equal(r, r0) and torch.equal(mask, m0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epsilon", [1e-6, 0.1])
def test_grpo_without_std_and_epsilon(verl, dtype, epsilon):
    index = _index("object")
    mask = _mask(torch.float32)
    r = torch.randn(sum(SIZES), T).to(dtype)
    for norm in (True, False):
        kw = {"epsilon": epsilon, "norm_adv_by_std_in_grpo": norm, "config": None}
        got = ours.compute_grpo_outcome_advantage(r, mask, index, **kw)
        want = verl.compute_grpo_outcome_advantage(r, mask, index, **kw)
        want64 = verl.compute_grpo_outcome_advantage(*to64(r), mask, index, **kw)
        _compare(got, want, want64, dtype)


@pytest.mark.parametrize("name", GROUP_FNS)
def test_all_singletons_all_pairs_and_tensor_index(verl, name):
    B = 8
    mask = _mask(torch.float32)[:B]
    r = torch.randn(B, T, dtype=torch.float64)
    pairs = np.repeat(np.arange(B // 2), 2)[torch.randperm(B).numpy()]
    for index in (np.arange(B), pairs, list(pairs)):
        got = getattr(ours, name)(r, mask, index)
        want = getattr(verl, name)(r, mask, index)
        _compare(got, want, want, torch.float64)
    # A torch.Tensor index: verl's dict keys are then 0-d tensors, hashed by identity, so a second
    # lookup misses: GRPO and REINFORCE++-baseline raise KeyError, RLOO keeps every raw score.
    tensor_index = torch.from_numpy(pairs)
    if name == "compute_rloo_outcome_advantage":
        got = ours.compute_rloo_outcome_advantage(r, mask, tensor_index)
        _compare(got, verl.compute_rloo_outcome_advantage(r, mask, tensor_index), got, torch.float64)
        torch.testing.assert_close(got[0], r.sum(-1, keepdim=True) * mask, rtol=0, atol=0)
    else:
        for fn in (getattr(ours, name), getattr(verl, name)):
            with pytest.raises(KeyError):
                fn(r, mask, tensor_index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_verl(verl, dtype, gamma):
    config = OmegaConf.create({"gamma": gamma})
    for mask in (_mask(torch.float32), _mask(torch.bool), _mask(torch.int64), _mask(dtype)):
        r = torch.randn(sum(SIZES), T).to(dtype)
        got = ours.compute_reinforce_plus_plus_outcome_advantage(r, mask, config=config)
        vmask = mask
        if mask.dtype == torch.bool:  # verl's `1 - mask` raises on bool; the drop-in accepts it
            with pytest.raises(RuntimeError, match="bool"):
                verl.compute_reinforce_plus_plus_outcome_advantage(r, mask, config=config)
            vmask = mask.to(dtype)  # same values, and promote(r, mask) is r's dtype either way
        want = verl.compute_reinforce_plus_plus_outcome_advantage(r, vmask, config=config)
        want64 = verl.compute_reinforce_plus_plus_outcome_advantage(*to64(r), vmask, config=config)
        # The returns run in fp32 in every dtype (the GAE kernels), as in compute_gae_advantage_return.
        _compare(got, want, want64, dtype, tol={"rtol": 1e-5, "atol": 1e-5})


@pytest.mark.parametrize("dtype", DTYPES)
def test_remax_matches_verl(verl, dtype):
    for mask in (_mask(torch.float32), _mask(torch.bool), _mask(torch.int64), _mask(dtype)):
        for bdt in (dtype, torch.float32):
            r = torch.randn(sum(SIZES), T).to(dtype)
            b = torch.randn(sum(SIZES)).to(bdt)
            got = ours.compute_remax_outcome_advantage(r, b, mask)
            want = verl.compute_remax_outcome_advantage(r, b, mask)
            want64 = verl.compute_remax_outcome_advantage(*to64(r, b), mask)
            _compare(got, want, want64, dtype)


@pytest.mark.parametrize(
    "name",
    [
        "compute_reinforce_plus_plus_baseline_outcome_advantage",
        "compute_reinforce_plus_plus_outcome_advantage",
    ],
)
def test_whitened_estimators_raise_like_verl(verl, name):
    r = torch.randn(4, T)
    one = torch.zeros(4, T)
    one[2, 3] = 1
    extra = (
        {"config": OmegaConf.create({"gamma": 1.0})} if "baseline" not in name else {"index": np.arange(4)}
    )
    for fn in (getattr(ours, name), getattr(verl, name)):
        with pytest.raises(ValueError, match="sum of the mask is one"):
            fn(r, one, **extra)
        with pytest.raises(ValueError, match="At least one element"):
            fn(r, torch.zeros(4, T), **extra)
    if "baseline" not in name:
        for fn in (getattr(ours, name), getattr(verl, name)):
            with pytest.raises(AssertionError):
                fn(r, torch.ones(4, T))  # no config


# ---- hand-worked fp64 cases -------------------------------------------------------------------------

M = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float64)


def test_grpo_by_hand():
    s = torch.tensor([1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    index = ["a", "a", "b", "a"]
    # group a = rows 0, 1, 3: scores 1, 3, 2 -> mean 2, unbiased var ((-1)^2 + 1^2 + 0) / 2 = 1, std 1.
    # eps = 0.5: A = (s - 2) / 1.5 -> -2/3, 2/3, 0. Group b = row 2 alone: mean 0, std 1 -> 5 / 1.5.
    got = ops.grpo_advantages(s, M, index, eps=0.5)
    want = torch.tensor(
        [[-2 / 3, -2 / 3, 0], [2 / 3, 0, 0], [10 / 3, 10 / 3, 10 / 3], [0, 0, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Dr.GRPO: s - mean -> -1, 1, 0 in group a; row 2 keeps 5.
    got = ops.grpo_advantages(s, M, index, norm_by_std=False)
    want = torch.tensor([[-1, -1, 0], [1, 0, 0], [5, 5, 5], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rloo_by_hand():
    s = torch.tensor([1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    # group a (rows 0, 1, 3; n = 3): A_i = s_i - mean of the other two: 1 - 2.5 = -1.5, 3 - 1.5 = 1.5,
    # 2 - 2 = 0 (= 3/2 * (s_i - 2)); group b (row 2, alone) keeps its score 5.
    got = ops.rloo_advantages(s, M, torch.tensor([7, 7, 9, 7]))
    want = torch.tensor([[-1.5, -1.5, 0], [1.5, 0, 0], [5, 5, 5], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_baseline_by_hand():
    s = torch.tensor([1.0, 3.0, 5.0, 2.0], dtype=torch.float64)
    # centred: group a -> -1, 1, 0; row 2 alone (baseline 0) -> 5. Per token over the mask (6 tokens):
    # -1, -1 | 1 | 5, 5, 5 -> mean 14/6 = 7/3; squares about the mean: 2 * (10/3)^2 + (4/3)^2 +
    # 3 * (8/3)^2 = (200 + 16 + 192) / 9 = 408/9; unbiased var = 408/45 = 136/15.
    got = ops.reinforce_pp_baseline_advantages(s, M, ["a", "a", "b", "a"])
    c = torch.tensor([[-1, -1, 0], [1, 0, 0], [5, 5, 5], [0, 0, 0]], dtype=torch.float64)
    # (The masked means divide by count + 1e-8, verl's convention: mean = 14 / (6 + 1e-8), and the
    # variance is sum(sq) / (6 + 1e-8) * 6/5.)
    mean = 14 / (6 + 1e-8)
    var = ((c - mean) ** 2 * M).sum() / (6 + 1e-8) * 6 / 5
    torch.testing.assert_close(var, torch.tensor(136 / 15, dtype=torch.float64), rtol=1e-8, atol=0)
    want = (c - mean) / (var + 1e-8) ** 0.5 * M
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_by_hand():
    r = torch.tensor([[1.0, 9.0, 2.0, 4.0], [0.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    # gamma = 0.5, the hole at row 0, t = 1 is skipped (its 9 dropped, the return carried through):
    # row 0: G3 = 4, G2 = 2 + 0.5 * 4 = 4, G1 = 0 (hole), G0 = 1 + 0.5 * 4 = 3; row 1: G1 = 3, G0 = 1.5.
    adv, ret = ops.reinforce_pp_advantages(r, m, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 0, 4, 4], [1.5, 3, 0, 0]], dtype=torch.float64))
    # whitened over the 5 tokens 3, 4, 4, 1.5, 3: mean 15.5/5 = 3.1; squares about it: 0.01 + 0.81 +
    # 0.81 + 2.56 + 0.01 = 4.2; unbiased var = 4.2/4 = 1.05.
    want = (ret - 3.1) / (1.05 + 1e-8) ** 0.5 * m
    torch.testing.assert_close(adv, want, rtol=1e-6, atol=1e-6)  # the returns run in fp32


def test_remax_by_hand():
    r = torch.tensor([[1.0, 9.0, 2.0, 4.0], [0.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    b = torch.tensor([2.5, 1.0], dtype=torch.float64)
    # returns = reverse cumsum of r * m: row 0 (the 9 masked): 1+2+4 = 7, 6, 6, 4; row 1: 3, 3, 0, 0.
    # advantages = returns - b * m: row 0: 4.5, 6 (hole: no baseline), 3.5, 1.5; row 1: 2, 2, 0, 0.
    adv, ret = ops.remax_advantages(r, b, m)
    torch.testing.assert_close(ret, torch.tensor([[7.0, 6, 6, 4], [3, 3, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(adv, torch.tensor([[4.5, 6, 3.5, 1.5], [2, 2, 0, 0]], dtype=torch.float64))


# ---- ops: grouping, dtypes and argument errors ------------------------------------------------------


def test_ops_group_tensor_index_by_value_and_keep_masked_nan_out():
    s = torch.randn(11)
    idx = _index("int")
    mask = _mask(torch.bool)
    for fn in (ops.grpo_advantages, ops.rloo_advantages, ops.reinforce_pp_baseline_advantages):
        by_value = fn(s, mask, torch.from_numpy(idx))
        assert by_value.dtype == torch.float32 and not by_value.requires_grad
        torch.testing.assert_close(by_value, fn(s, mask, list(idx)), rtol=0, atol=0)
        s_nan = s.clone()
        s_nan[1] = float("nan")  # row 1 is empty; its group (if any) sees the NaN in its mean
        out = fn(s_nan, mask, np.arange(11))
        assert torch.isfinite(out).all()
    adv64 = ops.grpo_advantages(s.double(), mask, idx)
    assert adv64.dtype == torch.float64
    # Targets, as in verl (no_grad): no graph even from inputs that require grad.
    s_grad = s.clone().requires_grad_(True)
    r_grad = torch.randn(11, T, requires_grad=True)
    assert not ops.grpo_advantages(s_grad, mask, idx).requires_grad
    assert not any(t.requires_grad for t in ops.reinforce_pp_advantages(r_grad, mask, gamma=0.9))
    assert not any(t.requires_grad for t in ops.remax_advantages(r_grad, s_grad, mask))
    assert not ours.compute_grpo_outcome_advantage(r_grad, mask, idx)[0].requires_grad


def _scores_case():
    return torch.randn(5), (torch.rand(5, T) > 0.3).float(), ["a", "b", "a", "c", "b"]


@pytest.mark.parametrize(
    "fn", [ops.grpo_advantages, ops.rloo_advantages, ops.reinforce_pp_baseline_advantages]
)
def test_group_ops_errors(fn):
    s, m, idx = _scores_case()
    with pytest.raises(ValueError, match="scores"):
        fn(s[:, None], m, idx)
    with pytest.raises(TypeError, match="scores"):
        fn(torch.arange(5), m, idx)
    with pytest.raises(ValueError, match="mask"):
        fn(s, m[:4], idx)
    with pytest.raises(ValueError, match="mask"):
        fn(s, m[0], idx)
    with pytest.raises(ValueError, match="index has 4 entries"):
        fn(s, m, idx[:4])
    with pytest.raises(ValueError, match="index"):
        fn(s, m, [[1], [2], [1], [3], [2]])  # unhashable keys
    with pytest.raises(ValueError, match="index"):
        fn(s, m, torch.rand(5))  # a float tensor is no group id
    with pytest.raises(ValueError, match="index"):
        fn(s, m, 3)


def test_scalar_argument_errors():
    s, m, idx = _scores_case()
    for eps in (-1e-6, float("nan"), "1e-6", True):
        with pytest.raises(ValueError, match="eps"):
            ops.grpo_advantages(s, m, idx, eps=eps)
    r = torch.randn(5, T)
    for gamma in (1.5, -0.1, None):
        with pytest.raises(ValueError, match="gamma"):
            ops.reinforce_pp_advantages(r, m, gamma=gamma)
    one = torch.zeros(5, T)
    one[3, 4] = 1
    with pytest.raises(ValueError, match="mask selects 1 tokens"):
        ops.reinforce_pp_advantages(r, one, gamma=1.0)
    with pytest.raises(ValueError, match="mask selects 0 tokens"):
        ops.reinforce_pp_baseline_advantages(s, torch.zeros(5, T), idx)
    with pytest.raises(ValueError, match="mask"):
        ops.reinforce_pp_advantages(r, m[:, :3])
    with pytest.raises(ValueError, match="baselines"):
        ops.remax_advantages(r, torch.randn(4), m)
    with pytest.raises(ValueError, match="baselines"):
        ops.remax_advantages(r, torch.randn(5, 1), m)
    with pytest.raises(ValueError, match="token_rewards"):
        ops.remax_advantages(r[0], torch.randn(5), m)
