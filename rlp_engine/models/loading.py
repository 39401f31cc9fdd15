"""Policy models and tokenizers: any HF causal LM from a local directory (or a GGUF file in it), or,
with no path, a tiny LlamaForCausalLM built from a config and a byte-level tokenizer trained
offline in milliseconds."""

from __future__ import annotations

import os
import sys

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlp_engine.config import ModelConfig
from rlp_engine.models.paths import ModelError, resolve_model_path

PAD, EOS = "<pad>", "<eos>"


def train_byte_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (256 byte tokens + <pad> + <eos>): every digit stays
    its own token, which is what the arithmetic task wants, and any UTF-8 text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 2,
        special_tokens=[PAD, EOS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    out.padding_side = "left"
    return out


def tiny_llama(cfg: ModelConfig, tokenizer) -> LlamaForCausalLM:
    """A small LlamaForCausalLM from `cfg` (random init) sized to `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=cfg.attn_implementation,
    )
    return LlamaForCausalLM(config)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig, texts=()):
    """The tokenizer of `cfg.path` (pad set to eos when it has none, with a notice), else a fresh
    byte tokenizer. ModelError when it has no eos token: responses end in eos and generation stops
    on it."""
    if cfg.path is None:
        return train_byte_tokenizer(texts)
    path, gguf = resolve_model_path(cfg)  # FileNotFoundError naming model.path
    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if tok.eos_token is None:
        pad = (
            "a pad token but no eos token" if tok.pad_token is not None else "neither a pad nor an eos token"
        )
        raise ModelError(f"model.path: the tokenizer at {cfg.path} has {pad}; the pipeline needs eos")
    if tok.pad_token is None:
        # Response masks come from generation positions, never from the pad id, so pad == eos is safe.
        tok.pad_token = tok.eos_token
        if os.environ.get("RANK", "0") == "0":  # once under torchrun, not once per rank
            print(
                f"[rlp-engine] notice: the tokenizer at {cfg.path} has no pad token; "
                f"using eos {tok.eos_token!r} as pad",
                file=sys.stderr,
            )
    tok.padding_side = "left"
    return tok


def load_policy(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """AutoModelForCausalLM from `cfg.path` (with `gguf_file` when set), else a tiny Llama."""
    if cfg.path is None:
        return tiny_llama(cfg, tokenizer).to(_dtype(cfg.dtype))
    path, gguf = resolve_model_path(cfg)  # FileNotFoundError naming model.path
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
        **({"gguf_file": gguf} if gguf else {}),
    )
    if gguf:
        # A GGUF file (needs the `gguf` package) is dequantised to `dtype` on load, but the model stays
        # marked as GGUF-quantised and save_pretrained refuses it: rebuild it from its config as a
        # plain model with the dequantised weights, so that checkpoints are ordinary HF directories.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg.dtype))
        plain.load_state_dict(model.state_dict())
        model = plain
    return model
