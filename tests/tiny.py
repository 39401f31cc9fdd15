"""The tiny Hugging Face Llama the tests and their multi-process workers build: seeded, two layers,
everything else from keyword arguments (LlamaConfig's names), so each file keeps its own sizes."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """LlamaForCausalLM with weights drawn after torch.manual_seed(seed); `config` overrides
    LlamaConfig fields on top of 2 layers, 4 heads, 2 key-value heads."""
    torch.manual_seed(seed)
    base = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaForCausalLM(LlamaConfig(**{**base, **config}))
