"""The `rlp-engine` command for a person at a terminal: no deprecation warning from our own
generator calls; checkpoint files that load with weights_only=True."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rlp_engine.engine.checkpoint import from_plain, to_plain

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


# ---- checkpoint files load with weights_only=True ----


def test_plain_round_trip_of_records_and_refusals():
    from rlp_engine.algos.rlp import PolicySamples
    from rlp_engine.data.records import Preference

    meta = {
        "results": {"pairs": [Preference("a", "b", "c")], "samples": PolicySamples(["p"], [["x", "y"]])},
        "stats": {"acc": np.float64(0.25), "n": np.int64(3)},
        "loop": {"gen": torch.randint(0, 255, (8,), dtype=torch.uint8), "order": (1, 2)},
    }
    plain = to_plain(meta)
    assert type(plain["stats"]["acc"]) is float and type(plain["stats"]["n"]) is int
    back = from_plain(plain)
    assert back["results"] == meta["results"] and back["loop"]["order"] == (1, 2)
    with pytest.raises(TypeError, match=r"meta\['x'\] is a set"):
        to_plain({"x": {1}})
    with pytest.raises(ValueError, match="not an rlp_engine dataclass"):
        from_plain({"__dataclass__": "os.PathLike", "fields": {}})
