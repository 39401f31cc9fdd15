"""The embedded task (gold reward, simulated annotator, splits) and the JSONL readers."""

import json
import random

import pytest

from rlp_engine.config import load_config
from rlp_engine.data import (
    ArithmeticTask,
    DataError,
    extract_answer,
    gold_score,
    read_preferences,
    read_prompts,
    read_sft,
)
from rlp_engine.data.build import build_data
from rlp_engine.data.task import ReverseTask, annotate, label_pairs, make_task, reverse_credit


def test_extract_answer():
    assert extract_answer("19") == "19"
    assert extract_answer(" 007 apples") == "7"
    assert extract_answer("=19") is None
    assert extract_answer("") is None


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("12+7=", "19", 1.0),  # exact
        ("12+7=", "18", 0.25),  # "18" vs "19": 1 of 2 digits right -> 0.5 * 1/2
        ("12+7=", "19+1", 0.5),  # right number, trailing text halves it
        ("12+7=", "abc", 0.0),  # no number
        ("5+5=", "9", 0.0),  # " 9" vs "10": no digit right
        ("5+5=", "0", 0.25),  # " 0" vs "10": the units digit is right -> 0.5 * 1/2
        ("5+5=", "110", 0.5 * 2 / 3),  # "110" vs " 10": two of three right-aligned digits
    ],
)
def test_gold_score_hand_worked(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected)


def test_task_splits_are_disjoint_and_deterministic():
    task = ArithmeticTask(max_operand=9, seed=3)
    assert set(task.eval_pairs).isdisjoint(task.train_pairs)
    assert len(task.eval_pairs) + len(task.train_pairs) == 100
    evals = set(task.eval_prompts(1000))
    assert evals.isdisjoint(task.unlabeled_prompts(200, seed=0))
    assert evals.isdisjoint(e.prompt for e in task.sft_examples(200, 0.3, seed=0))
    assert task.unlabeled_prompts(5, seed=1) == ArithmeticTask(max_operand=9, seed=3).unlabeled_prompts(
        5, seed=1
    )


def test_sft_noise_share_is_respected():
    task = ArithmeticTask(max_operand=20)
    ex = task.sft_examples(2000, noise=0.3, seed=0)
    wrong = sum(gold_score(e.prompt, e.response) < 1.0 for e in ex) / len(ex)
    assert 0.25 < wrong < 0.35


def test_annotator_follows_gold_up_to_label_noise():
    task = ArithmeticTask(max_operand=20)
    clean = task.preferences(400, label_noise=0.0, seed=0)
    assert all(gold_score(p.prompt, p.chosen) >= gold_score(p.prompt, p.rejected) for p in clean)
    noisy = task.preferences(2000, label_noise=0.2, seed=0)
    agree = sum(gold_score(p.prompt, p.chosen) > gold_score(p.prompt, p.rejected) for p in noisy)
    ties = sum(gold_score(p.prompt, p.chosen) == gold_score(p.prompt, p.rejected) for p in noisy)
    # Strictly ordered pairs agree with gold 80% of the time (ties excluded from the count).
    assert 0.75 < agree / (len(noisy) - ties) < 0.85


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_sft_both_forms(tmp_path):
    f = _write(
        tmp_path / "sft.jsonl",
        [{"instruction": "Add.", "input": "1+2", "output": "3"}, {"prompt": "4+4=", "response": "8"}, ""],
    )
    ex = read_sft(f)
    assert len(ex) == 2
    assert "### Instruction:\nAdd.\n\n### Input:\n1+2" in ex[0].prompt and ex[0].response == "3"
    assert (ex[1].prompt, ex[1].response) == ("4+4=", "8")


