"""The names the ops accept, defined once: KL estimator kinds and loss aggregation modes.

Public as rlp_engine.ops.KL_KINDS / rlp_engine.ops.AGG_MODES. This module imports nothing (no torch)
so that rlp_engine.config can validate `ppo.kl_kind` / `ppo.agg` against these very lists while the
CLI checks a config before torch is loaded; the ops, their Triton launchers (kernels/kl.py) and
config all read them from here. Semantics: DESIGN "Op semantics", KL estimators and agg modes.
"""

# Base estimators; the order is the kind code the Triton kernels take (kernels/kl.py parse_kind).
KL_BASE_KINDS = ("k1", "abs", "k2", "k3", "k1_nonneg")
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}  # verl's names
# Every accepted kind: the bases and aliases, each also with a "+" suffix (the estimator's value,
# k2's gradient: straight-through). The C++ kernels parse the same strings (csrc/kl.cpp).
KL_KINDS = tuple(
    k + s for s in ("", "+") for k in ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1_nonneg")
)

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
