"""The arena: the seed papers' other RLHF methods on the same gold testbed, each from the same SFT
policy and the same preference data D (or the same proxy reward model) as PPO and RLP, so that one
report compares them all. Selected by name in run.stages (or all at once with run.stages=arena);
`run.stages=all` (the default) runs the RLP pipeline alone.

Each method is one entry of METHODS: stage name -> function(run, data, tokenizer, policy, rms, info)
that trains inside `run.stage(...)` (checkpointed and resumable like every stage) and returns the
policies it made, keyed by report name. Engineers adding a method add its function and entry here
and its recipe under rlp_engine/recipes (see ARCHITECTURE.md, "Adding an algorithm").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlp_engine.pipeline.run import Run

# stage name -> function(run, data, tokenizer, policy, rms, info) -> {policy name: model}
METHODS: dict[str, Callable] = {}


def arena_stage_names() -> tuple[str, ...]:
    return tuple(METHODS)


def run_arena(run: Run, data, tokenizer, policy, stages: set, policies: dict, rms: dict, info: dict) -> None:
    """Every arena method named in `stages`, in METHODS order, into `policies` (and `rms`, `info`)."""
    for name, method in METHODS.items():
        if name in stages:
            policies.update(method(run, data, tokenizer, policy, rms, info))
