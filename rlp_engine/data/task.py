"""The embedded default task: integer addition ("12+7=" -> "19") with a known gold reward.

Everything the pipeline needs comes from it: noisy SFT demonstrations (so SFT stays imperfect),
"human" preferences from a simulated annotator (the gold reward plus label noise), unlabeled
prompts for PPO and for P, and held-out evaluation prompts (disjoint operand pairs). The proxy
reward model only ever sees the annotator's labels, never `gold_score`. The final answer is the
leading integer of a response, which gives RLP-SPG its exact-match equivalence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlp_engine.data.records import Example, Preference

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
        out = []
        for p in self._train_prompts(n, rng):
            ans = eval_prompt(p)
            out.append(Example(p, _corrupt(ans, rng) if rng.random() < noise else str(ans)))
        return out

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
            y1, y2 = self.candidate(p, rng), self.candidate(p, rng)
            if y1 == y2:
                continue
            g1, g2 = gold_score(p, y1), gold_score(p, y2)
            first = rng.random() < 0.5 if g1 == g2 else g1 > g2
            if rng.random() < label_noise:
                first = not first
            out.append(Preference(p, y1, y2) if first else Preference(p, y2, y1))
        return out

    def unlabeled_prompts(self, n: int, seed: int) -> list[str]:
        return self._train_prompts(n, random.Random(seed * 7919 + 3))

    def eval_prompts(self, n: int) -> list[str]:
        pairs = self.eval_pairs[: min(n, len(self.eval_pairs))]
        return [self.prompt(a, b) for a, b in pairs]
