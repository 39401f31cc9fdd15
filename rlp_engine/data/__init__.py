"""Data for the pipeline: records, the embedded arithmetic task, JSONL readers."""

from rlp_engine.data.jsonl import (
    DataError,
    format_prompt,
    read_jsonl,
    read_preferences,
    read_prompts,
    read_sft,
)
from rlp_engine.data.records import Example, Preference
from rlp_engine.data.task import ArithmeticTask, extract_answer, gold_score

__all__ = [
    "ArithmeticTask",
    "DataError",
    "Example",
    "Preference",
    "extract_answer",
    "format_prompt",
    "gold_score",
    "read_jsonl",
    "read_preferences",
    "read_prompts",
    "read_sft",
]