def test_read_preferences_alpacafarm_and_chosen_rejected(tmp_path):
    f = _write(
        tmp_path / "pref.jsonl",
        [
            {"instruction": "Say hi", "input": "", "output_1": "hi", "output_2": "bye", "preference": 2},
            {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
        ],
    )
    p = read_preferences(f)
    assert (p[0].chosen, p[0].rejected) == ("bye", "hi")  # preference 2 -> output_2 wins
    assert "### Instruction:\nSay hi\n\n### Response:\n" in p[0].prompt
    assert (p[1].prompt, p[1].chosen, p[1].rejected) == ("1+1=", "2", "3")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "1+1="}, "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_prompts(f)
    f = _write(tmp_path / "bad2.jsonl", [{"prompt": "x", "chosen": "a"}])
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: missing field 'rejected' in a preference record"):
        read_preferences(f)
    f = _write(tmp_path / "bad2b.jsonl", [{"prompt": "x", "chosen": "a", "rejected": 3}])
    with pytest.raises(DataError, match=r"bad2b\.jsonl:1: field 'rejected' must be a string \(int\)"):
        read_preferences(f)
    f = _write(
        tmp_path / "bad3.jsonl", [{"instruction": "x", "output_1": "a", "output_2": "b", "preference": 3}]
    )
    with pytest.raises(DataError, match=r"bad3\.jsonl:1: field 'preference' must be 1 or 2, got 3"):
        read_preferences(f)
    f = _write(tmp_path / "bad4.jsonl", [{"prompt": "x", "response": "y"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"bad4\.jsonl:2: expected a JSON object, got list"):
        read_sft(f)
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "missing.jsonl")


def test_build_data_from_jsonl_without_gold(tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}])
    pref = _write(tmp_path / "pref.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "q"}])
    cfg = load_config(
        overrides=[f"data.sft_path={sft}", f"data.pref_path={pref}", f"data.prompts_path={prompts}"]
    )
    cfg.data.task = "none"
    with pytest.raises(DataError, match="data.eval_path"):
        build_data(cfg.data)
    cfg.data.eval_path = str(prompts)
    data = build_data(cfg.data)
    assert data.gold is None and data.prompts == ["q"] and data.preferences[0].rejected == "c"
    assert data.sources["sft"].where(0) == f"{sft}:1"


def test_build_data_sources_name_file_lines_and_embedded_keys(tmp_path):
    """Sources keep each record's line (blank lines skipped) so later checks can name it."""
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}])
    cfg = load_config(preset="tiny", overrides=[f"data.prompts_path={prompts}"])
    data = build_data(cfg.data)
    assert data.prompts == ["a", "b"]
    assert [data.sources["prompts"].where(i) for i in range(2)] == [f"{prompts}:1", f"{prompts}:3"]
    assert data.sources["sft"].where(4) == "data.num_sft (embedded arithmetic task) record 5"
    assert len(data.sft) == cfg.data.num_sft and data.sources["eval"].key == "data.num_eval"


