"""JSONL readers for the pipeline's data. Every error names the file and the line.

Accepted record forms:
- demonstrations: {"instruction", "input"?, "output"} (Alpaca) or {"prompt", "response"};
- preferences: {"instruction", "input"?, "output_1", "output_2", "preference": 1|2} (AlpacaFarm)
  or {"prompt", "chosen", "rejected"};
- unlabeled prompts: {"instruction", "input"?} or {"prompt"}.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlp_engine.data.records import Example, Preference

# Alpaca's prompt template (AlpacaFarm uses the same one).
_TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """Malformed data; the message starts with "file:line:"."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in obj else type(value).__name__
        raise DataError(f"{where}: field {key!r} must be a string ({got})")
    return value


def format_prompt(obj: dict, where: str) -> str:
    """The prompt text of a record: "prompt" as is, else the Alpaca template over instruction/input."""
    if "prompt" in obj:
        return _text(obj, "prompt", where)
    instruction = _text(obj, "instruction", where)
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string ({type(extra).__name__})")
    if extra:
        return _TEMPLATE_INPUT.format(instruction=instruction, input=extra)
    return _TEMPLATE.format(instruction=instruction)


def read_sft(path: str | Path) -> list[Example]:
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        key = "response" if "prompt" in obj else "output"
        out.append(Example(format_prompt(obj, where), _text(obj, key, where)))
    return out


def read_preferences(path: str | Path) -> list[Preference]:
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = format_prompt(obj, where)
        if "chosen" in obj or "rejected" in obj:
            out.append(Preference(prompt, _text(obj, "chosen", where), _text(obj, "rejected", where)))
            continue
        y1, y2 = _text(obj, "output_1", where), _text(obj, "output_2", where)
        pref = obj.get("preference")
        if pref not in (1, 2) or isinstance(pref, bool):
            raise DataError(f"{where}: field 'preference' must be 1 or 2, got {pref!r}")
        out.append(Preference(prompt, y1, y2) if pref == 1 else Preference(prompt, y2, y1))
    return out


def read_prompts(path: str | Path) -> list[str]:
    return [format_prompt(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl(path)]
