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


def tiny_preset(overrides: tuple[str, ...] = (), alphabet: str = "0123456789+="):
    """(config, tokenizer, policy): the tiny preset (with `overrides`), a byte tokenizer trained on
    `alphabet` and the preset's Llama over it, drawn after torch.manual_seed(0)."""
    from rlp_engine.config import load_config
    from rlp_engine.models import tiny_llama as preset_llama
    from rlp_engine.models import train_byte_tokenizer

    cfg = load_config(preset="tiny", overrides=list(overrides))
    tok = train_byte_tokenizer([alphabet])
    torch.manual_seed(0)
    return cfg, tok, preset_llama(cfg.model, tok)
