"""JSONL readers for the pipeline's data. Every error names the file and the line.

Accepted record forms:
- demonstrations: {"instruction", "input"?, "output"} (Alpaca) or {"prompt", "response"};
- preferences: {"instruction", "input"?, "output_1", "output_2", "preference": 1|2} (AlpacaFarm)
  or {"prompt", "chosen", "rejected"};
- unlabeled prompts: {"instruction", "input"?} or {"prompt"}.

`read_*` return the records; `*_rows` return (line number, record) pairs, so that a later check (a
prompt too long for data.max_prompt_tokens) can still name the line.
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

# The accepted forms per kind of record, as the errors about missing fields spell them.
SFT_FORMS = '{"prompt", "response"} or {"instruction", "input"?, "output"}'
PREFERENCE_FORMS = (
    '{"prompt", "chosen", "rejected"} or {"instruction", "input"?, "output_1", "output_2", "preference"}'
)
PROMPT_FORMS = '{"prompt"} or {"instruction", "input"?}'


class DataError(ValueError):
    """Bad input data; the message names the file and line (or the config key) it comes from."""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises DataError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    rows = []
    with path.open("rb") as f:  # bytes, so that a bad UTF-8 sequence is reported with its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})"
                ) from err
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
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return rows


def _require(obj: dict, keys: tuple[str, ...], where: str, kind: str, forms: str) -> None:
    """DataError naming every missing field of `keys`, the accepted forms and the keys present."""
    missing = [k for k in keys if k not in obj]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise DataError(
            f"{where}: missing field {names} in a {kind} record; expected {forms}, got keys {sorted(obj)}"
        )


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in obj else type(value).__name__
        raise DataError(f"{where}: field {key!r} must be a string ({got})")
    return value


def format_prompt(obj: dict, where: str, kind: str = "prompt", forms: str = PROMPT_FORMS) -> str:
    """The prompt text of a record: "prompt" as is, else the Alpaca template over instruction/input."""
    if "prompt" in obj:
        return _text(obj, "prompt", where)
    _require(obj, ("instruction",), where, kind, forms)
    instruction = _text(obj, "instruction", where)
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string ({type(extra).__name__})")
    if extra:
        return _TEMPLATE_INPUT.format(instruction=instruction, input=extra)
    return _TEMPLATE.format(instruction=instruction)


def sft_rows(path: str | Path) -> list[tuple[int, Example]]:
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        key = "response" if "prompt" in obj else "output"
        prompt = format_prompt(obj, where, "demonstration", SFT_FORMS)
        _require(obj, (key,), where, "demonstration", SFT_FORMS)
        out.append((lineno, Example(prompt, _text(obj, key, where))))
    return out


def preference_rows(path: str | Path) -> list[tuple[int, Preference]]:
    out = []
    for lineno, obj in read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt = format_prompt(obj, where, "preference", PREFERENCE_FORMS)
        if "chosen" in obj or "rejected" in obj:
            _require(obj, ("chosen", "rejected"), where, "preference", PREFERENCE_FORMS)
            pair = Preference(prompt, _text(obj, "chosen", where), _text(obj, "rejected", where))
            out.append((lineno, pair))
            continue
        _require(obj, ("output_1", "output_2", "preference"), where, "preference", PREFERENCE_FORMS)
        y1, y2 = _text(obj, "output_1", where), _text(obj, "output_2", where)
        pref = obj.get("preference")
        if pref not in (1, 2) or isinstance(pref, bool):
            raise DataError(f"{where}: field 'preference' must be 1 or 2, got {pref!r}")
        out.append((lineno, Preference(prompt, y1, y2) if pref == 1 else Preference(prompt, y2, y1)))
    return out


def prompt_rows(path: str | Path) -> list[tuple[int, str]]:
    return [(lineno, format_prompt(obj, f"{path}:{lineno}")) for lineno, obj in read_jsonl(path)]


def read_sft(path: str | Path) -> list[Example]:
    return [r for _, r in sft_rows(path)]


def read_preferences(path: str | Path) -> list[Preference]:
    return [r for _, r in preference_rows(path)]


def read_prompts(path: str | Path) -> list[str]:
    return [r for _, r in prompt_rows(path)]
