"""Bradley-Terry reward modelling math, scoring and accuracy (the base of RLP's refinements).
The loop that trains a reward model is rlp_engine/recipes/reward.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlp_engine.data.batch import SeqBatch, make_batch
from rlp_engine.data.records import Preference
from rlp_engine.models.heads import ScalarHeadModel


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss mean(-log sigmoid(r(x, y_w) - r(x, y_l))) over pairs [N] -> scalar."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(rm: ScalarHeadModel, batch: SeqBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [n], r_rejected [n]) from a data.batch.PairData batch in one forward pass."""
    r = rm.score(batch.input_ids, batch.attention_mask)
    n = r.shape[0] // 2
    return r[:n], r[n:]


@torch.no_grad()
def score_texts(
    rm: ScalarHeadModel, tokenizer, prompts: list[str], responses: list[str], data_cfg, batch_size: int = 256
) -> torch.Tensor:
    """Reward of each (prompt, response) [N] fp32, on CPU."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        b = make_batch(tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], data_cfg).to(
            device
        )
        out.append(rm.score(b.input_ids, b.attention_mask).cpu())
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def preference_accuracy(rm: ScalarHeadModel, tokenizer, pairs: list[Preference], data_cfg) -> float:
    """Share of pairs where r(chosen) > r(rejected) (ties count one half); NaN for no pairs."""
    if not pairs:
        return float("nan")
    prompts = [p.prompt for p in pairs]
    r_w = score_texts(rm, tokenizer, prompts, [p.chosen for p in pairs], data_cfg)
    r_l = score_texts(rm, tokenizer, prompts, [p.rejected for p in pairs], data_cfg)
    return float(((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean())
