"""Scalar-head models (reward model, critic) and the RLP-UML Gaussian encoder.

A `ScalarHeadModel` is an HF backbone (the causal LM's base model, without its LM head) plus a
linear head on the last hidden state: per-token values for the critic, and the reward read at the
last non-pad token for the reward model. The reward model is initialised from the SFT policy plus a
fresh head; the critic from the reward model (head included).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

HEAD_FILE = "scalar_head.pt"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them. [B, T] int64."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (rows are left-padded prompt + response). [B]"""
    t = attention_mask.shape[-1]
    ar = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.zeros_like(ar)).amax(-1)


class ScalarHeadModel(nn.Module):
    """backbone (HF base model) + Linear(hidden, 1). Also the home of the UML encoder when attached."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.encoder: GaussianEncoder | None = None

    @classmethod
    def from_causal_lm(cls, lm: nn.Module) -> ScalarHeadModel:
        """A deep copy of `lm`'s base model plus a fresh scalar head."""
        backbone = copy.deepcopy(lm.base_model)
        return cls(backbone, lm.config.hidden_size)

    # Every public method goes through `forward` (self(...)): under FSDP2 that call is what gathers
    # the root's parameters (embeddings, final norm, head), so no weight is read outside it.
    OUTPUTS = ("hidden", "values", "final_hidden", "score")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output: str = "values"):
        """output: "hidden" [B, T, H], "values" [B, T] fp32, "final_hidden" [B, H] or "score" [B] fp32."""
        if output not in self.OUTPUTS:
            raise ValueError(f"ScalarHeadModel: output must be one of {self.OUTPUTS}, got {output!r}")
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)
        )
        h = out.last_hidden_state  # [B, T, H]
        if output == "hidden":
            return h
        # values and score are returned as fresh tensors (clone: [B, T] or [B], cheap), not views of
        # the head's [.., 1] output: FSDP2 hooks its backward onto a forward's outputs, and an
        # in-place op on a returned view would bypass that hook (FSDP2 warns about views).
        if output == "values":
            return self.head(h).squeeze(-1).float().clone()
        idx = last_token_index(attention_mask)
        last = h[torch.arange(h.shape[0], device=h.device), idx]  # [B, H]
        if output == "final_hidden":
            return last
        return self.head(last).squeeze(-1).float().clone()

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, H]."""
        return self(input_ids, attention_mask, output="hidden")

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-position scalar outputs [B, T] (fp32)."""
        return self(input_ids, attention_mask, output="values")

    def final_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state at each row's last real token [B, H]."""
        return self(input_ids, attention_mask, output="final_hidden")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward per sequence, read at the last real token [B] (fp32)."""
        return self(input_ids, attention_mask, output="score")

    def save_pretrained(self, directory: str | Path) -> None:
        """HF format for the backbone (save_pretrained) plus the head (and encoder) state dict."""
        directory = Path(directory)
        self.backbone.save_pretrained(directory)
        extra = {"head": self.head.state_dict()}
        if self.encoder is not None:
            extra["encoder"] = self.encoder.state_dict()
            (directory / "encoder.json").write_text(json.dumps(self.encoder.dims))
        torch.save(extra, directory / HEAD_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ScalarHeadModel:
        from transformers import AutoModel

        directory = Path(directory)
        backbone = AutoModel.from_pretrained(directory)
        model = cls(backbone, backbone.config.hidden_size)
        state = torch.load(directory / HEAD_FILE, weights_only=True)
        model.head.load_state_dict(state["head"])
        if "encoder" in state:
            dims = json.loads((directory / "encoder.json").read_text())
            model.encoder = GaussianEncoder(**dims)
            model.encoder.load_state_dict(state["encoder"])
        return model


class GaussianEncoder(nn.Module):
    """RLP-UML's stochastic encoder and MI critic.

    mu, logvar: two small MLPs on the reward model's final hidden state, giving N(mu, sigma^2) [N, D].
    critic(z1, z2): a separable critic T = <g(z1), g(z2)> / sqrt(D) scoring pairs of views [N], or
    every pair at once [N, M] (critic_matrix: one matmul, the all-pairs negatives of L_M).
    """

    def __init__(self, hidden_size: int, latent_dim: int):
        super().__init__()
        self.dims = {"hidden_size": hidden_size, "latent_dim": latent_dim}
        self.mu = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, latent_dim)
        )
        self.logvar = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, latent_dim)
        )
        self.proj = nn.Linear(latent_dim, latent_dim)
        self.scale = latent_dim**-0.5

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, H] -> (mu [N, D], logvar [N, D]), fp32."""
        h = h.float()
        return self.mu(h), self.logvar(h).clamp(-8.0, 8.0)

    def critic(self, z1: torch.Tensor, z2: torch.Tensor, all_pairs: bool = False) -> torch.Tensor:
        """Scores of latents z1 [N, D], z2 [M, D]: [N] for the row-aligned pairs (M = N), or with
        all_pairs the [N, M] matrix of every pair, one matmul g(z1) @ g(z2).T (the `critic_matrix` of
        ops.multiview_ib_loss). One method for both: FSDP2 registers it as a forward method."""
        g1, g2 = self.proj(z1), self.proj(z2)
        if all_pairs:
            return (g1 @ g2.T) * self.scale
        return (g1 * g2).sum(-1) * self.scale

    def critic_matrix(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """[N, M] scores of every pair (z1[i], z2[j]); goes through `critic` (see there)."""
        return self.critic(z1, z2, all_pairs=True)
