"""evaluate_policies on tiny random Llama policies over a 14-token character vocabulary, with a gold
reward model (a test double that scores the decoded text by the gold reward) and its negation; the
figures checked against numpy recomputations from the same seeded samples; the win-rate on
hand-worked cases and of a reference against itself; the error paths."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlp_engine.algos.reward import preference_accuracy
from rlp_engine.config import load_config
from rlp_engine.data.records import Preference
from rlp_engine.data.task import eval_prompt, gold_score
from rlp_engine.models import ScalarHeadModel, tiny_llama
from rlp_engine.pipeline.evaluate import (
    evaluate_policies,
    evaluate_policy,
    gold_annotator,
    gold_pairs,
    reward_model_accuracy,
    sample_policy,
    win_rates,
)

PROMPTS = ["2+3=", "1+1=", "4+5=", "3+3=", "0+7=", "6+2=", "5+4=", "1+8="]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of "0123456789+=" plus <pad> and <eos>: every sampled token decodes
    to text that encodes back to the same tokens, so a reward model sees exactly the sampled response."""
    vocab = {c: i for i, c in enumerate("0123456789+=")}
    vocab.update({"<pad>": 12, "<eos>": 13})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def toy_gold(prompt: str, response: str) -> float:
    """1 for the exact answer, else 0.15 per digit in the response (at most 6 tokens: <= 0.9). Unlike
    the task's gold_score (0 for almost every random response) it rarely ties on random samples, so
    random policies give many gold-labelled pairs."""
    if response == str(eval_prompt(prompt)):
        return 1.0
    return 0.15 * sum(c.isdigit() for c in response)


class GoldRM(torch.nn.Module):
    """Reward model double: sign * toy_gold of the decoded (prompt, response) of each row."""

    def __init__(self, tokenizer, sign: float = 1.0):
        super().__init__()
        self.tok, self.sign = tokenizer, sign
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # score_texts reads the device from it

    def score(self, input_ids, attention_mask):
        out = []
        for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
            text = self.tok.decode([t for t, k in zip(ids, m) if k], skip_special_tokens=True)
            cut = text.index("=") + 1
            out.append(self.sign * toy_gold(text[:cut], text[cut:]))
        return torch.tensor(out)


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(preset="tiny")
    tok = char_tokenizer()
    p0 = tiny_llama(cfg.model, tok)  # different random weights: different samples
    p1 = tiny_llama(cfg.model, tok)
    eval_cfg = dataclasses.replace(cfg.eval, num_prompts=len(PROMPTS), samples_per_prompt=4, temperature=1.0)
    rms = {"gold_rm": GoldRM(tok), "anti_rm": GoldRM(tok, -1.0), "rm": ScalarHeadModel.from_causal_lm(p0)}
    return cfg, tok, p0, p1, eval_cfg, rms


HELDOUT = [
    Preference("2+3=", "5", "6"),
    Preference("4+4=", "8", "18"),
    Preference("1+2=", "3", "3+1"),
    Preference("9+9=", "17", "+"),
]


def per_prompt(ev, values):
    return np.array([np.mean(g) for g in ev.groups(values)], dtype=np.float64)


def se(x):
    return x.std(ddof=1) / np.sqrt(len(x))


