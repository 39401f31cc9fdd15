"""Token log-probs of a Hugging Face causal LM without its [B, T, V] logits: run the base model for
the last hidden states, then the fused LM-head op with the output-embedding weight (and bias)."""

from __future__ import annotations

import numbers

import torch

from rlp_engine.ops.fused_linear import fused_linear_logprobs


def _base_hidden(model, input_ids, attention_mask, model_kwargs) -> torch.Tensor:
    """Last hidden states [B, T, H] (after the final norm), never applying the LM head when the model
    exposes its base model (every *ForCausalLM: `model.base_model`, named by base_model_prefix)."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # No separate base model: the full forward computes logits we then ignore (correct, not lean).
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        **model_kwargs,
    )
    return out.hidden_states[-1]


def _head_temperature(model, temperature: float) -> float:
    """Fold the LM heads' linear logit scalings into the temperature; refuse non-linear ones."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"causal_lm_logprobs: model applies final_logit_softcapping={cap} (tanh) to its logits, "
            "which the fused linear log-prob op cannot express"
        )
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling is not None:
        temperature = temperature * float(scaling)
    scale = getattr(model, "logit_scale", None) or getattr(
        config, "logit_scale", None
    )  # Cohere: logits * scale
    if isinstance(scale, numbers.Real):
        temperature = temperature / float(scale)
    return temperature


def causal_lm_logprobs(
    model,
    input_ids,
    attention_mask=None,
    *,
    temperature=1.0,
    return_entropy=False,
    response_start=None,
    **model_kwargs,
):
    """Log-probs of the tokens of `input_ids` under a transformers causal LM, token t+1 predicted from
    position t, through `fused_linear_logprobs` (no [B, T, V] logits, forward or backward).

    input_ids [B, T] int64; attention_mask [B, T] or None (positions where it is 0 give 0 and no
    gradient). response_start: None -> log-probs of tokens 1..T-1, shape [B, T-1]; an int s in
    [1, T-1] -> of tokens s..T-1 only, shape [B, T-s], and the LM head runs on those positions alone
    (the usual RLHF case: the prompt's log-probs are never needed). Extra keyword arguments (e.g.
    position_ids for left padding) go to the base model. Returns fp32 log-probs (and entropy).
    """
    op = "causal_lm_logprobs"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"{op}: input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)}"
        )
    seq = input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"{op}: attention_mask has shape {tuple(attention_mask.shape)} "
            f"but input_ids has shape {tuple(input_ids.shape)}"
        )
    start = 1 if response_start is None else response_start
    if not isinstance(start, int) or isinstance(start, bool) or not 1 <= start < seq:
        raise ValueError(
            f"{op}: response_start must be an int in [1, T-1] = [1, {seq - 1}], got {response_start!r}"
        )
    temperature = _head_temperature(model, temperature)
    head = model.get_output_embeddings()
    hidden = _base_hidden(model, input_ids, attention_mask, model_kwargs)[:, start - 1 : -1]  # [B, T-s, H]
    labels = input_ids[:, start:].to(torch.int64)
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask[:, start:] == 0, -100)
    weight = head.weight
    if hidden.dtype != weight.dtype:  # e.g. a base model run under autocast
        hidden = hidden.to(weight.dtype)
    return fused_linear_logprobs(
        hidden, weight, labels, temperature=temperature, bias=head.bias, return_entropy=return_entropy
    )
