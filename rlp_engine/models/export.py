"""A reward model (ScalarHeadModel) as a standard Hugging Face AutoModelForSequenceClassification.

The pipeline's checkpoints/rm* directories hold the backbone in HF format plus scalar_head.pt, which
only rlp-engine reads. `export_reward_model` writes the same network as `<Arch>ForSequenceClassification`
with num_labels=1: the backbone under its base_model_prefix, the head as `score.weight` [1, H], in
model.safetensors, with config.pad_token_id set and the tokenizer beside it. Loaded with no rlp-engine
code, these score as ours (tests/test_integrations_export.py): transformers'
`AutoModelForSequenceClassification.from_pretrained(out)` (what TRL's reward models are), OpenRLHF
0.11.2's `get_llm_for_sequence_regression(out, "reward")` (base model + bias-free `score`, read at the
last mask position; it loads bf16/fp16 only), and `AutoModelForTokenClassification` as verl's reward
worker loads it (its `score` has a bias, absent here: HF reports it missing and initialises it to 0).

What carries over exactly, and what does not:
- HF's `score` Linear has no bias; ours has one. Under Bradley-Terry its gradient cancels between the
  chosen and rejected scores up to rounding, so it stays at or near its initial 0 (a default run:
  rm_uml and rm_spg exactly 0, rm -5.5e-6, Adam scaling the rounding residue up). A zero bias exports
  exactly. A non-zero one is refused unless drop_bias=True: then the exported scores are ours minus
  the bias. Preference probabilities are unchanged (shift-invariant); PPO rewards are not, so
  the constant is written to config.json as `rlp_engine_dropped_score_bias` and returned.
- HF reads the score at the rightmost token that is not pad_token_id; ours at the last position where
  attention_mask is 1. Same token whenever padding uses the pad token and real tokens never do.
- Ours gives left-padded rows positions 0, 1, ... from the first real token; HF's default positions
  count the pads. With rotary position embeddings (Llama, Qwen, Mistral, ...) attention depends only
  on position differences, so the scores agree to fp32 rounding; a backbone with absolute position
  embeddings gives different scores on left-padded rows unless the caller passes position_ids.
- The UML encoder (rm_uml*) does not enter the score and is not exported.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from rlp_engine.models.heads import HEAD_FILE, ScalarHeadModel

BIAS_KEY = "rlp_engine_dropped_score_bias"


def _classifier_config(rm: ScalarHeadModel, tokenizer, bias: float | None):
    """The backbone's config as a one-label sequence classifier padded with the tokenizer's pad."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "export_reward_model: tokenizer has no pad token; HF's sequence classifier finds each row's "
            "last token through config.pad_token_id"
        )
    config = copy.deepcopy(rm.backbone.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    if bias is not None:
        setattr(config, BIAS_KEY, bias)
    return config


def _head_bias(rm: ScalarHeadModel, drop_bias: bool) -> float:
    bias = float(rm.head.bias.detach().float().item()) if rm.head.bias is not None else 0.0
    if bias != 0.0 and not drop_bias:
        raise ValueError(
            f"export_reward_model: the reward head's bias is {bias!r}, and HF's score head has none; "
            "pass drop_bias=True (CLI: --drop-bias) to export without it: scores shift by that constant "
            "(Bradley-Terry preferences unchanged, PPO rewards shifted)"
        )
    return bias


def export_reward_model(rm: ScalarHeadModel, tokenizer, path, *, drop_bias: bool = False) -> float:
    """Write `rm` to directory `path` as AutoModelForSequenceClassification (num_labels=1, weights in
    model.safetensors, pad_token_id set) plus `tokenizer`. Returns the bias left out (0.0 when the
    head's bias is 0; else ValueError unless drop_bias). Holds a second copy of the weights while it
    runs."""
    from transformers import AutoModelForSequenceClassification

    if not isinstance(rm, ScalarHeadModel):
        raise TypeError(f"export_reward_model: rm must be a ScalarHeadModel, got {type(rm).__name__}")
    bias = _head_bias(rm, drop_bias)
    config = _classifier_config(rm, tokenizer, bias if bias != 0.0 else None)
    dtype = next(rm.backbone.parameters()).dtype
    model = AutoModelForSequenceClassification.from_config(config).to(dtype)
    prefix = model.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in rm.backbone.state_dict().items()}
    state["score.weight"] = rm.head.weight.detach().to(dtype)  # [1, H]
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    path = Path(path)
    model.save_pretrained(path)  # safetensors is save_pretrained's default format
    tokenizer.save_pretrained(path)
    return bias


def export_checkpoint(checkpoint, out, *, drop_bias: bool = False) -> float:
    """export_reward_model of a pipeline checkpoint directory (RUN/checkpoints/rm*: the backbone,
    scalar_head.pt and the tokenizer). Returns the bias left out."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    if not (checkpoint / HEAD_FILE).is_file():
        raise FileNotFoundError(
            f"export_checkpoint: {checkpoint} has no {HEAD_FILE}: not a reward-model checkpoint "
            "(RUN_DIR/checkpoints/rm*)"
        )
    if Path(out).resolve() == checkpoint.resolve():
        raise ValueError(
            f"export_checkpoint: out is the checkpoint directory {checkpoint}; its files would be replaced"
        )
    rm = ScalarHeadModel.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return export_reward_model(rm, tokenizer, out, drop_bias=drop_bias)
