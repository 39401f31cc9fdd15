"""compute_gae on every backend against float64 time-loop references (verl's and OpenRLHF's loops,
written out here independently of gae_ref)."""

import pytest
import torch
from conftest import device_for

from rlp_engine.kernels.gae import gae_forward, gae_ref
from rlp_engine.ops import backend, compute_gae
from rlp_engine.ops._backend import select

MODES = ("carry", "zero")
GAMMA_LAM = ((1.0, 1.0), (0.99, 0.95), (0.0, 0.0))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-4)}


def verl_loop(r, values, m, gamma, lam):
    """verl's compute_gae_advantage_return without the whitening (float64, no NaN handling)."""
    nextvalues, lastgaelam = 0, 0
    adv = torch.empty_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        adv[:, t] = lastgaelam
    return adv, adv + values


def openrlhf_loop(r, values, m, gamma, lam):
    """OpenRLHF's get_advantages_and_returns (float64)."""
    values, r = values * m, r * m
    T = r.shape[1]
    lastgaelam, rev = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = r[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    adv = torch.stack(rev[::-1], dim=1)
    return adv, adv + values


LOOPS = {"carry": verl_loop, "zero": openrlhf_loop}


def make_inputs(B, T, device="cpu", dtype=torch.float32, empty_row=False):
    """Random rewards/values (never zero) and a multi-turn-like mask: leading prompt padding, a
    response with holes (tool outputs), trailing padding; optionally one all-masked row."""
    r = torch.randn(B, T, dtype=torch.float64) + 0.5
    v = torch.randn(B, T, dtype=torch.float64) - 0.25
    mask = torch.rand(B, T) < 0.75
    start = torch.randint(0, max(T // 4, 1), (B, 1))
    stop = T - torch.randint(0, max(T // 4, 1), (B, 1))
    t = torch.arange(T)
    mask &= (t >= start) & (t < stop)
    mask[:, 0] |= T == 1  # keep single-token rows meaningful
    if empty_row:
        mask[B // 2] = False
    return r.to(dtype).to(device), v.to(dtype).to(device), mask.to(device)


def reference(r, v, m, gamma, lam, mode):
    return gae_ref(r.double().cpu(), v.double().cpu(), m.cpu(), gamma, lam, mode)


def run(backend_name, *args, **kwargs):
    with backend(backend_name):
        return compute_gae(*args, **kwargs)


def assert_close(got, want, dtype=torch.float32):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype])


def test_gae_ref_is_verl_and_openrlhf_loops():
    r, v, m = make_inputs(5, 37, dtype=torch.float64)
    for mode in MODES:
        for gamma, lam in GAMMA_LAM:
            got = gae_ref(r, v, m, gamma, lam, mode)
            want = LOOPS[mode](r, v, m.double(), gamma, lam)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_hand_worked_example():
    # T = 3, mask [1, 0, 1], gamma = 0.5, lam = 1, r = [1, 2, 3], V = [1, 4, 2].
    # carry: t=2: delta = 3 - 2 = 1, g = 1, nv = 2; t=1 masked: g = 1, nv = 2;
    #        t=0: delta = 1 + 0.5*2 - 1 = 1, g = 1 + 0.5*1 = 1.5.
    # zero: r = [1, 0, 3], V = [1, 0, 2]; t=2: g = 1; t=1: delta = 0 + 0.5*2 - 0 = 1, g = 1 + 0.5 = 1.5;
    #       t=0: delta = 1 + 0 - 1 = 0, g = 0 + 0.5*1.5 = 0.75.
    for name in ("torch", "cpp", "triton"):
        dev = device_for(name)
        r = torch.tensor([[1.0, 2.0, 3.0]], device=dev)
        v = torch.tensor([[1.0, 4.0, 2.0]], device=dev)
        m = torch.tensor([[True, False, True]], device=dev)
        adv, ret = run(name, r, v, m, 0.5, 1.0, "carry")
        torch.testing.assert_close(adv.cpu(), torch.tensor([[1.5, 1.0, 1.0]]))
        torch.testing.assert_close(ret.cpu(), torch.tensor([[2.5, 5.0, 3.0]]))
        adv, ret = run(name, r, v, m, 0.5, 1.0, "zero")
        torch.testing.assert_close(adv.cpu(), torch.tensor([[0.75, 1.5, 1.0]]))
        torch.testing.assert_close(ret.cpu(), torch.tensor([[1.75, 1.5, 3.0]]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gamma_lam", GAMMA_LAM)
def test_matches_reference(backend_name, mode, gamma_lam):
    gamma, lam = gamma_lam
    r, v, m = make_inputs(5, 37, device_for(backend_name), empty_row=True)
    adv, ret = run(backend_name, r, v, m, gamma, lam, mode)
    want_adv, want_ret = reference(r, v, m, gamma, lam, mode)
    assert_close(adv, want_adv)
    assert_close(ret, want_ret)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (1, 9), (3, 70)])
def test_odd_shapes(backend_name, mode, shape):
    r, v, m = make_inputs(*shape, device_for(backend_name))
    got = run(backend_name, r, v, m, 0.99, 0.95, mode)
    for g, w in zip(got, reference(r, v, m, 0.99, 0.95, mode)):
        assert_close(g, w)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_zero_size(backend_name, shape):
    dev = device_for(backend_name)
    r, v = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    adv, ret = run(backend_name, r, v, torch.ones(shape, dtype=torch.bool, device=dev))
    assert adv.shape == ret.shape == shape and adv.dtype == ret.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_long_rows(name, mode):
    r, v, m = make_inputs(3, 1000)
    got = run(name, r, v, m, 1.0, 0.95, mode)
    for g, w in zip(got, reference(r, v, m, 1.0, 0.95, mode)):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("mode", "B", "T", "block_t"), [("carry", 2, 600, 256), ("zero", 2, 300, 32)])
def test_triton_multi_chunk(mode, B, T, block_t):
    # Several chunks per row (the last one partial): the state is carried between chunks.
    r, v, m = make_inputs(B, T, device_for("triton"), empty_row=True)
    got = gae_forward(r, v, m, 1.0, 0.95, mode == "carry", block_t=block_t)
    for g, w in zip(got, reference(r, v, m, 1.0, 0.95, mode)):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_and_holes(backend_name, mode):
    r, v, m = make_inputs(4, 24, device_for(backend_name))
    m[1] = False
    m[2, 5:9] = False  # a hole in the middle of a response (multi-turn)
    m[2, 9:12] = True
    adv, ret = run(backend_name, r, v, m, 0.9, 0.8, mode)
    assert torch.all(adv[1] == 0)
    torch.testing.assert_close(ret[1], v[1] if mode == "carry" else torch.zeros_like(v[1]))
    if mode == "carry":  # the advantage after the hole is carried through it unchanged
        assert torch.all(adv[2, 5:9] == adv[2, 9])
    for g, w in zip((adv, ret), reference(r, v, m, 0.9, 0.8, mode)):
        assert_close(g, w)


@pytest.mark.parametrize("mode", MODES)
def test_nan_outside_mask_does_not_leak(backend_name, mode):
    r, v, m = make_inputs(4, 21, device_for(backend_name))
    clean_r, clean_v = r.masked_fill(~m, 0.0), v.masked_fill(~m, 0.0)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], device=r.device)
    fill = bad[torch.randint(0, 3, r.shape, device=r.device)]
    r_bad, v_bad = torch.where(m, r, fill), torch.where(m, v, fill.flip(0))
    adv, ret = run(backend_name, r_bad, v_bad, m, 0.99, 0.95, mode)
    want_adv, want_ret = reference(clean_r, clean_v, m, 0.99, 0.95, mode)
    assert torch.isfinite(adv).all()  # carried or zeroed, never NaN
    assert_close(adv, want_adv)
    assert_close(ret[m], want_ret[m.cpu()])
    if mode == "zero":
        assert torch.isfinite(ret).all()


@pytest.mark.parametrize("mode", MODES)
def test_mask_dtypes(backend_name, mode):
    r, v, m = make_inputs(3, 17, device_for(backend_name))
    want = run(backend_name, r, v, m, 0.99, 0.95, mode)
    for dt in (torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64, torch.bfloat16):
        got = run(backend_name, r, v, m.to(dt), 0.99, 0.95, mode)
        for g, w in zip(got, want):
            # The C++ loop is compiled per mask type: the contraction into FMAs may differ by an ulp.
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_fractional_mask(backend_name, mode):
    # Weights in [0, 1] follow the same formulas (verl's loop is linear in m).
    r, v, m = make_inputs(3, 19, device_for(backend_name))
    w = torch.rand(m.shape, device=m.device) * m
    got = run(backend_name, r, v, w, 0.99, 0.95, mode)
    for g, want in zip(got, reference(r, v, w, 0.99, 0.95, mode)):
        assert_close(g, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", MODES)
def test_input_dtypes(backend_name, mode, dtype):
    # Computed in fp32 from the low-precision values, returned in fp32.
    r, v, m = make_inputs(3, 23, device_for(backend_name), dtype=dtype)
    got = run(backend_name, r, v, m, 0.99, 0.95, mode)
    for g, w in zip(got, reference(r, v, m, 0.99, 0.95, mode)):
        assert_close(g, w, torch.bfloat16)


def test_no_grad_and_inputs_untouched(backend_name):
    r, v, m = make_inputs(2, 11, device_for(backend_name))
    r.requires_grad_(True)
    v.requires_grad_(True)
    r0, v0, m0 = r.detach().clone(), v.detach().clone(), m.clone()
    adv, ret = run(backend_name, r, v, m, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.equal(r, r0) and torch.equal(v, v0) and torch.equal(m, m0)


def test_non_contiguous_inputs(backend_name):
    r, v, m = make_inputs(9, 6, device_for(backend_name))
    got = run(backend_name, r.t(), v.t(), m.t(), 0.99, 0.95)
    for g, w in zip(got, reference(r.t(), v.t(), m.t(), 0.99, 0.95, "carry")):
        assert_close(g, w)


def test_default_backend_on_cpu_is_cpp():
    r, v, m = make_inputs(2, 5)
    assert select("compute_gae", v) == "cpp"
    with backend("cpp"):
        want = compute_gae(r, v, m)
    for g, w in zip(compute_gae(r, v, m), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("carry", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_opcheck_cpp(carry, mask_dtype):
    r, v, m = make_inputs(3, 10)  # the fake kernel was registered at import, before any call
    torch.library.opcheck(torch.ops.rlp.gae, (r, v, m.to(mask_dtype), 0.99, 0.95, carry))


def test_cpp_op_checks_its_arguments():
    r, v, m = make_inputs(2, 5)
    compute_gae(r, v, m)
    with pytest.raises(RuntimeError, match="token_rewards must have dtype"):
        torch.ops.rlp.gae(r.double(), v, m, 0.9, 0.9, True)
    with pytest.raises(RuntimeError, match="mask must have dtype"):
        torch.ops.rlp.gae(r, v, m.int(), 0.9, 0.9, True)
    with pytest.raises(RuntimeError, match="values must be contiguous"):
        torch.ops.rlp.gae(r, v.t().contiguous().t(), m, 0.9, 0.9, True)
    with pytest.raises(RuntimeError, match="mask has shape"):
        torch.ops.rlp.gae(r, v, m[:, :4].contiguous(), 0.9, 0.9, True)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(values=torch.randn(2, 6)), ValueError, "token_rewards has shape .* but values has shape"),
        (dict(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask has shape"),
        (dict(token_rewards=torch.randn(10)), ValueError, "token_rewards must have 2 dims"),
        (
            dict(token_rewards=torch.ones(2, 5, dtype=torch.int64)),
            TypeError,
            "token_rewards must be a floating",
        ),
        (dict(values=[[0.0] * 5] * 2), TypeError, "values must be a torch.Tensor"),
        (dict(mask=torch.ones(2, 5, dtype=torch.complex64)), TypeError, "mask must be bool"),
        (dict(mask_mode="mean"), ValueError, "unknown mask_mode"),
        (dict(gamma=1.5), ValueError, "gamma must be a float in"),
        (dict(lam=-0.1), ValueError, "lam must be a float in"),
        (dict(gamma="0.9"), ValueError, "gamma must be a float in"),
        (dict(lam=float("nan")), ValueError, "lam must be a float in"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    r, v, m = make_inputs(2, 5)
    args = dict(token_rewards=r, values=v, mask=m) | kwargs
    with pytest.raises(error, match=f"compute_gae: {match}"):
        compute_gae(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["carry", "zero"])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 255), (7, 257), (3, 4099)])
def test_cuda_kernel_of_the_extension(mode, B, T):
    """csrc/cuda/gae_cuda.cu (backend "cpp" on CUDA tensors), when the extension was built with CUDA."""
    from rlp_engine.ops._backend import has_cuda_kernel

    if not has_cuda_kernel("gae"):
        pytest.skip("rlp_engine._C was built without CUDA kernels")
    r, v, m = make_inputs(B, T, device="cuda", empty_row=B > 2)
    adv, ret = run("cpp", r, v, m, gamma=0.99, lam=0.95, mask_mode=mode)
    want_adv, want_ret = reference(r, v, m, 0.99, 0.95, mode)
    assert_close(adv, want_adv)
    assert_close(ret, want_ret)
