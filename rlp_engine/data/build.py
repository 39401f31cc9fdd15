"""The pipeline's data sets from a DataConfig: an embedded task (data/task.py), with any part replaced
by a JSONL file; with task "none", everything comes from JSONL and there is no gold reward.

Preferences: with data.pref_source="policy" (AlpacaFarm, the default) D is made after SFT from two
SFT samples per prompt of `pref_prompts`, labelled by the task's simulated annotator; "task" takes
the task's own pair generator (arithmetic only); data.pref_path reads them from JSONL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from rlp_engine.data.jsonl import DataError, preference_rows, prompt_rows, sft_rows
from rlp_engine.data.records import Example, Preference
from rlp_engine.data.task import Task, make_task

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
    preferences: list[Preference]  # D (stages 2 and 5); empty until SFT with data.pref_source=policy
    prompts: list[str]  # unlabeled prompts (PPO and P)
    eval_prompts: list[str]  # held out
    gold: Callable[[str, str], float] | None  # gold reward, when the task has one
    task: Task | None = None
    sources: dict[str, Source] = field(default_factory=dict)  # keyed by DATASETS
    # data.pref_source=policy: the prompts whose two SFT samples the annotator labels into D
    pref_prompts: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        """Every string in the data (to train a tokenizer on)."""
        out = [e.prompt + e.response for e in self.sft]
        out += [p.prompt + p.chosen + p.rejected for p in self.preferences]
        return out + self.prompts + self.eval_prompts

    def records(self, name: str) -> list:
        """The records of data set `name` (one of DATASETS)."""
        return {
            "sft": self.sft,
            "preferences": self.preferences or self.pref_prompts,
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
    task = make_task(cfg, seed)
    from_policy = cfg.pref_source == "policy"
    if not from_policy and not hasattr(task, "preferences") and cfg.pref_path is None:
        raise DataError(f"data.pref_source=task: the {cfg.task} task has no pair generator; use policy")
    generate = {
        "sft": lambda: task.sft_examples(cfg.num_sft, cfg.sft_noise, seed),
        "preferences": lambda: (
            task.preference_prompts(cfg.num_pref, seed)
            if from_policy
            else task.preferences(cfg.num_pref, cfg.label_noise, seed)
        ),
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
    prefs = sets["preferences"]
    as_prompts = bool(prefs) and isinstance(prefs[0], str)  # D comes from the SFT policy later
    return TaskData(
        sets["sft"],
        [] if as_prompts else prefs,
        sets["prompts"],
        sets["eval"],
        gold=None if task is None else task.gold,
        task=task,
        sources=sources,
        pref_prompts=prefs if as_prompts else [],
    )