def test_chat_template_prompts_are_token_ids():
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True): the ids, not
    the mapping, must come out (the SmolLM2 config runs with data.chat_template=true)."""
    from rlp_engine.data.batch import encode_prompts
    from rlp_engine.models.loading import load_tokenizer

    tok = load_tokenizer(load_config(preset="tiny").model, texts=["12+7=19"])
    tok.chat_template = (
        "{% for m in messages %}<{{ m['content'] }}>{% endfor %}{% if add_generation_prompt %}:{% endif %}"
    )
    plain = encode_prompts(tok, ["12+7="], max_tokens=64)
    chat = encode_prompts(tok, ["12+7="], max_tokens=64, chat_template=True)
    assert all(isinstance(i, int) for i in chat[0])
    assert tok.decode(chat[0]) == "<12+7=>:" and tok.decode(plain[0]) == "12+7="
    assert encode_prompts(tok, ["12+7="], max_tokens=3, chat_template=True)[0] == chat[0][-3:]


def test_tokenize_prompts_batched_equals_one_by_one_and_cut_keeps_the_end():
    """Prompts are tokenised in one batched call: the ids must equal one call per prompt."""
    import random

    from rlp_engine.data.batch import encode_prompts, tokenize_prompts
    from rlp_engine.models.loading import train_byte_tokenizer

    rng = random.Random(1234)
    prompts = ["".join(rng.choice("0123456789+= abcé") for _ in range(rng.randint(1, 30))) for _ in range(9)]
    tok = train_byte_tokenizer(prompts)
    whole = tokenize_prompts(tok, prompts)
    assert whole == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cut = encode_prompts(tok, prompts, max_tokens=7)
    assert cut == [ids[-7:] for ids in whole]
    assert any(len(ids) > 7 for ids in whole) and all(len(ids) <= 7 for ids in cut)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        encode_prompts(tok, prompts, max_tokens=0)


# --- the reverse task (the default testbed) and the task interface ---


@pytest.mark.parametrize(
    "truth,response,expected",
    [
        ("9284", "9284", 1.0),  # the reversal
        ("9284", " 9284 ", 1.0),  # surrounding space ignored
        ("9284", "4829", 0.0),  # a copy: no position agrees
        ("9284", "9285", 0.5 * 3 / 4),  # one digit wrong: 3 of 4 positions
        ("9284", "92845", 0.5 * 4 / 5),  # one digit too many: 4 of the longer 5
        ("9284", "", 0.0),
    ],
)
def test_reverse_credit_hand_worked(truth, response, expected):
    assert reverse_credit(truth, response) == pytest.approx(expected)


def test_reverse_eval_prompts_are_disjoint_from_every_training_prompt():
    task = ReverseTask(seed=3, num_eval=256)
    evals = task.eval_prompts(256)
    assert len(evals) == len(set(evals)) == 256
    train = {e.prompt for e in task.sft_examples(4000, 0.45, seed=3)}
    train |= set(task.preference_prompts(3000, seed=3)) | set(task.unlabeled_prompts(400, seed=3))
    assert not train & set(evals)
    # the same distribution: 3-5 digits then ">", in both sets
    for p in list(train)[:500] + evals:
        assert p.endswith(">") and p[:-1].isdigit() and 3 <= len(p) - 1 <= 5


def test_default_config_evaluates_on_at_least_200_heldout_prompts_16_samples():
    cfg = load_config()
    task = make_task(cfg.data, seed=0)
    assert isinstance(task, ReverseTask)
    assert len(task.eval_prompts(cfg.data.num_eval)[: cfg.eval.num_prompts]) >= 200
    assert cfg.eval.samples_per_prompt >= 16


def test_reverse_demonstrator_copies_a_share_noise():
    task = ReverseTask(seed=0)
    ex = task.sft_examples(4000, 0.45, seed=1)
    copies = sum(e.response == e.prompt[:-1] and e.response != e.response[::-1] for e in ex) / len(ex)
    right = sum(task.gold(e.prompt, e.response) == 1.0 for e in ex) / len(ex)
    assert 0.40 < copies < 0.47  # 0.45 minus the palindromes, whose copy is also the reversal
    assert right == pytest.approx(1 - copies, abs=1e-9)


def test_annotator_prefers_gold_and_flips_a_share():
    rng = random.Random(0)
    gold = ReverseTask(seed=0).gold
    clean = [annotate(gold, "123>", "321", "123", 0.0, rng) for _ in range(50)]
    assert all(p.chosen == "321" for p in clean)
    noisy = [annotate(gold, "123>", "321", "123", 0.2, rng) for _ in range(4000)]
    assert 0.17 < sum(p.chosen == "123" for p in noisy) / 4000 < 0.23
    assert annotate(gold, "123>", "321", "321", 0.0, rng) is None  # identical: no pair
    pairs = label_pairs(ReverseTask(seed=0), ["12>", "34>"], [("21", "12"), ("43", "43")], 0.0, seed=0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("21", "12")]
