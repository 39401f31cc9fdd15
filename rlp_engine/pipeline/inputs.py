"""All the input work of a run that can fail, done before the run writes anything.

`prepare_inputs(cfg)` checks the limits and the paths the config names, reads the data, loads the
tokenizer, applies data.long_prompts (with counts), and loads the policy; a bad input stops it with
one error (ConfigError, DataError, ModelError or FileNotFoundError, see INPUT_ERRORS) naming the
key, file and line, before the pipeline creates its output directory.

This module imports neither torch nor transformers at import time (8 s here): `check_paths` runs
from the CLI first, so a mistyped model.path fails in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rlp_engine.config import ConfigError
from rlp_engine.data.build import DATASETS, Source, TaskData, build_data
from rlp_engine.data.jsonl import DataError
from rlp_engine.models.paths import ModelError, resolve_model_path

# The errors prepare_inputs raises for bad input: the CLI prints them on one line and exits with 2.
INPUT_ERRORS = (ConfigError, DataError, ModelError, FileNotFoundError)

# The config keys of the JSONL files, per data set.
PATH_KEYS = {"sft": "sft_path", "preferences": "pref_path", "prompts": "prompts_path", "eval": "eval_path"}


@dataclass
class Inputs:
    data: TaskData  # after data.long_prompts: dropped records are gone
    tokenizer: object  # pad token set (pad = eos when the tokenizer had none), left padding
    policy: object  # torch.nn.Module, on the CPU: the pipeline moves it to run.device
    counts: dict[str, dict[str, int]]  # {"sft": {"truncated": 3, "dropped": 0}, ...} per DATASETS


def check_limits(data_cfg) -> None:
    """The token limits the batches are cut to: at least one token each."""
    for key in ("max_prompt_tokens", "max_response_tokens"):
        value = getattr(data_cfg, key)
        if value < 1:
            raise ConfigError(f"data.{key}: must be at least 1, got {value}")


def check_paths(cfg) -> None:
    """Every JSONL file and the model directory that `cfg` (TrainConfig) names exist. Cheap: no
    file is read and nothing heavy is imported."""
    for name in DATASETS:
        key = PATH_KEYS[name]
        path = getattr(cfg.data, key)
        if path is not None and not Path(path).is_file():
            why = "is not a file" if Path(path).exists() else "does not exist"
            raise DataError(f"data.{key}: {path} {why}")
    if cfg.model.path is not None:
        resolve_model_path(cfg.model)


def prompt_lengths(tokenizer, prompts: list[str], chat_template: bool) -> list[int]:
    """Token count of each prompt as the batches tokenise it (engine.batch.tokenize_prompts). Each
    distinct prompt is tokenised once: the embedded task repeats a few hundred prompts thousands
    of times."""
    from rlp_engine.data.batch import tokenize_prompts

    unique = list(dict.fromkeys(prompts))
    ids = tokenize_prompts(tokenizer, unique, chat_template)
    length = {p: len(i) for p, i in zip(unique, ids)}
    return [length[p] for p in prompts]


def long_prompt_rule(
    lengths: list[int], max_tokens: int, policy: str, source: Source
) -> tuple[list[int], int, int]:
    """(indices of the records kept, truncated count, dropped count) under data.long_prompts =
    `policy` for prompts of `lengths` tokens. "truncate" keeps every record (the batches keep the
    last `max_tokens` tokens of a long prompt); "drop" skips the long ones; "error" raises DataError
    naming the first one's file and line. DataError when nothing is left."""
    if policy not in ("truncate", "drop", "error"):
        raise ConfigError(f"data.long_prompts: {policy!r} is not one of ('truncate', 'drop', 'error')")
    keep, truncated, dropped = [], 0, 0
    for i, n in enumerate(lengths):
        if n <= max_tokens:
            keep.append(i)
        elif policy == "error":
            raise DataError(
                f"{source.where(i)}: prompt of {n} tokens is longer than data.max_prompt_tokens="
                f"{max_tokens} (data.long_prompts=error; 'truncate' keeps its last {max_tokens} tokens, "
                "'drop' skips it)"
            )
        elif policy == "drop":
            dropped += 1
        else:
            truncated += 1
            keep.append(i)
    if lengths and not keep:
        raise DataError(
            f"{source.name}: all {len(lengths)} prompts are longer than data.max_prompt_tokens="
            f"{max_tokens} and data.long_prompts=drop dropped them all: nothing is left"
        )
    return keep, truncated, dropped


def apply_long_prompts(data: TaskData, tokenizer, data_cfg) -> tuple[TaskData, dict[str, dict[str, int]]]:
    """`data` with data.long_prompts applied to the prompts of every data set, and the counts
    {name: {"truncated": t, "dropped": d}} per DATASETS. DataError naming the file (or the config key
    of the embedded task) for an empty data set."""
    sets, sources, counts = {}, {}, {}
    for name in DATASETS:
        records = data.records(name)
        source = data.sources.get(name, Source(f"data.{name}"))
        if not records:
            raise DataError(f"{source.name}: the {name} data set is empty")
        prompts = [r if isinstance(r, str) else r.prompt for r in records]
        lengths = prompt_lengths(tokenizer, prompts, data_cfg.chat_template)
        keep, truncated, dropped = long_prompt_rule(
            lengths, data_cfg.max_prompt_tokens, data_cfg.long_prompts, source
        )
        sets[name] = [records[i] for i in keep]
        if source.path is not None:
            source = replace(source, lines=tuple(source.lines[i] for i in keep))
        sources[name] = source
        counts[name] = {"truncated": truncated, "dropped": dropped}
    kept = replace(
        data,
        sft=sets["sft"],
        preferences=sets["preferences"] if data.preferences else [],
        pref_prompts=[] if data.preferences else sets["preferences"],
        prompts=sets["prompts"],
        eval_prompts=sets["eval"],
        sources=sources,
    )
    return kept, counts


def prepare_inputs(cfg) -> Inputs:
    """Everything a run reads, checked and loaded, for `cfg` (TrainConfig); raises one of
    INPUT_ERRORS on bad input. Order: cheap checks first (limits, paths), then data, tokenizer,
    the long-prompt rule, and last the policy (the slow part). Random state: the tiny policy's
    initialisation draws from torch's global generator, so seed before calling this."""
    check_limits(cfg.data)
    check_paths(cfg)
    data = build_data(cfg.data, seed=cfg.run.seed)
    from rlp_engine.models.loading import load_policy, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, data.texts())
    data, counts = apply_long_prompts(data, tokenizer, cfg.data)
    policy = load_policy(cfg.model, tokenizer)
    return Inputs(data, tokenizer, policy, counts)
