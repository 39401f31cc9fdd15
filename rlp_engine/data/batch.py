"""Token batches: left-padded prompts followed by right-padded responses.

Layout of a `SeqBatch` [B, P+R]: prompt tokens right-aligned in the first P columns (left padding,
as generation needs), response tokens left-aligned in the last R columns, each response ending in
eos unless truncated. `response_mask` [B, R] marks response tokens (eos included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # (B, P+R) int64
    attention_mask: torch.Tensor  # (B, P+R) int64, 1 on real tokens
    response_mask: torch.Tensor  # (B, R) float32, 1 on response tokens

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_len

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> SeqBatch:
        return SeqBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx])

    def to(self, device) -> SeqBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
        )

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize_prompts(tokenizer, prompts: list[str], chat_template: bool = False) -> list[list[int]]:
    """Token ids per prompt, whole (optionally through the chat template). The one place prompts
    are tokenised: `encode_prompts` cuts these, and data/prepare.py measures them for
    data.long_prompts, so the prompts it counts as truncated are exactly the ones cut here."""
    if not prompts:
        return []
    if not chat_template:
        return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding (a Mapping, not a dict); older versions a list
        out.append(list(ids["input_ids"] if isinstance(ids, Mapping) else ids))
    return out


def encode_prompts(
    tokenizer, prompts: list[str], max_tokens: int, chat_template: bool = False
) -> list[list[int]]:
    """Token ids per prompt, the last `max_tokens` when longer (the end of a prompt is next to the
    response). data.long_prompts="truncate" relies on this cut; "drop"/"error" remove long prompts
    before training (data/prepare.py), so the cut then only meets prompts given directly."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens (data.max_prompt_tokens) must be >= 1, got {max_tokens}")
    return [ids[-max_tokens:] for ids in tokenize_prompts(tokenizer, prompts, chat_template)]


def encode_responses(tokenizer, responses: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids per response plus eos, truncated to `max_tokens` (eos dropped when truncated)."""
    eos = tokenizer.eos_token_id
    return [(tokenizer(r, add_special_tokens=False)["input_ids"] + [eos])[:max_tokens] for r in responses]


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def join(prompt_ids, prompt_mask, response_ids, response_mask) -> SeqBatch:
    """A SeqBatch from left-padded prompts [B, P] and right-padded responses [B, R]."""
    return SeqBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask.float(),
    )


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id; a clear error when it has none (load_tokenizer sets pad to eos)."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token: load it with "
            "rlp_engine.models.loading.load_tokenizer, which sets pad to eos"
        )
    return tokenizer.pad_token_id


def make_batch(tokenizer, prompts: list[str], responses: list[str], data_cfg) -> SeqBatch:
    """Tokenise prompt/response pairs into one SeqBatch (limits and chat template from `data_cfg`)."""
    pad = pad_id(tokenizer)
    p = encode_prompts(tokenizer, prompts, data_cfg.max_prompt_tokens, data_cfg.chat_template)
    r = encode_responses(tokenizer, responses, data_cfg.max_response_tokens)
    return join(*pad_left(p, pad), *pad_right(r, pad))


class Encoded:
    """Prompt/response pairs tokenised once; `batch(idx)` pads the selected rows into a SeqBatch."""

    def __init__(self, tokenizer, prompts: list[str], responses: list[str], data_cfg):
        self.pad_id = pad_id(tokenizer)
        self.prompts = encode_prompts(tokenizer, prompts, data_cfg.max_prompt_tokens, data_cfg.chat_template)
        self.responses = encode_responses(tokenizer, responses, data_cfg.max_response_tokens)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx) -> SeqBatch:
        idx = [int(i) for i in idx]
        p = pad_left([self.prompts[i] for i in idx], self.pad_id)
        r = pad_right([self.responses[i] for i in idx], self.pad_id)
        return join(*p, *r)


class PairData:
    """Preference pairs tokenised once: `batch(idx)` gives chosen rows then rejected rows [2n, T]
    (`pairs` holds .prompt, .chosen, .rejected: data.records.Preference)."""

    def __init__(self, tokenizer, pairs, data_cfg):
        prompts = [p.prompt for p in pairs]
        self.chosen = Encoded(tokenizer, prompts, [p.chosen for p in pairs], data_cfg)
        self.rejected = Encoded(tokenizer, prompts, [p.rejected for p in pairs], data_cfg)

    def __len__(self) -> int:
        return len(self.chosen)

    def batch(self, idx) -> SeqBatch:
        idx = [int(i) for i in idx]
        enc = self.chosen
        prompts = [enc.prompts[i] for i in idx] * 2
        responses = [self.chosen.responses[i] for i in idx] + [self.rejected.responses[i] for i in idx]
        return join(*pad_left(prompts, enc.pad_id), *pad_right(responses, enc.pad_id))
