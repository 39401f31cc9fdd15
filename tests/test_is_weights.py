"""truncated_is_weights against a float64 reference: values, dtype, exact zeros off the mask whatever
the inputs hold there, cap edge cases, no gradient, and errors naming the argument."""

import math

import pytest
import torch

from rlp_engine.ops import ppo_policy_loss, truncated_is_weights


def reference(trainer, gen, mask, cap):
    """min(exp(trainer - gen), cap) on the mask, 0 off it, in float64."""
    w = torch.exp(trainer.double() - gen.double()).clamp(max=cap)
    return torch.where(mask.bool(), w, 0.0)


def inputs(B, T, dtype=torch.float32):
    gen = torch.randn(B, T, dtype=torch.float64) * 2 - 3
    trainer = gen + 0.7 * torch.randn(B, T, dtype=torch.float64)  # ratios on both sides of 1 and the cap
    mask = torch.rand(B, T) < 0.7
    if B > 2:
        mask[1] = False  # an empty row
    return trainer.to(dtype), gen.to(dtype), mask


def poison(x, mask):
    """x with NaN, +inf and -inf cycled over the positions off the mask."""
    x = x.clone()
    off = (~mask.bool()).nonzero(as_tuple=True)
    bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype)
    x[off] = bad[torch.arange(off[0].numel()) % 3]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 33), (1, 1), (3, 0), (0, 4), (2, 3, 7)])
def test_matches_float64_reference(dtype, shape):
    trainer, gen, mask = inputs(shape[0], math.prod(shape[1:]), dtype)
    trainer, gen, mask = (t.reshape(shape) for t in (trainer, gen, mask))
    for cap in (2.0, 1.0, 0.5, 10):
        got = truncated_is_weights(trainer, gen, mask, cap)
        assert got.dtype == torch.float32 and got.shape == shape
        # fp32 difference and exp on the inputs as given (low-precision inputs are exact in fp32)
        torch.testing.assert_close(got.double(), reference(trainer, gen, mask, cap), rtol=2e-6, atol=0)
        if got.numel():
            assert got.max() <= cap and (got[mask] > 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_exactly_zero_off_the_mask_even_for_nan_and_inf(mask_dtype):
    trainer, gen, mask = inputs(4, 29)
    want = truncated_is_weights(trainer, gen, mask, 2.0)
    m = mask.to(mask_dtype)
    pt, pg = poison(trainer, mask), poison(gen, mask)
    for t, g in ((pt, gen), (trainer, pg), (pt, pg)):
        got = truncated_is_weights(t, g, m, 2.0)
        assert torch.equal(got, want)  # on the mask unchanged, off it exactly 0
        assert torch.equal(got[~mask], torch.zeros(int((~mask).sum())))


def test_usable_as_ppo_is_weights_with_nan_off_the_mask():
    trainer, gen, mask = inputs(3, 17)
    w = truncated_is_weights(poison(trainer, mask), poison(gen, mask), mask, 2.0)
    lp = trainer.clone().requires_grad_()
    loss, _ = ppo_policy_loss(lp, trainer + 0.1, torch.randn(3, 17), mask, is_weights=w)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_cap_edge_cases():
    gen = torch.zeros(1, 6)
    trainer = torch.tensor([[0.0, math.log(2.0), 50.0, math.inf, -math.inf, -200.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    w = truncated_is_weights(trainer, gen, mask, 2.0)
    assert w[0, 0] == 1.0  # equal log-probs: ratio exactly 1
    assert w[0, 1] == pytest.approx(2.0, rel=1e-6) and w[0, 1] <= 2.0  # at the cap
    assert w[0, 2] == 2.0 and w[0, 3] == 2.0  # far above the cap, +inf included: the cap
    assert w[0, 4] == 0.0 and w[0, 5] == 0.0  # exp underflows: 0 (below any cap)
    # cap = inf: no truncation (exp(50) is finite in fp32, exp(inf) = inf)
    w = truncated_is_weights(trainer, gen, mask, math.inf)
    assert w[0, 2] == torch.exp(torch.tensor(50.0)) and w[0, 3] == math.inf
    # a cap below 1 truncates ratio 1 too; an int cap works as a float
    assert truncated_is_weights(trainer, gen, mask, 0.25)[0, :4].eq(0.25).all()
    assert torch.equal(
        truncated_is_weights(trainer, gen, mask, 2), truncated_is_weights(trainer, gen, mask, 2.0)
    )
    # a NaN on the mask stays NaN: a bad log-prob is not hidden
    nan = torch.tensor([[math.nan]])
    assert truncated_is_weights(nan, torch.zeros(1, 1), torch.ones(1, 1), 2.0).isnan().all()


def test_same_values_as_the_recipes_formula_on_finite_inputs():
    """Bit-identical on the mask to what the PPO recipe computed before this op (exp of the fp32
    difference clamped at the cap, times a 0/1 mask), so switching to the op changes no run."""
    trainer, gen, mask = inputs(6, 40)
    m = mask.float()
    old = torch.exp((trainer - gen).float()).clamp(max=2.0) * m
    assert torch.equal(truncated_is_weights(trainer, gen, m, 2.0), old)


def test_no_gradient():
    trainer, gen, mask = inputs(2, 5)
    trainer.requires_grad_()
    gen.requires_grad_()
    assert not truncated_is_weights(trainer, gen, mask, 2.0).requires_grad


@pytest.mark.parametrize("cap", [0, 0.0, -1.0, math.nan, -math.inf, None, "2", True, torch.tensor(2.0)])
def test_bad_cap_names_cap(cap):
    trainer, gen, mask = inputs(2, 5)
    with pytest.raises(ValueError, match=r"^truncated_is_weights: cap must be a number > 0, got"):
        truncated_is_weights(trainer, gen, mask, cap)


def test_bad_tensors_name_the_argument():
    trainer, gen, mask = inputs(2, 5)
    f = truncated_is_weights
    with pytest.raises(ValueError, match="gen_logprobs has shape"):
        f(trainer, gen[:, :4], mask, 2.0)
    with pytest.raises(ValueError, match="mask has shape"):
        f(trainer, gen, mask[:1], 2.0)
    with pytest.raises(TypeError, match="trainer_logprobs must be a floating-point tensor"):
        f(trainer.long(), gen, mask, 2.0)
    with pytest.raises(TypeError, match="gen_logprobs must be a torch.Tensor"):
        f(trainer, 0.5, mask, 2.0)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        f(trainer, gen, None, 2.0)
