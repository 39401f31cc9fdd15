"""logprobs_from_logits / entropy_from_logits on every backend against the float64 reference."""

import pytest
import torch
from conftest import device_for
from rlp_engine.kernels.logprobs import logprobs_ref

from rlp_engine.ops import backend, entropy_from_logits, logprobs_from_logits
from rlp_engine.ops._backend import cpp_ops

IGNORE = -100


def _labels(shape, vocab, device, ignore_rows=(1,)):
    """Random labels with some rows ignored (interior ones, so masking is not just a tail)."""
    y = torch.randint(0, vocab, shape, device=device)
    flat = y.view(-1)
    for r in ignore_rows:
        if r < flat.numel():
            flat[r] = IGNORE
    return y


def _run(backend_name, logits, labels, temperature=1.0, g_lp=None, g_ent=None):
    """(logprob, entropy, dlogits) on one backend, the gradient from random upstream grads."""
    x = logits.detach().clone().requires_grad_()
    with backend(backend_name):
        lp, ent = logprobs_from_logits(x, labels, temperature, return_entropy=True)
    g_lp = torch.randn_like(lp) if g_lp is None else g_lp
    g_ent = torch.randn_like(ent) if g_ent is None else g_ent
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp, ent, x.grad, g_lp, g_ent


def _reference(logits, labels, temperature, g_lp, g_ent):
    x = logits.detach().double().requires_grad_()
    lp, ent = logprobs_ref(x, labels, temperature, IGNORE)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return lp, ent, x.grad


@pytest.mark.parametrize("vocab", [1, 7, 1000, 5003])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_matches_fp64_reference(backend_name, vocab, temperature):
    dev = device_for(backend_name)
    logits = torch.randn(5, vocab, device=dev) * 3
    labels = _labels((5,), vocab, dev, ignore_rows=(1, 3))
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and grad.dtype == torch.float32
    r_lp, r_ent, r_grad = _reference(logits, labels, temperature, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), r_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), r_grad, atol=2e-5, rtol=1e-5)
    assert (lp[[1, 3]] == 0).all() and (ent[[1, 3]] == 0).all() and (grad[[1, 3]] == 0).all()


def test_many_row_blocks_small_vocab(backend_name):
    # 130 rows of V = 7: several row blocks, the last one partial.
    dev = device_for(backend_name)
    logits = torch.randn(130, 7, device=dev)
    labels = _labels((130,), 7, dev, ignore_rows=(0, 64, 129))
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels, 1.3)
    r_lp, r_ent, r_grad = _reference(logits, labels, 1.3, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), r_grad, atol=1e-5, rtol=1e-5)


def test_3d_logits_int32_labels_strided(backend_name):
    dev = device_for(backend_name)
    base = torch.randn(2, 3, 70, device=dev) * 2
    logits = base[..., 5:66]  # [B, T, V] view with a row stride != V
    labels = _labels((2, 3), 61, dev, ignore_rows=(2,)).to(torch.int32)
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels, 0.9)
    assert lp.shape == ent.shape == (2, 3) and grad.shape == logits.shape
    r_lp, r_ent, r_grad = _reference(logits, labels.long(), 0.9, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), r_grad, atol=1e-5, rtol=1e-5)


def test_extreme_logits_are_finite(backend_name):
    dev = device_for(backend_name)
    signs = torch.randint(0, 2, (4, 300), device=dev).float() * 2 - 1
    logits = signs * 1e4 + torch.randn(4, 300, device=dev)
    logits[2] = -1e4  # a row of equal extreme logits: uniform distribution
    labels = _labels((4,), 300, dev, ignore_rows=())
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels, 0.7)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    r_lp, r_ent, r_grad = _reference(logits, labels, 0.7, g_lp, g_ent)
    # z = x / 0.7 near 1.4e4 is only known to fp32's ulp there (1e-3), whatever the kernel does.
    torch.testing.assert_close(lp.double(), r_lp, atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(grad.double(), r_grad, atol=2e-3, rtol=1e-3)


def test_minus_inf_logits_from_top_k_masking(backend_name):
    # Sampling processors (top-k / top-p) set logits to -inf; the sampled labels are never there.
    dev = device_for(backend_name)
    logits = torch.randn(4, 50, device=dev)
    labels = _labels((4,), 50, dev, ignore_rows=(3,))
    keep = torch.rand(4, 50, device=dev) < 0.3
    keep[torch.arange(4), labels.clamp_min(0)] = True
    logits = logits.masked_fill(~keep, float("-inf"))
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    r_lp, r_ent, r_grad = _reference(logits, labels, 1.0, g_lp, g_ent)
    assert torch.isfinite(r_grad).all()
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), r_grad, atol=1e-5, rtol=1e-5)
    assert (grad[~keep] == 0).all()


def test_nan_in_ignored_rows_does_not_leak(backend_name):
    dev = device_for(backend_name)
    logits = torch.randn(4, 33, device=dev)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    labels = _labels((4,), 33, dev, ignore_rows=(1, 2))
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert (grad[1:3] == 0).all()
    r_lp, r_ent, r_grad = _reference(logits, labels, 1.0, g_lp, g_ent)
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), r_grad, atol=1e-5, rtol=1e-5)