def test_evaluate_policies_figures_against_numpy(setup):
    cfg, tok, p0, p1, eval_cfg, rms = setup
    reference = {p: ["12", "3"] for p in PROMPTS}  # a mediocre demonstrator: toy gold 0.3, 0.15
    rng_before = torch.get_rng_state()
    report = evaluate_policies(
        {"sft": p0, "ppo": p1, "ppo_twin": p1},
        rms,
        tok,
        PROMPTS,
        eval_cfg,
        cfg.data,
        toy_gold,
        reference=reference,
        proxy_of={"sft": "rm", "ppo": "gold_rm"},
        paired_against={"ppo_twin": "ppo"},
        heldout_pairs=HELDOUT,
        seed=7,
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # sampling seeded in a forked RNG
    json.dumps(report, allow_nan=False)
    assert set(report) == {"policies", "reward_models", "reference", "eval"}
    assert report["eval"] == {
        "n_prompts": 8,
        "samples_per_prompt": 4,
        "temperature": 1.0,
        "seed": 7,
        "baseline": "sft",
        "paired_against": {"ppo_twin": "ppo"},
    }
    pol = report["policies"]
    assert "diff_vs_sft" not in pol["sft"] and set(pol["ppo_twin"]) >= {"diff_vs_sft", "diff_vs_ppo"}
    assert pol["ppo"]["n_prompts"] == 8 and pol["ppo"]["samples_per_prompt"] == 4

    # The same seed gives the same samples as sample_policy: recompute every figure with numpy.
    e0 = sample_policy(p0, tok, PROMPTS, eval_cfg, cfg.data, toy_gold, seed=7)
    e1 = sample_policy(p1, tok, PROMPTS, eval_cfg, cfg.data, toy_gold, seed=7)
    g0, g1 = per_prompt(e0, e0.gold), per_prompt(e1, e1.gold)
    assert pol["sft"]["gold"] == pytest.approx(g0.mean()) and pol["sft"]["gold_se"] == pytest.approx(se(g0))
    assert pol["ppo"]["gold"] == pytest.approx(g1.mean()) and pol["ppo"]["gold_se"] == pytest.approx(se(g1))
    x1 = per_prompt(e1, [float(g == 1.0) for g in e1.gold])
    assert pol["ppo"]["exact"] == pytest.approx(x1.mean())
    d = pol["ppo"]["diff_vs_sft"]
    assert d["gold"] == pytest.approx((g1 - g0).mean()) and d["gold_se"] == pytest.approx(se(g1 - g0))
    assert d["n_prompts"] == 8
    # win-rate: sample j against reference j mod 2 (gold 0.3, 0.15): 100 won, 50 tied, 0 lost
    ref_gold = np.tile([0.3, 0.15], len(e1.gold) // 2)
    w0 = per_prompt(e0, 100 * ((e0.gold > ref_gold) + 0.5 * np.isclose(e0.gold, ref_gold)))
    w1 = per_prompt(e1, 100 * ((e1.gold > ref_gold) + 0.5 * np.isclose(e1.gold, ref_gold)))
    assert len(set(w1)) > 2  # the win-rate varies across prompts
    assert pol["ppo"]["win_rate"] == pytest.approx(w1.mean()) and pol["ppo"]["win_rate_se"] == pytest.approx(
        se(w1)
    )
    assert d["win_rate"] == pytest.approx((w1 - w0).mean()) and d["win_rate_se"] == pytest.approx(se(w1 - w0))
    assert report["reference"] == pytest.approx(
        {"gold": 0.225, "gold_se": 0.0, "exact": 0.0, "exact_se": 0.0, "n_prompts": 8}
    )
    # the twin is the same model under the same seed: identical samples, a zero paired difference
    twin = pol["ppo_twin"]["diff_vs_ppo"]
    assert twin["gold"] == 0.0 and twin["gold_se"] == 0.0 and twin["win_rate"] == 0.0
    # proxy reward: under the RM each policy was optimised against; gold_rm scores = gold
    assert pol["ppo"]["proxy_reward"] == pytest.approx(g1.mean(), abs=1e-6)
    assert pol["sft"]["proxy_reward"] == pol["sft"]["proxy_reward_by_rm"]["rm"]
    assert pol["ppo_twin"]["proxy_reward"] is None
    assert set(pol["sft"]["proxy_reward_by_rm"]) == {"gold_rm", "anti_rm", "rm"}

    rm = report["reward_models"]
    pairs = sum(len(gold_pairs(ev)) for ev in (e0, e1, e1))
    assert pairs > 10  # random policies disagree in gold often enough to be a real check
    for name, acc in (("gold_rm", 1.0), ("anti_rm", 0.0)):
        row = rm[name]
        assert row["on_policy_accuracy"] == {
            "sft": acc,
            "ppo": acc,
            "ppo_twin": acc,
            "all": acc,
            "pairs": pairs,
        }
        assert row["on_policy_accuracy_se"]["all"] == 0.0 and row["on_policy_pairs"]["all"] == pairs
        assert (
            row["offline_accuracy"] == acc and row["offline_accuracy_se"] == 0.0 and row["offline_pairs"] == 4
        )
        assert row["best_of"]["rate"] == acc and 0.0 < row["best_of"]["chance"] < 1.0
        assert row["best_of"]["n_prompts"] >= 6
    real = rm["rm"]
    assert 0.0 <= real["on_policy_accuracy"]["all"] <= 1.0 and real["on_policy_accuracy_se"]["all"] > 0.0
    assert 0.0 <= real["offline_accuracy"] <= 1.0


def test_on_policy_accuracy_of_a_real_rm_matches_the_pair_by_pair_path(setup):
    cfg, tok, p0, _, eval_cfg, rms = setup
    report = evaluate_policies(
        {"sft": p0}, {"rm": rms["rm"]}, tok, PROMPTS, eval_cfg, cfg.data, toy_gold, seed=3
    )
    ev = evaluate_policy(p0, tok, PROMPTS, eval_cfg, cfg.data, {"rm": rms["rm"]}, toy_gold, seed=3)
    old = reward_model_accuracy({"rm": rms["rm"]}, tok, {"sft": gold_pairs(ev)}, cfg.data)["rm"]
    row = report["reward_models"]["rm"]
    assert row["on_policy_pairs"]["sft"] == old["pairs"] and old["pairs"] > 0
    # clustered: accuracy per prompt (pair by pair through preference_accuracy), then over prompts
    per_prompt_acc = []
    for prompt in PROMPTS:
        pairs = [p for p in gold_pairs(ev) if p.prompt == prompt]
        if pairs:
            per_prompt_acc.append(preference_accuracy(rms["rm"], tok, pairs, cfg.data))
    acc = np.array(per_prompt_acc)
    assert len(set(acc)) > 1  # a random RM: right on some prompts, wrong on others
    assert row["on_policy_accuracy"]["sft"] == pytest.approx(acc.mean())
    assert row["on_policy_accuracy_se"]["sft"] == pytest.approx(se(acc))
    assert row["on_policy_prompts"]["sft"] == len(acc)
    assert report["policies"]["sft"]["gold"] == pytest.approx(ev.summary()["gold"])
    assert report["policies"]["sft"]["proxy_reward_by_rm"]["rm"] == pytest.approx(ev.proxy["rm"], abs=1e-6)
    assert report["reference"] is None and report["policies"]["sft"]["win_rate"] is None


def test_reference_against_itself_wins_half(setup):
    cfg, tok, p0, _, eval_cfg, rms = setup
    greedy = dataclasses.replace(eval_cfg, temperature=0.0)
    ev = sample_policy(p0, tok, PROMPTS, greedy, cfg.data)
    reference = {p: g for p, g in zip(PROMPTS, ev.groups(ev.responses))}
    report = evaluate_policies(
        {"sft": p0},
        {"gold_rm": rms["gold_rm"]},
        tok,
        PROMPTS,
        greedy,
        cfg.data,
        toy_gold,
        reference=reference,
    )
    row = report["policies"]["sft"]
    assert row["win_rate"] == 50.0 and row["win_rate_se"] == 0.0


def test_win_rates_hand_worked():
    # "2+3=": samples 5, 5, 7, 7 against references 5, 7 (cycled): 5 v 5 tie, 5 v 7 win, 7 v 5 loss,
    # 7 v 7 tie -> 50, 100, 0, 50 (mean 50). "1+1=": 2 v 3 win, 3 v 3 tie -> 100, 50 (mean 75).
    groups = win_rates(
        ["2+3=", "1+1="],
        [["5", "5", "7", "7"], ["2", "3"]],
        {"2+3=": ["5", "7"], "1+1=": ["3"]},
        gold_annotator(gold_score),
    )
    assert groups == [[50.0, 100.0, 0.0, 50.0], [100.0, 50.0]]
    # clustered: (50 + 75) / 2 = 62.5, se = sd(50, 75) / sqrt(2) = 17.678 / 1.414 = 12.5
    from rlp_engine.stats import clustered_mean_se

    assert clustered_mean_se(groups) == pytest.approx((62.5, 12.5, 2))
    assert win_rates(["1+1="], [["2", "5"]], {"1+1=": ["2"]}, lambda p, a, b: 0.7) == [[70.0, 70.0]]


def test_no_gold_no_gold_figures(setup):
    cfg, tok, p0, _, eval_cfg, rms = setup
    report = evaluate_policies({"sft": p0}, {"rm": rms["rm"]}, tok, PROMPTS[:3], eval_cfg, cfg.data, None)
    row, rm = report["policies"]["sft"], report["reward_models"]["rm"]
    assert row["gold"] is None and row["exact"] is None and row["win_rate"] is None
    assert rm["on_policy_accuracy"] == {"sft": None, "all": None, "pairs": 0}
    assert rm["best_of"] is None and rm["offline_accuracy"] is None and rm["offline_pairs"] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eval_prompts": []}, "eval_prompts: empty"),
        ({"policies": {}}, "policies: empty"),
        (
            {"reference": {"2+3=": ["5"]}},
            r"reference: no responses for 7 of the 8 eval prompts \(first: '1\+1='\)",
        ),
        ({"reference": {p: ["1"] for p in PROMPTS}, "gold": None}, "annotate: needed"),
        ({"heldout_pairs": []}, "heldout_pairs: empty"),
        (
            {"reference": {p: ["1"] for p in PROMPTS}, "annotate": lambda p, a, b: 2.0},
            "annotate: must return a probability",
        ),
    ],
)
def test_bad_input_names_the_argument(setup, change, message):
    cfg, tok, p0, _, eval_cfg, rms = setup
    args = {"policies": {"sft": p0}, "eval_prompts": PROMPTS, "gold": toy_gold, **change}
    kwargs = {k: v for k, v in args.items() if k not in ("policies", "eval_prompts", "gold")}
    with pytest.raises(ValueError, match=message):
        evaluate_policies(
            args["policies"],
            {"gold_rm": rms["gold_rm"]},
            tok,
            args["eval_prompts"],
            eval_cfg,
            cfg.data,
            args["gold"],
            **kwargs,
        )
