"""The C++ kernels parallelise over rows with OpenMP. The suite runs with OMP_NUM_THREADS=1 (two
pytest workers on two cores), so this file runs the threaded paths explicitly: results must be
bitwise identical to one thread (rows are independent; no reduction order changes)."""

import pytest
import torch

from rlp_engine import ops


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(before)


def _both(threads, fn):
    threads(1)
    one = fn()
    threads(4)  # more threads than cores: also exercises uneven row splits
    many = fn()
    return one, many


def test_gae_threaded_is_bitwise_single_threaded(threads):
    r, v = torch.randn(97, 301), torch.randn(97, 301)
    mask = torch.rand(97, 301) > 0.2
    with ops.backend("cpp"):
        for mode in ("carry", "zero"):
            one, many = _both(threads, lambda m=mode: ops.compute_gae(r, v, mask, 0.99, 0.95, mask_mode=m))
            assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_logprobs_threaded_is_bitwise_single_threaded(threads):
    logits = torch.randn(67, 1031, requires_grad=True)
    labels = torch.randint(0, 1031, (67,))
    g_lp, g_h = torch.randn(67), torch.randn(67)

    def run():
        lp, h = ops.logprobs_from_logits(logits, labels, return_entropy=True)
        (grad,) = torch.autograd.grad((lp * g_lp + h * g_h).sum(), logits)
        return lp, h, grad

    with ops.backend("cpp"):
        one, many = _both(threads, run)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def test_ppo_losses_threaded_are_bitwise_single_threaded(threads):
    lp = torch.randn(83, 257, requires_grad=True)
    old, adv = lp.detach() + 0.2 * torch.randn(83, 257), torch.randn(83, 257)
    mask = torch.rand(83, 257) > 0.3

    def run():
        loss, m = ops.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")
        vloss, _ = ops.ppo_value_loss(lp, old, adv, mask)
        (grad,) = torch.autograd.grad(loss + vloss, lp)
        return loss, vloss, grad, m["clipfrac"], m["approx_kl"]

    with ops.backend("cpp"):
        one, many = _both(threads, run)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