def test_logprob_only_and_empty(backend_name):
    dev = device_for(backend_name)
    logits = torch.randn(3, 4, 19, device=dev).requires_grad_()
    labels = _labels((3, 4), 19, dev)
    with backend(backend_name):
        lp = logprobs_from_logits(logits, labels)
        empty = logprobs_from_logits(torch.randn(2, 0, 19, device=dev), torch.zeros(2, 0, dtype=torch.long))
    assert isinstance(lp, torch.Tensor) and lp.shape == (3, 4) and empty.shape == (2, 0)
    g = torch.randn_like(lp)
    (lp * g).sum().backward()
    r_lp, _, r_grad = _reference(logits, labels, 1.0, g, torch.zeros_like(g))
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), r_grad, atol=1e-5, rtol=1e-5)


def test_entropy_from_logits(backend_name):
    dev = device_for(backend_name)
    logits = (torch.randn(2, 3, 41, device=dev) * 2).requires_grad_()
    with backend(backend_name):
        ent = entropy_from_logits(logits)
    g = torch.randn_like(ent)
    (ent * g).sum().backward()
    x = logits.detach().double().requires_grad_()
    r_ent = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)  # independent of logprobs_ref
    (r_ent * g.double()).sum().backward()
    torch.testing.assert_close(ent.double(), r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(backend_name, dtype):
    # flash-attention's rule: error vs fp64 at most about twice plain torch's in the same dtype.
    dev = device_for(backend_name)
    logits = (torch.randn(6, 1000, device=dev) * 3).to(dtype)
    labels = _labels((6,), 1000, dev, ignore_rows=(4,))
    lp, ent, grad, g_lp, g_ent = _run(backend_name, logits, labels, 0.7)
    assert grad.dtype == dtype
    r_lp, r_ent, r_grad = _reference(logits, labels, 0.7, g_lp, g_ent)
    # Plain torch in the low dtype: verl's log_softmax + gather, entropy = lse - sum(p * z).
    x = logits.detach().clone().requires_grad_()
    z = x / 0.7
    valid = labels != IGNORE
    t_lp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[:, None])[:, 0] * valid
    t_ent = (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)) * valid
    (t_lp * g_lp.to(dtype) + t_ent * g_ent.to(dtype)).sum().backward()
    for ours, theirs, ref in ((lp, t_lp, r_lp), (ent, t_ent, r_ent), (grad, x.grad, r_grad)):
        err = (ours.double() - ref).abs().max()
        torch_err = (theirs.double() - ref).abs().max()
        assert err <= 2 * torch_err + 1e-5, (err, torch_err)


def test_opcheck_cpp_ops():
    logits = torch.randn(5, 37)
    labels = _labels((5,), 37, "cpu")
    for with_entropy in (True, False):
        args = (logits.clone().requires_grad_(), labels, 0.7, IGNORE, with_entropy)
        torch.library.opcheck(torch.ops.rlp.logprobs_fwd.default, args)
    lp, ent, lse = cpp_ops().logprobs_fwd(logits, labels, 0.7, IGNORE, True)
    g = torch.randn(5)
    torch.library.opcheck(
        torch.ops.rlp.logprobs_bwd.default, (g, g.clone(), logits, labels, lse, ent, 0.7, IGNORE)
    )
    torch.library.opcheck(
        torch.ops.rlp.logprobs_bwd.default, (g, None, logits, labels, lse, ent, 0.7, IGNORE)
    )


def test_argument_errors(backend_name):
    dev = device_for(backend_name)
    logits = torch.randn(5, 10, device=dev)
    labels = _labels((5,), 10, dev)
    with backend(backend_name):
        with pytest.raises(ValueError, match=r"labels has shape \(4,\) but logits has shape \(5, 10\)"):
            logprobs_from_logits(logits, labels[:4])
        with pytest.raises(TypeError, match="logits must be a floating-point"):
            logprobs_from_logits(torch.randint(0, 5, (5, 10), device=dev), labels)
        with pytest.raises(TypeError, match="labels must be int64 or int32"):
            logprobs_from_logits(logits, labels.float())
        for bad_t in (0.0, -1.0):
            with pytest.raises(ValueError, match="temperature must be > 0"):
                logprobs_from_logits(logits, labels, temperature=bad_t)
        with pytest.raises(ValueError, match="V >= 1"):
            entropy_from_logits(torch.randn(3, 0, device=dev))


@pytest.mark.parametrize("name", ["torch", "cpp"])
@pytest.mark.parametrize("bad", [10, -1, -101])
def test_label_out_of_range_raises_on_cpu(name, bad):
    logits = torch.randn(4, 10)
    labels = _labels((4,), 10, "cpu")
    labels[2] = bad
    with backend(name), pytest.raises((ValueError, RuntimeError), match=f"{bad} is outside"):
        logprobs_from_logits(logits, labels)


def test_cpp_op_checks_arguments():
    logits = torch.randn(10, 5).t()  # non-contiguous [5, 10]
    labels = torch.zeros(5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="logits must be contiguous"):
        cpp_ops().logprobs_fwd(logits, labels, 1.0, IGNORE, True)
    with pytest.raises(RuntimeError, match="labels must have dtype Long"):
        cpp_ops().logprobs_fwd(logits.contiguous(), labels.int(), 1.0, IGNORE, True)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        cpp_ops().logprobs_fwd(logits.contiguous(), labels, 0.0, IGNORE, True)
