"""What each config key may hold (CHOICES: a fixed set of names; LIMITS: a numeric range, with the
words the error message uses) and the named presets (overrides on top of the dataclass defaults).
rlp_engine/config.py checks every value it sets against these. No torch at import time."""

from __future__ import annotations

import math
import typing

from rlp_engine.op_names import AGG_MODES, KL_KINDS  # the ops' own lists (torch-free module)

# Overrides on top of the dataclass defaults ("default" is the defaults themselves).
PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # the RLP pipeline and every arena method (pipeline/arena.py) at the default size, one report
    "arena": {"run.stages": "arena"},
    "tiny": {
        "model.hidden_size": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.intermediate_size": 64,
        "data.max_operand": 9,
        "data.num_sft": 200,
        "data.num_pref": 64,
        "data.num_unlabeled": 16,
        "data.num_eval": 16,
        "sft.steps": 8,
        "sft.batch_size": 16,
        "rm.steps": 4,
        "rm.batch_size": 16,
        "ppo.steps": 2,
        "ppo.rollout_batch_size": 8,
        "ppo.mini_batch_size": 4,
        "ppo.ppo_epochs": 1,
        "offline.steps": 6,
        "offline.batch_size": 8,
        "offline.lr": 1e-3,
        "offline.warmup_steps": 1,
        "grpo.steps": 2,
        "grpo.prompts_per_step": 4,
        "grpo.n": 2,
        "grpo.mini_batch_size": 4,
        "grpo.epochs": 1,
        "ensemble.k": 2,
        "sample.n": 4,
        "sample.num_prompts": 8,
        "uml.steps": 3,
        "uml.batch_size": 8,
        "uml.ib_batch_size": 4,
        "spg.steps": 3,
        "spg.batch_size": 8,
        "eval.num_prompts": 16,
        "eval.samples_per_prompt": 2,
        "eval.batch_size": 32,
        "run.log_every": 1,
        "run.progress": False,
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.task": ("reverse", "arithmetic", "none"),
    "data.pref_source": ("policy", "task"),
    "ppo.kl_kind": KL_KINDS,
    "ppo.agg": AGG_MODES,
    "ppo.old_logprobs": ("recompute", "generator"),
    "ppo.adamw_impl": ("default", "foreach", "fused"),
    "grpo.kl_kind": KL_KINDS,
    "grpo.agg": AGG_MODES,
    "spg.equivalence": ("answer", "final_answer", "exact"),
    "uml.negatives": ("all", "roll"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "run.backend": ("auto", "torch", "cpp", "triton"),
    "run.train_backend": ("fsdp2", "deepspeed"),
    "rollout.backend": ("builtin", "vllm"),
    "data.long_prompts": ("truncate", "drop", "error"),
}

_AT_LEAST_1 = (lambda v: v >= 1, "an int >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "an int >= 0")
_POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")
_FINITE = (lambda v: math.isfinite(v), "a finite number")

# Numeric keys with a valid range: key -> (test, what a valid value is).
LIMITS: dict[str, tuple[typing.Callable[[object], bool], str]] = {
    "ppo.kl_target": (
        lambda v: v is None or 0 < v < math.inf,
        "a finite number > 0, or null (fixed kl_coef)",
    ),
    "ppo.kl_horizon": _AT_LEAST_1,
    "rlp.rounds": _AT_LEAST_1,
    "ensemble.k": _AT_LEAST_1,
    "ensemble.seed_offset": _AT_LEAST_0,
    "ensemble.uwo_lambda": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "grpo.n": (lambda v: v >= 2, "an int >= 2 (the group baseline needs another sample of the prompt)"),
    "grpo.clip": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "grpo.kl_coef": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "grpo.temperature": _POSITIVE,
    "grpo.max_grad_norm": _POSITIVE,
    "grpo.sync_bucket_mb": _POSITIVE,
    **dict.fromkeys(("grpo.prompts_per_step", "grpo.epochs", "grpo.mini_batch_size"), _AT_LEAST_1),
    **dict.fromkeys(
        (
            "sft.batch_size",
            "rm.batch_size",
            "uml.batch_size",
            "uml.ib_batch_size",
            "spg.batch_size",
            "ppo.rollout_batch_size",
            "ppo.mini_batch_size",
            "ppo.ppo_epochs",
            "sample.num_prompts",
            "eval.num_prompts",
            "eval.batch_size",
            "eval.samples_per_prompt",
            "eval.curve_prompts",
            "eval.curve_samples",
            "run.log_every",
            "run.keep_checkpoints",
        ),
        _AT_LEAST_1,
    ),
    **dict.fromkeys(
        ("offline.lr", "offline.dpo_beta", "offline.ipo_beta", "offline.simpo_beta", "offline.max_grad_norm"),
        _POSITIVE,
    ),
    "offline.simpo_gamma_beta_ratio": _FINITE,
    "offline.label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "offline.weight_decay": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "offline.batch_size": _AT_LEAST_1,
    "offline.steps": _AT_LEAST_0,
    "offline.warmup_steps": _AT_LEAST_0,
    "sample.n": (lambda v: v >= 2, "an int >= 2 (RLP-UML and RLP-SPG compare responses to one prompt)"),
    **dict.fromkeys(("sft.lr", "rm.lr", "ppo.lr", "uml.lr", "spg.lr", "grpo.lr"), _POSITIVE),
    **dict.fromkeys(
        (
            "sft.steps",
            "rm.steps",
            "ppo.steps",
            "uml.steps",
            "spg.steps",
            "grpo.steps",
            "sft.warmup_steps",
            "uml.beta_warmup_steps",
            "run.checkpoint_every",
            "run.max_nonfinite_steps",
            "run.threads",
            "eval.curve_points",
        ),
        _AT_LEAST_0,
    ),
}
