"""Per-token log-probs of a policy's responses, through the fused LM-head op (no [B, T, V] logits).

Under FSDP2 a causal LM is trained through `CausalLMLogprobs`, a parameter-free wrapper whose
`forward` is the log-prob computation: FSDP2 gathers parameters only around a module's forward, and
the fused op reads the LM head's weight outside the HF model's own forward (which would compute the
full logits). Sharding the wrapper as the root FSDP unit makes its forward the call that gathers the
embeddings, final norm and LM head (tied or not: they sit in the same unit).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from rlp_engine.models.heads import position_ids
from rlp_engine.ops.hf import causal_lm_logprobs


class CausalLMLogprobs(nn.Module):
    """Training view of a causal LM `lm` (held as `self.lm`, no parameters of its own):
    forward(input_ids, attention_mask, response_len, ...) = response_logprobs of `lm`."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        if isinstance(lm, CausalLMLogprobs):
            raise TypeError("CausalLMLogprobs: lm is already wrapped")
        if not hasattr(lm, "get_output_embeddings") or lm.get_output_embeddings() is None:
            raise TypeError(
                f"CausalLMLogprobs: {type(lm).__name__} has no output embeddings (not a causal LM)"
            )
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_len: int,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        out = _logprobs(self.lm, input_ids, attention_mask, response_len, temperature, return_entropy)
        # Fresh tensors, not views ([B, R]: cheap): FSDP2 hooks its backward onto the outputs, and an
        # in-place op on a returned view would bypass that hook (FSDP2 warns about views).
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


def unwrap_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside a `CausalLMLogprobs` (its HF names, config, generate), else `model`."""
    return model.lm if isinstance(model, CausalLMLogprobs) else model


def _logprobs(model, input_ids, attention_mask, response_len, temperature, return_entropy):
    return causal_lm_logprobs(
        model,
        input_ids,
        attention_mask,
        temperature=temperature,
        return_entropy=return_entropy,
        response_start=input_ids.shape[1] - response_len,
        position_ids=position_ids(attention_mask),
    )


def response_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs [B, R] (fp32) of the last `response_len` tokens of `input_ids` [B, P+R] under `model`
    (and their entropies [B, R] when asked); 0 where attention_mask is 0. Only the response positions
    reach the LM head. Positions count real tokens only, so left padding does not shift them.

    model: a causal LM, or a log-prob module: the `CausalLMLogprobs` that FSDP2 trains (sharded or
    not; the call goes through its forward, inside which FSDP2 holds the gathered weights) or anything
    called like it (a ZeRO-3 route, whose call goes through the engine's forward). A causal LM is
    told apart by its output embeddings."""
    if isinstance(model, CausalLMLogprobs) or not hasattr(model, "get_output_embeddings"):
        return model(input_ids, attention_mask, response_len, temperature, return_entropy)
    head = model.get_output_embeddings()
    if head is not None and isinstance(head.weight, DTensor):
        raise ValueError(
            f"response_logprobs: {type(model).__name__}'s LM head is sharded (FSDP2) but the model was "
            "called directly; pass the CausalLMLogprobs module that prepare_for_training returned"
        )
    return _logprobs(model, input_ids, attention_mask, response_len, temperature, return_entropy)
