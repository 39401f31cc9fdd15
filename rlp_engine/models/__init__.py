"""Models: HF causal LMs (local directory, GGUF, or a tiny Llama), scalar heads, UML encoder."""

from rlp_engine.models.heads import GaussianEncoder, ScalarHeadModel, last_token_index, position_ids
from rlp_engine.models.loading import load_policy, load_tokenizer, tiny_llama, train_byte_tokenizer
from rlp_engine.models.policy import response_logprobs

__all__ = [
    "GaussianEncoder",
    "ScalarHeadModel",
    "last_token_index",
    "load_policy",
    "load_tokenizer",
    "position_ids",
    "response_logprobs",
    "tiny_llama",
    "train_byte_tokenizer",
]
