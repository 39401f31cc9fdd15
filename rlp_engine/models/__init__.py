"""Models: HF causal LMs (local directory, GGUF, or a tiny Llama), scalar heads, UML encoder.

The names below load on first use (PEP 562): `rlp_engine.models.paths` must import without torch or
transformers (the CLI checks model.path with it in milliseconds), and importing it runs this file."""

import importlib

_WHERE = {
    "GaussianEncoder": "heads",
    "ScalarHeadModel": "heads",
    "last_token_index": "heads",
    "position_ids": "heads",
    "load_policy": "loading",
    "load_tokenizer": "loading",
    "tiny_llama": "loading",
    "train_byte_tokenizer": "loading",
    "response_logprobs": "policy",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'rlp_engine.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rlp_engine.models.{_WHERE[name]}"), name)
