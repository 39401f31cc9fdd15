"""kl_penalty on every backend against an independent float64 reference (verl's kl_penalty_forward and
its straight-through "+" variant): values, both gradients, dtypes, shapes, opcheck and error paths."""

import pytest
import torch

from rlp_engine.ops import KL_KINDS, backend, kl_penalty

BASE = {
    "k1": "k1",
    "kl": "k1",
    "abs": "abs",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
    "k1_nonneg": "k1_nonneg",
}


def verl_kl(lp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """verl 0.9.1's kl_penalty in float64: kl_penalty_forward, then k2's gradient for a '+' kind."""
    lp, ref = lp.double(), ref.double()
    base = BASE[kind.rstrip("+")]
    if base == "k1":
        value = lp - ref
    elif base == "abs":
        value = (lp - ref).abs()
    elif base == "k2":
        value = 0.5 * (lp - ref).square()
    elif base == "k3":
        kl = torch.clamp(ref - lp, min=-20, max=20)
        value = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    else:
        value = torch.clamp(lp - ref, min=0)
    if not kind.endswith("+") or base == "k2":
        return value
    backward_score = 0.5 * (lp - ref).square()
    return backward_score - backward_score.detach() + value.detach()


def make_inputs(shape, dtype=torch.float32):
    # log-ratios spread over [-30, 30] so k3's clamps (|r| > 20, value > 10) and r < 0 are all hit
    ref = -3 * torch.rand(shape, dtype=torch.float64)
    r = 10 * torch.randn(shape, dtype=torch.float64)
    lp = (ref + r).to(dtype)
    return lp.requires_grad_(), ref.to(dtype).requires_grad_()


def run(backend_name, lp, ref, kind, grad_out):
    lp = lp.detach().requires_grad_()
    ref = ref.detach().requires_grad_()
    with backend(backend_name):
        out = kl_penalty(lp, ref, kind)
    out.backward(grad_out)
    return out, lp.grad, ref.grad


def expected(lp, ref, kind, grad_out):
    lp = lp.detach().double().requires_grad_()
    ref = ref.detach().double().requires_grad_()
    out = verl_kl(lp, ref, kind)
    out.backward(grad_out.double())
    return out, lp.grad, ref.grad


@pytest.mark.parametrize("kind", KL_KINDS)
def test_matches_float64_reference(backend_name, kind):
    lp, ref = make_inputs((3, 17))
    g = torch.randn(3, 17)
    out, glp, gref = run(backend_name, lp, ref, kind, g)
    want, wlp, wref = expected(lp, ref, kind, g)
    assert out.dtype == torch.float32 and out.shape == lp.shape
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glp.double(), wlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gref.double(), wref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["k1", "abs", "k3", "k1_nonneg+", "low_var_kl+"])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (7, 129), (2, 3, 5), (0, 4)])
def test_shapes(backend_name, kind, shape):
    lp, ref = make_inputs(shape)
    g = torch.randn(shape)
    out, glp, gref = run(backend_name, lp, ref, kind, g)
    want, wlp, wref = expected(lp, ref, kind, g)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glp.double(), wlp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gref.double(), wref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k3+", "abs"])
def test_low_precision_inputs_compute_in_fp32(backend_name, dtype, kind):
    lp, ref = make_inputs((5, 33), dtype)
    lp.data.clamp_(min=-60)  # keep fp16 finite: the reference sees the same rounded inputs
    g = torch.randn(5, 33)
    out, glp, gref = run(backend_name, lp, ref, kind, g)
    want, wlp, wref = expected(lp, ref, kind, g)
    assert out.dtype == torch.float32 and glp.dtype == dtype and gref.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)  # fp32 math on the rounded inputs
    torch.testing.assert_close(glp.double(), wlp, rtol=1e-2, atol=1e-2)  # gradients are rounded to dtype
    torch.testing.assert_close(gref.double(), wref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", ["k3", "abs+"])
def test_float64_inputs_compute_in_float64(backend_name, kind):
    lp, ref = make_inputs((4, 9), torch.float64)
    g = torch.randn(4, 9, dtype=torch.float64)
    out, glp, gref = run(backend_name, lp, ref, kind, g)
    want, wlp, wref = expected(lp, ref, kind, g)
    assert out.dtype == torch.float64 and glp.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(glp, wlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gref, wref, rtol=1e-12, atol=1e-12)


def test_boundaries_follow_torch_conventions(backend_name):
    # r = 0 (abs has gradient 0, k1_nonneg passes it), r = +-20 exactly (k3's clamp passes it)
    ref = torch.full((6,), -1.0)
    lp = ref + torch.tensor([0.0, 20.0, -20.0, 0.5, -0.5, 3.0])
    g = torch.rand(6) + 0.5
    for kind in ("abs", "k1_nonneg", "k3"):
        out, glp, gref = run(backend_name, lp, ref, kind, g)
        want, wlp, wref = expected(lp, ref, kind, g)
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(glp.double(), wlp, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_promote(backend_name):
    lp, _ = make_inputs((3, 8), torch.bfloat16)
    _, ref = make_inputs((3, 8), torch.float32)
    g = torch.randn(3, 8)
    out, glp, gref = run(backend_name, lp, ref, "k3", g)
    want, wlp, wref = expected(lp, ref, "k3", g)
    assert glp.dtype == torch.bfloat16 and gref.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gref.double(), wref, rtol=1e-5, atol=1e-5)


def test_opcheck_cpp_ops():
    ops = torch.ops.rlp  # its fake kernels and autograd formula were registered at import
    lp, ref = (t.detach() for t in make_inputs((3, 11)))
    for kind in ("k1", "k3", "abs+"):
        torch.library.opcheck(
            ops.kl_penalty, (lp.clone().requires_grad_(), ref.clone().requires_grad_(), kind)
        )
        torch.library.opcheck(ops.kl_penalty_backward, (torch.randn(3, 11), lp, ref, kind))
    bad = ref.to(torch.float64)
    with pytest.raises(RuntimeError, match="ref_logprob must have dtype"):
        ops.kl_penalty(lp, bad, "k1")


def test_errors_name_the_argument(backend_name):
    lp, ref = (t.detach() for t in make_inputs((2, 5)))
    with backend(backend_name):
        with pytest.raises(ValueError, match="kind.*'k4'.*low_var_kl"):
            kl_penalty(lp, ref, "k4")
        with pytest.raises(ValueError, match="ref_logprob has shape"):
            kl_penalty(lp, ref[:, :4], "k1")
        with pytest.raises(TypeError, match="logprob must be a floating-point tensor"):
            kl_penalty(lp.long(), ref, "k1")
        with pytest.raises(TypeError, match="ref_logprob must be a torch.Tensor"):
            kl_penalty(lp, 0.5, "k1")


def test_kinds_are_verls():
    assert set(KL_KINDS) == {k + s for k in BASE for s in ("", "+")}
