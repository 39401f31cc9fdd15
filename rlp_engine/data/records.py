"""Plain records the stages exchange: a prompt with a response, and a preference pair."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A prompt and a response (a demonstration, or a policy sample)."""

    prompt: str
    response: str


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred (`chosen`, y_w) and a dispreferred (`rejected`, y_l) response."""

    prompt: str
    chosen: str
    rejected: str
