"""The pipeline's data sets from a DataConfig: the embedded arithmetic task, with any part replaced
by a JSONL file; with task "none", everything comes from JSONL and there is no gold reward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlp_engine.data.jsonl import DataError, preference_rows, prompt_rows, sft_rows
from rlp_engine.data.records import Example, Preference
from rlp_engine.data.task import ArithmeticTask, gold_score

# The four data sets, in the order errors and counts list them.
DATASETS = ("sft", "preferences", "prompts", "eval")


@dataclass(frozen=True)
class Source:
    """Where one data set came from: a JSONL file (with each record's line) or the embedded task."""

    key: str  # the config key that chose it: "data.sft_path", or "data.num_sft" for the embedded task
    path: str | None = None  # the JSONL file; None for the embedded task
    lines: tuple[int, ...] = ()  # line of each record in `path`

    @property
    def name(self) -> str:
        """The file, or the data set of the embedded task (for errors about the whole set)."""
        return self.path if self.path is not None else f"{self.key} (embedded arithmetic task)"

    def where(self, i: int) -> str:
        """Record i as an error names it: "file:line", or "data.num_sft (embedded ...) record 3"."""
        if self.path is None:
            return f"{self.name} record {i + 1}"
        return f"{self.path}:{self.lines[i]}"


@dataclass
class TaskData:
    sft: list[Example]  # demonstrations (stage 1)
    preferences: list[Preference]  # D (stages 2 and 5)
    prompts: list[str]  # unlabeled prompts (PPO and P)
    eval_prompts: list[str]  # held out
    gold: Callable[[str, str], float] | None  # gold reward, when the task has one
    task: ArithmeticTask | None = None
    sources: dict[str, Source] = field(default_factory=dict)  # keyed by DATASETS

    def texts(self) -> list[str]:
        """Every string in the data (to train a tokenizer on)."""
        out = [e.prompt + e.response for e in self.sft]
        out += [p.prompt + p.chosen + p.rejected for p in self.preferences]
        return out + self.prompts + self.eval_prompts

    def records(self, name: str) -> list:
        """The records of data set `name` (one of DATASETS)."""
        return {
            "sft": self.sft,
            "preferences": self.preferences,
            "prompts": self.prompts,
            "eval": self.eval_prompts,
        }[name]


# Per data set: its path key, the embedded task's size key, and the JSONL reader.
_FILES = {
    "sft": ("sft_path", "num_sft", sft_rows),
    "preferences": ("pref_path", "num_pref", preference_rows),
    "prompts": ("prompts_path", "num_unlabeled", prompt_rows),
    "eval": ("eval_path", "num_eval", prompt_rows),
}


def _read(cfg, name: str) -> tuple[list, Source]:
    path_key, _, reader = _FILES[name]
    path = getattr(cfg, path_key)
    rows = reader(path)
    return [r for _, r in rows], Source(f"data.{path_key}", str(path), tuple(n for n, _ in rows))


def build_data(cfg, seed: int = 0) -> TaskData:
    """TaskData for `cfg` (DataConfig). JSONL paths replace the generated parts."""
    if cfg.task == "none":
        missing = [f"data.{_FILES[n][0]}" for n in DATASETS if getattr(cfg, _FILES[n][0]) is None]
        if missing:
            raise DataError(f"data.task=none needs JSONL files for: {', '.join(missing)}")
    task = None if cfg.task == "none" else ArithmeticTask(max_operand=cfg.max_operand, seed=seed)
    generate = {
        "sft": lambda: task.sft_examples(cfg.num_sft, cfg.sft_noise, seed),
        "preferences": lambda: task.preferences(cfg.num_pref, cfg.label_noise, seed),
        "prompts": lambda: task.unlabeled_prompts(cfg.num_unlabeled, seed),
        "eval": lambda: task.eval_prompts(cfg.num_eval),
    }
    sets, sources = {}, {}
    for name in DATASETS:
        path_key, size_key, _ = _FILES[name]
        if getattr(cfg, path_key) is not None:
            sets[name], sources[name] = _read(cfg, name)
        else:
            sets[name], sources[name] = generate[name](), Source(f"data.{size_key}")
    return TaskData(
        sets["sft"],
        sets["preferences"],
        sets["prompts"],
        sets["eval"],
        gold=None if task is None else gold_score,
        task=task,
        sources=sources,
    )
