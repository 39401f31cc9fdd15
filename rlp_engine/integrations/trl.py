"""TRL's GRPOTrainer with per-token log-probs from rlp-engine's fused LM-head op.

    from rlp_engine.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)

`FusedGRPOTrainer` subclasses trl's GRPOTrainer (TRL 1.12) and overrides one method,
`_get_per_token_logps_and_entropies`: the policy's, the old policy's and the reference model's
log-probs (and entropies) of the completion tokens come from `rlp_engine.ops.hf.causal_lm_logprobs`,
which runs the model's base model and then the fused linear log-prob op on the completion positions
only. The [B, T, V] logits are never materialised, forward or backward (TRL's method builds them for
the whole chunk and keeps them for backward). Same inputs to the base model as TRL's forward
(input_ids, attention_mask), the same temperature; the loss and every metric are TRL's own code.

Differences, all deliberate: log-probs and entropies are fp32 (the fused op computes in fp32; TRL's
are in the logits' dtype), and 0 at padded completion positions (attention_mask 0), where TRL returns
a value that its loss then masks out. Under mixed precision (GRPOConfig's bf16=True runs the forward
under autocast) TRL's LM head and log-softmax run in bf16, the fused op in the head weight's dtype
(fp32 master weights: fp32), so the log-probs differ from TRL's by bf16 rounding (up to 1e-3 seen on
the tiny test model). With bf16=False, five GRPO steps give TRL's losses, metrics and weights to fp32
rounding (tests/test_integrations_trl.py). Entropies carry a gradient only when TRL's entropy bonus
is on, as in TRL. TRL's own method runs unchanged for what the fused op does not cover: vision
inputs, MoE router aux losses and PEFT models (`fused_applies`). A wrapped model (DDP, DeepSpeed,
FSDP) runs through TRL's own `_ForwardRedirection` (what TRL does for its Liger loss), so the
wrapper's forward hooks still run; the tests run one CPU process and do not exercise that path.

TRL 1.12's DPOTrainer has no per-token log-prob method to override: `_compute_loss` computes the
log-probs inline and logs statistics of the full logits, so there is no fused DPO trainer here.
"""

from __future__ import annotations

import functools
import importlib

import torch

from rlp_engine.ops.hf import causal_lm_logprobs

__all__ = ["FusedGRPOTrainer", "fused_applies", "fused_grpo_logps"]  # noqa: F822 (FusedGRPOTrainer: module __getattr__)


def _trl(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"rlp_engine.integrations.trl needs TRL (pip install trl==1.12.0): importing {module} failed: {e}"
        ) from e


def _logps_chunk(trainer, model, input_ids, attention_mask, start, compute_entropy):
    """causal_lm_logprobs of tokens start..T-1 of one chunk, through the wrapper's forward when the
    model is wrapped. Returns (logps [b, T-start], entropies or None)."""
    inner = trainer.accelerator.unwrap_model(model)
    fn = functools.partial(
        causal_lm_logprobs,
        inner,
        temperature=trainer.temperature,
        return_entropy=compute_entropy,
        response_start=start,
    )
    if inner is model:
        out = fn(input_ids, attention_mask)
    else:
        redirect = _trl("trl.models.utils")._ForwardRedirection()
        out = redirect(model, inner, fn, input_ids, attention_mask)
    return out if compute_entropy else (out, None)


def fused_grpo_logps(
    trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False
):
    """GRPOTrainer._get_per_token_logps_and_entropies for text-only models, from the fused op.

    input_ids, attention_mask [B, T] (prompt + completion); the log-probs of the last
    `logits_to_keep` tokens, computed in chunks of `batch_size` rows. Returns (logps [B, K] fp32,
    entropies [B, K] fp32 or None, None) as TRL's method does (its third value is the MoE aux loss)."""
    batch_size = batch_size or input_ids.size(0)
    start = input_ids.size(1) - logits_to_keep  # TRL keeps logits[:, start-1 : -1]
    logps, entropies = [], []
    for row in range(0, input_ids.size(0), batch_size):
        lp, ent = _logps_chunk(
            trainer,
            model,
            input_ids[row : row + batch_size],
            attention_mask[row : row + batch_size],
            start,
            compute_entropy,
        )
        logps.append(lp)
        if compute_entropy:
            # TRL computes entropies under no_grad unless they enter the loss (its entropy bonus).
            entropies.append(ent if trainer._entropy_bonus_enabled else ent.detach())
    return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None


def fused_applies(trainer, model, compute_aux_loss=False, extra=None) -> bool:
    """Whether the fused path covers this call: a text-only transformers causal LM. Not for vision
    inputs or MoE aux losses (TRL's own method then), nor PEFT models, whose `base_model` is the
    adapter wrapper around the whole causal LM rather than its trunk."""
    if compute_aux_loss or any(v is not None for v in (extra or {}).values()):
        return False
    return not hasattr(trainer.accelerator.unwrap_model(model), "peft_config")


@functools.cache
def _fused_class():
    """FusedGRPOTrainer, built on first use so that importing this module does not import TRL."""
    base = _trl("trl.trainer.grpo_trainer").GRPOTrainer

    class FusedGRPOTrainer(base):
        """TRL's GRPOTrainer with per-token log-probs from rlp-engine's fused LM-head op (see
        rlp_engine.integrations.trl); everything else is TRL's."""

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            compute_aux_loss=False,
            **extra,
        ):
            if not fused_applies(self, model, compute_aux_loss, extra):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    compute_aux_loss, **extra,
                )  # fmt: skip
            return fused_grpo_logps(
                self, model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy
            )

    FusedGRPOTrainer.__module__ = __name__
    FusedGRPOTrainer.__qualname__ = "FusedGRPOTrainer"
    return FusedGRPOTrainer


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        return _fused_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
