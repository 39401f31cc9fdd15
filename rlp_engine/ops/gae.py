"""GAE advantages and returns (DESIGN "Op semantics": GAE), on torch / C++ / Triton.

GAE produces training targets: verl, TRL and OpenRLHF all compute it under no_grad, and so does this
op (its outputs never require grad, whatever the inputs). Backends: "torch" runs the time loop
`gae_ref` in fp32; "cpp" is one OpenMP-parallel reverse loop per row (rlp.gae); "triton" is a
chunked parallel scan over T (kernels/gae.py). All compute and return fp32.
"""

from __future__ import annotations

import numbers

import torch

from rlp_engine.kernels.gae import gae_forward, gae_ref
from rlp_engine.ops._backend import cpp_available, cpp_ops, select
from rlp_engine.ops._checks import check_choice, check_mask, check_same_shape, check_tensor

OP = "compute_gae"
MASK_MODES = ("carry", "zero")


def _check_unit(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 <= float(x) <= 1.0:
        raise ValueError(f"{OP}: {name} must be a float in [0, 1], got {x!r}")
    return float(x)


def _gae_fake(token_rewards, values, mask, gamma, lam, carry):
    return torch.empty_like(values), torch.empty_like(values)


if cpp_available():
    # The fake (meta) kernel, registered when the extension loads. No autograd formula: GAE outputs
    # are targets, and compute_gae calls the op on detached inputs.
    torch.library.register_fake("rlp::gae")(_gae_fake)


def _cpp_gae(r, v, m, gamma, lam, carry):
    # The kernel reads fp32 rewards/values and a fp32 or bool mask: convert anything else once here.
    if m.dtype != torch.bool:
        m = m.to(torch.float32)
    return cpp_ops().gae(r.float().contiguous(), v.float().contiguous(), m.contiguous(), gamma, lam, carry)


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    mask_mode: str = "carry",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unwhitened GAE advantages and returns = advantages + values.

    token_rewards, values: [B, T] floating (fp32/bf16/fp16/fp64; computed in fp32); mask: [B, T]
    bool, integer or floating 0/1 (fractional weights follow the same formulas). gamma, lam: floats
    in [0, 1]. mask_mode "carry" (verl: the advantage and next value are carried across masked-out
    steps) or "zero" (OpenRLHF/TRL: r and V are zeroed where mask == 0, then a plain recurrence).
    Returns (advantages, returns), fp32 [B, T], not requiring grad. Masked-out values (even NaN)
    never reach the advantages. Returns at masked-out positions are advantages + values in "carry"
    (as in verl: a NaN value there stays NaN) and advantages in "zero" (the values were zeroed).
    """
    check_tensor(OP, "token_rewards", token_rewards, ndim=2)
    check_tensor(OP, "values", values, ndim=2)
    check_same_shape(OP, "values", values, token_rewards=token_rewards)
    check_mask(OP, mask, values, "values")
    gamma = _check_unit("gamma", gamma)
    lam = _check_unit("lam", lam)
    check_choice(OP, "mask_mode", mask_mode, MASK_MODES)
    name = select(OP, values, cuda_op="gae")
    r, v, m = token_rewards.detach(), values.detach(), mask.detach()
    with torch.no_grad():
        if name == "cpp":
            return _cpp_gae(r, v, m, gamma, lam, mask_mode == "carry")
        if name == "triton":
            return gae_forward(
                r.contiguous(), v.contiguous(), m.contiguous(), gamma, lam, mask_mode == "carry"
            )
        return gae_ref(r.float(), v.float(), m, gamma, lam, mask_mode)
