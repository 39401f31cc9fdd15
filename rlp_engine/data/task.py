"""Embedded tasks with a known gold reward, and the interface a user's own task implements.

A task gives the pipeline everything it needs: demonstrations from an imperfect demonstrator (so SFT
stays imperfect), a simulated annotator (the gold reward plus label noise) that labels pairs of
responses, unlabeled prompts for PPO and for P, held-out evaluation prompts (disjoint from every
training prompt, drawn from the same distribution), and `gold(prompt, response) -> [0, 1]`. The proxy
reward model only ever sees the annotator's labels, never `gold`.

Two tasks ship (`data.task`):
- "reverse" (default): reverse a string of 3-5 digits ("4829>" -> "9284"). The demonstrator copies
  the digits instead of reversing them in a share `data.sft_noise` of its demonstrations (an
  instruction-following failure the SFT policy inherits). A tiny policy learns both behaviours for
  any digit string, so what RLHF teaches it (reverse, don't copy) carries to unseen prompts: PPO
  against the gold reward itself lifts held-out gold by about 0.3 (measured on seed 100).
- "arithmetic": integer addition ("12+7=" -> "19"). Kept for reference: a tiny policy memorises the
  sums of its training pairs rather than learning to add, so nothing RL teaches it carries to
  held-out operand pairs (PPO against gold: 0.589 -> 0.613 held-out vs 0.5 -> 0.68 on its own prompts).

A task of one's own: an object with the methods of `Task` below, returned by `make_task` (add a
branch there, or build `TaskData` directly with the records and `gold`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from rlp_engine.data.records import Example, Preference


class Task(Protocol):
    """What the pipeline asks of a task with a gold reward (see `ReverseTask` for one)."""

    def sft_examples(self, n: int, noise: float, seed: int) -> list[Example]: ...
    def preference_prompts(self, n: int, seed: int) -> list[str]: ...
    def unlabeled_prompts(self, n: int, seed: int) -> list[str]: ...
    def eval_prompts(self, n: int) -> list[str]: ...
    def gold(self, prompt: str, response: str) -> float: ...
    def answer(self, response: str) -> Hashable | None: ...
    def demonstrate(self, prompt: str, rng: random.Random, noise: float) -> str: ...


def annotate(
    gold: Callable[[str, str], float], prompt: str, y1: str, y2: str, label_noise: float, rng: random.Random
) -> Preference | None:
    """The simulated annotator: prefers the response with the higher gold score (a coin flip on a gold
    tie) and flips a share `label_noise` of its answers. None for two identical responses."""
    if y1 == y2:
        return None
    g1, g2 = gold(prompt, y1), gold(prompt, y2)
    first = rng.random() < 0.5 if g1 == g2 else g1 > g2
    if rng.random() < label_noise:
        first = not first
    return Preference(prompt, y1, y2) if first else Preference(prompt, y2, y1)


def label_pairs(
    task, prompts: list[str], pairs: list[tuple[str, str]], label_noise: float, seed: int
) -> list[Preference]:
    """AlpacaFarm's D: two responses per prompt labelled by the simulated annotator (identical pairs
    dropped)."""
    rng = random.Random(seed * 7919 + 5)
    out = [annotate(task.gold, p, a, b, label_noise, rng) for p, (a, b) in zip(prompts, pairs)]
    return [x for x in out if x is not None]


_ANSWER = re.compile(r"^\s*(-?\d+)")


def extract_answer(response: str) -> str | None:
    """The leading integer of a response ("19" from "19", " 19 apples"); None when there is none."""
    m = _ANSWER.match(response)
    return None if m is None else str(int(m.group(1)))


def digit_credit(pred: str, truth: str) -> float:
    """Share of right-aligned digit positions that agree, over the longer of the two numbers."""
    width = max(len(pred), len(truth))
    hits = sum(a == b for a, b in zip(pred.rjust(width), truth.rjust(width)))
    return hits / width


def gold_score(prompt: str, response: str) -> float:
    """Gold reward in [0, 1]: 1 for the exact answer and nothing else; 0.5 * digit credit for a
    wrong number; halved again when text follows the number; 0 when there is no number."""
    truth = str(eval_prompt(prompt))
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    score = 1.0 if pred == truth else 0.5 * digit_credit(pred, truth)
    if response.strip() != pred:
        score *= 0.5
    return score


def eval_prompt(prompt: str) -> int:
    a, b = prompt.rstrip("=").split("+")
    return int(a) + int(b)


def _corrupt(answer: int, rng: random.Random) -> str:
    """A plausible wrong response: one digit changed, an off-by-a-little sum, a random number,
    the answer with trailing junk, or no number at all."""
    kind = rng.random()
    text = str(answer)
    if kind < 0.4:
        i = rng.randrange(len(text))
        digit = str((int(text[i]) + rng.choice([1, 9])) % 10)
        out = (text[:i] + digit + text[i + 1 :]).lstrip("0") or "0"
    elif kind < 0.7:
        out = str(max(0, answer + rng.choice([-2, -1, 1, 2, 10, -10])))
    elif kind < 0.85:
        out = str(rng.randrange(0, 2 * answer + 10))
    elif kind < 0.95:
        out = text + rng.choice(["+1", "0", "=", "+"])
    else:
        out = rng.choice(["", "=", "+", "?"])
    return out if out != text else str(answer + 1)


def reverse_credit(truth: str, response: str) -> float:
    """Gold for the reverse task: 1 for the exact reversal; else half the share of positions that
    agree (over the longer string); 0 for an empty response."""
    r = response.strip()
    if not r:
        return 0.0
    if r == truth:
        return 1.0
    return 0.5 * sum(a == b for a, b in zip(truth, r)) / max(len(truth), len(r))


@dataclass
class ReverseTask:
    """Reverse a digit string: "4829>" -> "9284". Prompts are 3-5 random digits; the first
    `num_eval` distinct strings of a seeded stream are the held-out evaluation prompts and are never
    used for training (same distribution, disjoint)."""

    seed: int = 0
    min_len: int = 3
    max_len: int = 5
    num_eval: int = 256

    def __post_init__(self) -> None:
        rng = random.Random(self.seed * 7919 + 11)
        held: dict[str, None] = {}
        while len(held) < self.num_eval:
            held[self._digits(rng) + ">"] = None
        self._eval = list(held)
        self._eval_set = set(held)

    def _digits(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(self.min_len, self.max_len)))

    def _train_prompts(self, n: int, rng: random.Random) -> list[str]:
        out = []
        while len(out) < n:
            p = self._digits(rng) + ">"
            if p not in self._eval_set:
                out.append(p)
        return out

    @staticmethod
    def truth(prompt: str) -> str:
        return prompt.rstrip(">")[::-1]

    def gold(self, prompt: str, response: str) -> float:
        return reverse_credit(self.truth(prompt), response)

    def answer(self, response: str) -> Hashable | None:
        return response.strip() or None

    def demonstrate(self, prompt: str, rng: random.Random, noise: float) -> str:
        """The demonstrator: the reversal, or (with probability `noise`) a copy of the digits."""
        return prompt.rstrip(">") if rng.random() < noise else self.truth(prompt)

    def sft_examples(self, n: int, noise: float, seed: int) -> list[Example]:
        rng = random.Random(seed * 7919 + 1)
        return [Example(p, self.demonstrate(p, rng, noise)) for p in self._train_prompts(n, rng)]

    def preference_prompts(self, n: int, seed: int) -> list[str]:
        return self._train_prompts(n, random.Random(seed * 7919 + 2))

    def unlabeled_prompts(self, n: int, seed: int) -> list[str]:
        return self._train_prompts(n, random.Random(seed * 7919 + 3))

    def eval_prompts(self, n: int) -> list[str]:
        return self._eval[:n]


@dataclass
class ArithmeticTask:
    """Addition of operands in [0, max_operand]; operand pairs are split into train and eval sets."""

    max_operand: int = 20
    seed: int = 0
    eval_share: float = 0.15

    def __post_init__(self) -> None:
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(pairs)
        n_eval = max(1, int(len(pairs) * self.eval_share))
        self.eval_pairs = pairs[:n_eval]
        self.train_pairs = pairs[n_eval:]

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    def _train_prompts(self, n: int, rng: random.Random) -> list[str]:
        return [self.prompt(*rng.choice(self.train_pairs)) for _ in range(n)]

    def sft_examples(self, n: int, noise: float, seed: int) -> list[Example]:
        """Demonstrations; a share `noise` of them carry a corrupted answer."""
        rng = random.Random(seed * 7919 + 1)
        return [Example(p, self.demonstrate(p, rng, noise)) for p in self._train_prompts(n, rng)]

    def candidate(self, prompt: str, rng: random.Random) -> str:
        """A response as an imperfect model might write it (correct about a third of the time)."""
        ans = eval_prompt(prompt)
        return str(ans) if rng.random() < 0.35 else _corrupt(ans, rng)

    def preferences(self, n: int, label_noise: float, seed: int) -> list[Preference]:
        """Pairs labelled by a simulated annotator: prefers the higher gold score (ties: coin flip)
        and flips a share `label_noise` of its answers."""
        rng = random.Random(seed * 7919 + 2)
        out = []
        while len(out) < n:
            p = self._train_prompts(1, rng)[0]
            pair = annotate(gold_score, p, self.candidate(p, rng), self.candidate(p, rng), label_noise, rng)
            if pair is not None:  # identical candidates give no pair
                out.append(pair)
        return out

    def unlabeled_prompts(self, n: int, seed: int) -> list[str]:
        return self._train_prompts(n, random.Random(seed * 7919 + 3))

    def preference_prompts(self, n: int, seed: int) -> list[str]:
        return self._train_prompts(n, random.Random(seed * 7919 + 4))

    def eval_prompts(self, n: int) -> list[str]:
        pairs = self.eval_pairs[: min(n, len(self.eval_pairs))]
        return [self.prompt(a, b) for a, b in pairs]

    def gold(self, prompt: str, response: str) -> float:
        return gold_score(prompt, response)

    def answer(self, response: str) -> Hashable | None:
        return extract_answer(response)

    def demonstrate(self, prompt: str, rng: random.Random, noise: float) -> str:
        ans = eval_prompt(prompt)
        return _corrupt(ans, rng) if rng.random() < noise else str(ans)


TASKS = {"reverse": ReverseTask, "arithmetic": ArithmeticTask}


def make_task(data_cfg, seed: int = 0) -> Task | None:
    """The embedded task `data_cfg.task` names ("reverse", "arithmetic"; None for "none")."""
    if data_cfg.task == "none":
        return None
    if data_cfg.task == "arithmetic":
        return ArithmeticTask(max_operand=data_cfg.max_operand, seed=seed)
    return ReverseTask(seed=seed, num_eval=max(data_cfg.num_eval, 1))
