"""The `rlp-engine` command for a person at a terminal: no deprecation warning from our own
generator calls."""

from __future__ import annotations

import warnings

import torch

# ---- no deprecation warning from our own transformers calls ----


def test_generator_model_call_raises_no_future_warning():
    """transformers 5.2x renamed forward's past_key_values to cache; the old name warned on every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlp_engine.engine.generator import Generator

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 5))
    gen = Generator(model, 12, fast=False)  # the model's own forward at every step
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = gen.generate(ids, torch.ones_like(ids), max_new_tokens=4, temperature=1.0)
    assert out.tokens.shape == (2, 4)
