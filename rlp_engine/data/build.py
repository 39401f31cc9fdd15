"""The pipeline's data sets from a DataConfig: the embedded arithmetic task, with any part replaced
by a JSONL file; with task "none", everything comes from JSONL and there is no gold reward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rlp_engine.data.jsonl import DataError, read_preferences, read_prompts, read_sft
from rlp_engine.data.records import Example, Preference
from rlp_engine.data.task import ArithmeticTask, gold_score


@dataclass
class TaskData:
    sft: list[Example]  # demonstrations (stage 1)
    preferences: list[Preference]  # D (stages 2 and 5)
    prompts: list[str]  # unlabeled prompts (PPO and P)
    eval_prompts: list[str]  # held out
    gold: Callable[[str, str], float] | None  # gold reward, when the task has one
    task: ArithmeticTask | None = None

    def texts(self) -> list[str]:
        """Every string in the data (to train a tokenizer on)."""
        out = [e.prompt + e.response for e in self.sft]
        out += [p.prompt + p.chosen + p.rejected for p in self.preferences]
        return out + self.prompts + self.eval_prompts


def build_data(cfg, seed: int = 0) -> TaskData:
    """TaskData for `cfg` (DataConfig). JSONL paths replace the generated parts."""
    if cfg.task == "none":
        missing = [
            k for k in ("sft_path", "pref_path", "prompts_path", "eval_path") if getattr(cfg, k) is None
        ]
        if missing:
            raise DataError(
                f"data.task=none needs JSONL files for: {', '.join('data.' + m for m in missing)}"
            )
        return TaskData(
            read_sft(cfg.sft_path),
            read_preferences(cfg.pref_path),
            read_prompts(cfg.prompts_path),
            read_prompts(cfg.eval_path),
            gold=None,
        )
    task = ArithmeticTask(max_operand=cfg.max_operand, seed=seed)
    sft = read_sft(cfg.sft_path) if cfg.sft_path else task.sft_examples(cfg.num_sft, cfg.sft_noise, seed)
    prefs = (
        read_preferences(cfg.pref_path)
        if cfg.pref_path
        else task.preferences(cfg.num_pref, cfg.label_noise, seed)
    )
    prompts = (
        read_prompts(cfg.prompts_path)
        if cfg.prompts_path
        else task.unlabeled_prompts(cfg.num_unlabeled, seed)
    )
    evals = read_prompts(cfg.eval_path) if cfg.eval_path else task.eval_prompts(cfg.num_eval)
    return TaskData(sft, prefs, prompts, evals, gold=gold_score, task=task)
