"""Public drop-in RLHF ops. Each picks a backend per device (CUDA: Triton; CPU: C++; anywhere:
pure torch) unless `backend(name)` forces one. Semantics: ../DESIGN "Op semantics"."""

from rlp_engine.op_names import AGG_MODES, KL_KINDS
from rlp_engine.ops._backend import backend, current_backend
from rlp_engine.ops.advantages import (
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
)
from rlp_engine.ops.fused_linear import fused_linear_logprobs, fused_linear_ppo_loss
from rlp_engine.ops.fused_preference import fused_linear_dpo_loss, fused_linear_simpo_loss
from rlp_engine.ops.gae import compute_gae
from rlp_engine.ops.ib import gaussian_symmetric_kl, jsd_mi_lower_bound, multiview_ib_loss
from rlp_engine.ops.kl import kl_penalty
from rlp_engine.ops.logprobs import entropy_from_logits, logprobs_from_logits
from rlp_engine.ops.ppo import ppo_policy_loss, ppo_value_loss, truncated_is_weights
from rlp_engine.ops.preference import DPO_LOSS_TYPES, dpo_loss, simpo_loss
from rlp_engine.ops.reduce import (
    agg_loss,
    agg_weights,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "AGG_MODES",
    "DPO_LOSS_TYPES",
    "KL_KINDS",
    "agg_loss",
    "agg_weights",
    "backend",
    "compute_gae",
    "current_backend",
    "dpo_loss",
    "entropy_from_logits",
    "fused_linear_dpo_loss",
    "fused_linear_logprobs",
    "fused_linear_ppo_loss",
    "fused_linear_simpo_loss",
    "gaussian_symmetric_kl",
    "grpo_advantages",
    "jsd_mi_lower_bound",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "multiview_ib_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "simpo_loss",
    "truncated_is_weights",
]
