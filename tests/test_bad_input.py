"""Bad input gets one clear error naming the file, line or config key, before any training starts
(issue 6 item 3): malformed JSONL, missing fields, empty data sets, prompts over
data.max_prompt_tokens (truncate / drop / error, counted), tokenizers without a pad token, a model
path that does not exist, unknown or ill-typed config keys. Most cases call
`rlp_engine.pipeline.inputs.prepare_inputs`, the one entry point the pipeline runs before it creates
its output directory; the CLI tests check exit code 2, the message on stderr and that nothing was
written. Every CLI run passes a hook that fails at the start of SFT (tests/fault_runner.py), so a
bad input that reached training fails the test at once instead of training."""

import json
import random
import subprocess
import sys

import pytest
import torch
from fault_runner import fail_at

from rlp_engine.cli import main
from rlp_engine.config import ConfigError, load_config
from rlp_engine.data import DataError
from rlp_engine.data.batch import encode_prompts, encode_responses
from rlp_engine.data.build import Source, build_data
from rlp_engine.models.loading import load_tokenizer, train_byte_tokenizer
from rlp_engine.pipeline.inputs import (
    ModelError,
    apply_long_prompts,
    check_paths,
    long_prompt_rule,
    prepare_inputs,
    resolve_model_path,
)


def _write(path, rows):
    """One JSON object (or raw text line) per line."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _jsonl_cfg(tmp_path, *overrides, **files):
    """Tiny config reading every data set from JSONL (task none); `files` replace the defaults."""
    rows = {
        "sft": [{"prompt": "1+1=", "response": "2"}],
        "pref": [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}],
        "prompts": [{"prompt": "2+2="}],
        "eval": [{"prompt": "3+3="}],
    }
    paths = {}
    for name, default in rows.items():
        given = files.get(name, default)
        paths[name] = given if not isinstance(given, list) else _write(tmp_path / f"{name}.jsonl", given)
    keys = [
        "data.task=none",
        f"data.sft_path={paths['sft']}",
        f"data.pref_path={paths['pref']}",
        f"data.prompts_path={paths['prompts']}",
        f"data.eval_path={paths['eval']}",
    ]
    return load_config(preset="tiny", overrides=keys + list(overrides))


# ---- malformed JSONL and missing fields: file and line ----


def test_malformed_json_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "p.jsonl", [{"prompt": "a"}, "", '{"prompt": "b"', {"prompt": "c"}])
    with pytest.raises(DataError, match=rf"^{bad}:3: not valid JSON"):
        prepare_inputs(_jsonl_cfg(tmp_path, prompts=bad))


def test_non_utf8_line_names_file_and_line(tmp_path):
    bad = tmp_path / "e.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: not valid UTF-8"):
        prepare_inputs(_jsonl_cfg(tmp_path, eval=bad))


@pytest.mark.parametrize(
    "name, row, missing, form",
    [
        ("sft", {"prompt": "a"}, "'response'", '{"prompt", "response"}'),
        ("sft", {"instruction": "a", "input": "b"}, "'output'", '{"instruction", "input"?, "output"}'),
        ("pref", {"prompt": "a", "chosen": "b"}, "'rejected'", '{"prompt", "chosen", "rejected"}'),
        ("pref", {"instruction": "a", "output_1": "b"}, "'output_2', 'preference'", '"output_1", "output_2"'),
        ("prompts", {"text": "a"}, "'instruction'", '{"prompt"} or {"instruction", "input"?}'),
    ],
)
def test_missing_fields_name_file_line_and_expected_fields(tmp_path, name, row, missing, form):
    good = {
        "sft": {"prompt": "x", "response": "y"},
        "pref": {"prompt": "x", "chosen": "y", "rejected": "z"},
        "prompts": {"prompt": "x"},
    }[name]
    bad = _write(tmp_path / f"bad_{name}.jsonl", [good, good, row])
    with pytest.raises(DataError) as err:
        prepare_inputs(_jsonl_cfg(tmp_path, **{name: bad}))
    msg = str(err.value)
    assert msg.startswith(f"{bad}:3: missing field {missing}"), msg
    assert form in msg and "got keys" in msg


def test_ill_typed_field_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "sft.jsonl", [{"prompt": "x", "response": 7}])
    with pytest.raises(DataError, match=rf"^{bad}:1: field 'response' must be a string \(int\)"):
        prepare_inputs(_jsonl_cfg(tmp_path, sft=bad))


# ---- empty data sets ----


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_empty_jsonl_file_names_the_file(tmp_path, text):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(text)
    with pytest.raises(DataError, match=rf"^{empty}: no records"):
        prepare_inputs(_jsonl_cfg(tmp_path, pref=empty))


def test_empty_embedded_data_set_names_the_config_key():
    cfg = load_config(preset="tiny", overrides=["data.num_unlabeled=0"])
    with pytest.raises(
        DataError, match=r"^data\.num_unlabeled \(embedded arithmetic task\): the prompts data set"
    ):
        prepare_inputs(cfg)


def test_all_prompts_dropped_names_the_file(tmp_path):
    long = _write(tmp_path / "long.jsonl", [{"prompt": "abcdef"}, {"prompt": "abcdefgh"}])
    cfg = _jsonl_cfg(tmp_path, "data.max_prompt_tokens=5", "data.long_prompts=drop", prompts=long)
    with pytest.raises(DataError, match=rf"^{long}: all 2 prompts are longer than data.max_prompt_tokens=5"):
        prepare_inputs(cfg)


# ---- prompts longer than data.max_prompt_tokens ----


def _long_prompt_files(tmp_path):
    """Byte tokenizer: one token per ASCII character. With max_prompt_tokens=5 the long prompts are
    sft 1 of 2, preferences 2 of 3, prompts 2 of 4 (lines 2 and 4; 5 tokens is not long), eval 0 of 1."""
    return dict(
        sft=[{"prompt": "ab", "response": "1"}, {"prompt": "abcdefg", "response": "2"}],
        pref=[
            {"prompt": "abcdef", "chosen": "1", "rejected": "2"},
            {"prompt": "xy", "chosen": "1", "rejected": "2"},
            {"prompt": "abcdefghij", "chosen": "1", "rejected": "2"},
        ],
        prompts=[{"prompt": "abc"}, {"prompt": "abcdef"}, "", {"prompt": "abcdefgh"}, {"prompt": "abcde"}],
        eval=[{"prompt": "a"}],
    )


def test_long_prompts_truncate_counts_and_keeps_the_last_tokens(tmp_path):
    cfg = _jsonl_cfg(tmp_path, "data.max_prompt_tokens=5", **_long_prompt_files(tmp_path))
    assert cfg.data.long_prompts == "truncate"  # the default
    inputs = prepare_inputs(cfg)
    assert inputs.counts == {
        "sft": {"truncated": 1, "dropped": 0},
        "preferences": {"truncated": 2, "dropped": 0},
        "prompts": {"truncated": 2, "dropped": 0},
        "eval": {"truncated": 0, "dropped": 0},
    }
    assert inputs.data.prompts == ["abc", "abcdef", "abcdefgh", "abcde"]  # text kept whole
    cut = encode_prompts(inputs.tokenizer, inputs.data.prompts, cfg.data.max_prompt_tokens)
    assert [inputs.tokenizer.decode(ids) for ids in cut] == ["abc", "bcdef", "defgh", "abcde"]


def test_long_prompts_drop_counts_and_keeps_lines(tmp_path):
    cfg = _jsonl_cfg(
        tmp_path, "data.max_prompt_tokens=5", "data.long_prompts=drop", **_long_prompt_files(tmp_path)
    )
    inputs = prepare_inputs(cfg)
    assert inputs.counts == {
        "sft": {"truncated": 0, "dropped": 1},
        "preferences": {"truncated": 0, "dropped": 2},
        "prompts": {"truncated": 0, "dropped": 2},
        "eval": {"truncated": 0, "dropped": 0},
    }
    assert inputs.data.prompts == ["abc", "abcde"]
    assert [p.prompt for p in inputs.data.preferences] == ["xy"]
    assert [e.prompt for e in inputs.data.sft] == ["ab"]
    src = inputs.data.sources["prompts"]
    assert [src.where(i) for i in range(2)] == [
        f"{tmp_path / 'prompts.jsonl'}:1",
        f"{tmp_path / 'prompts.jsonl'}:5",
    ]


def test_long_prompts_error_names_file_line_and_lengths(tmp_path):
    files = _long_prompt_files(tmp_path)
    files["sft"] = [{"prompt": "ab", "response": "1"}]  # the first long prompt is then in preferences
    cfg = _jsonl_cfg(tmp_path, "data.max_prompt_tokens=5", "data.long_prompts=error", **files)
    with pytest.raises(DataError) as err:
        prepare_inputs(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'pref.jsonl'}:1: prompt of 6 tokens is longer than "), msg
    assert "data.max_prompt_tokens=5" in msg and "data.long_prompts=error" in msg


def test_long_prompts_error_on_the_embedded_task_names_the_data_set():
    # tiny preset: operands 0..9, so every prompt "a+b=" is 4 tokens
    cfg = load_config(preset="tiny", overrides=["data.max_prompt_tokens=3", "data.long_prompts=error"])
    with pytest.raises(
        DataError, match=r"^data\.num_sft \(embedded arithmetic task\) record 1: prompt of 4 tokens"
    ):
        prepare_inputs(cfg)


def test_long_prompt_rule_matches_a_byte_count_reference():
    """Random prompts (some multi-byte characters): the byte tokenizer gives one token per UTF-8 byte,
    so the reference count is a plain byte count."""
    rng = random.Random(20261123)
    prompts = ["".join(rng.choice("ab+=09é€") for _ in range(rng.randint(1, 24))) for _ in range(60)]
    limit = rng.randint(6, 14)
    tok = train_byte_tokenizer(prompts)
    cfg = load_config(preset="tiny", overrides=[f"data.max_prompt_tokens={limit}"])
    long = [len(p.encode("utf-8")) > limit for p in prompts]
    assert 0 < sum(long) < len(prompts)
    for policy in ("truncate", "drop"):
        cfg.data.long_prompts = policy
        data = build_data(cfg.data)
        data.prompts = prompts
        kept, counts = apply_long_prompts(data, tok, cfg.data)
        if policy == "truncate":
            assert counts["prompts"] == {"truncated": sum(long), "dropped": 0} and kept.prompts == prompts
        else:
            assert counts["prompts"] == {"truncated": 0, "dropped": sum(long)}
            assert kept.prompts == [p for p, is_long in zip(prompts, long) if not is_long]
        assert counts["sft"] == {"truncated": 0, "dropped": 0}  # embedded "a+b=" prompts: 4 bytes


def test_long_prompt_rule_alone():
    src = Source("data.prompts_path", "f.jsonl", (2, 4, 7))
    assert long_prompt_rule([3, 9, 5], 5, "truncate", src) == ([0, 1, 2], 1, 0)
    assert long_prompt_rule([3, 9, 5], 5, "drop", src) == ([0, 2], 0, 1)
    with pytest.raises(DataError, match=r"^f\.jsonl:4: prompt of 9 tokens"):
        long_prompt_rule([3, 9, 5], 5, "error", src)


def test_long_responses_keep_their_cut_and_are_not_counted(tmp_path):
    """Responses over max_response_tokens keep the first tokens (eos dropped when cut); the
    long-prompt rule does not look at them."""
    files = {"sft": [{"prompt": "1+1=", "response": "123456789"}, {"prompt": "1+2=", "response": "3"}]}
    cfg = _jsonl_cfg(tmp_path, "data.max_response_tokens=4", **files)
    inputs = prepare_inputs(cfg)
    assert inputs.counts["sft"] == {"truncated": 0, "dropped": 0}
    tok = inputs.tokenizer
    ids = encode_responses(tok, [e.response for e in inputs.data.sft], cfg.data.max_response_tokens)
    assert tok.decode(ids[0]) == "1234" and tok.eos_token_id not in ids[0]
    assert ids[1][-1] == tok.eos_token_id and tok.decode(ids[1][:-1]) == "3"


def test_max_prompt_tokens_below_one_is_a_config_error():
    cfg = load_config(preset="tiny", overrides=["data.max_prompt_tokens=0"])
    with pytest.raises(ConfigError, match=r"^data\.max_prompt_tokens: must be at least 1, got 0"):
        prepare_inputs(cfg)


# ---- tokenizers without a pad token; model paths ----


def _save_tokenizer(path, **special):
    from transformers import PreTrainedTokenizerFast

    base = train_byte_tokenizer(["0123456789+="])
    PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, **special).save_pretrained(path)
    return path


def test_tokenizer_without_pad_uses_eos_with_a_notice(tmp_path, capsys):
    from rlp_engine.config import ModelConfig

    path = _save_tokenizer(tmp_path / "tok", eos_token="<eos>")
    tok = load_tokenizer(ModelConfig(path=str(path)))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and str(path) in notice[0] and "no pad token" in notice[0]


def test_tokenizer_without_pad_and_eos_names_the_path(tmp_path):
    path = _save_tokenizer(tmp_path / "tok")
    cfg = load_config(preset="tiny", overrides=[f"model.path={path}"])
    with pytest.raises(
        ModelError, match=rf"^model\.path: the tokenizer at {path} has neither a pad nor an eos"
    ):
        prepare_inputs(cfg)


def test_tokenizer_without_pad_loads_with_its_model(tmp_path):
    """The whole entry point on a directory whose tokenizer has no pad token."""
    from rlp_engine.models.loading import tiny_llama

    cfg = load_config(preset="tiny")
    path = _save_tokenizer(tmp_path / "m", eos_token="<eos>")
    tiny_llama(cfg.model, load_tokenizer(cfg.model, ["0"])).save_pretrained(path)
    cfg.model.path = str(path)
    inputs = prepare_inputs(cfg)
    assert inputs.tokenizer.pad_token_id == inputs.tokenizer.eos_token_id
    assert type(inputs.policy).__name__ == "LlamaForCausalLM"


def test_missing_model_path_names_key_and_path(tmp_path):
    cfg = load_config(preset="tiny", overrides=[f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match=rf"^model\.path: {tmp_path / 'nope'} does not exist"):
        prepare_inputs(cfg)
    (tmp_path / "file").write_text("x")
    cfg.model.path = str(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match=r"^model\.path: .*file is not a directory"):
        prepare_inputs(cfg)
    cfg.model.path, cfg.model.gguf_file = str(tmp_path), "m.gguf"
    with pytest.raises(FileNotFoundError, match=r"^model\.gguf_file: m\.gguf is not a file in"):
        prepare_inputs(cfg)


def test_missing_paths_fail_before_torch_is_imported(tmp_path):
    """check_paths (what the CLI runs first) imports neither torch nor transformers."""
    code = (
        "import sys\n"
        "from rlp_engine.config import load_config\n"
        "from rlp_engine.pipeline.inputs import check_paths\n"
        f"cfg = load_config(overrides=['model.path={tmp_path / 'nope'}'])\n"
        "try:\n"
        "    check_paths(cfg)\n"
        "except FileNotFoundError as err:\n"
        "    print(err)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"model.path: {tmp_path / 'nope'} does not exist", "False False"]


def test_package_model_paths_still_resolve(tmp_path, monkeypatch):
    from rlp_engine.config import ModelConfig

    pkg = tmp_path / "fake_gguf_pkg"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "weights" / "model-q8.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_model_path(ModelConfig(path="package:fake_gguf_pkg")) == (
        str(pkg / "weights"),
        "model-q8.gguf",
    )
    with pytest.raises(FileNotFoundError, match=r"^model\.path: package 'no_such_pkg_xyz' is not installed"):
        resolve_model_path(ModelConfig(path="package:no_such_pkg_xyz"))
    (pkg / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"^model\.path: expected one \.gguf file in .*found 2"):
        resolve_model_path(ModelConfig(path="package:fake_gguf_pkg"))


def test_missing_data_file_names_key_and_path(tmp_path):
    cfg = load_config(preset="tiny", overrides=[f"data.eval_path={tmp_path / 'gone.jsonl'}"])
    with pytest.raises(DataError, match=rf"^data\.eval_path: {tmp_path / 'gone.jsonl'} does not exist"):
        check_paths(cfg)
    with pytest.raises(DataError, match="data.eval_path"):
        prepare_inputs(cfg)


# ---- the CLI: exit code 2, one line on stderr, no output directory ----


def _cli(tmp_path, capsys, *args):
    out = tmp_path / "out"
    # training must not start
    code = main(["train", "--preset", "tiny", "--output-dir", str(out), *args], hook=fail_at("sft"))
    return code, capsys.readouterr().err, out


def _config_cases(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ppo:\n  kl_coef: lots\n")
    return {
        "unknown_key": (["ppo.kl_cof=0.1"], "ppo.kl_cof: unknown key"),
        "ill_typed_override": (["sft.steps=many"], "sft.steps: expected int"),
        "ill_typed_in_file": (["--config", str(bad_yaml)], f"{bad_yaml}: ppo.kl_coef: expected float"),
        "bad_choice": (["data.long_prompts=cut"], "data.long_prompts: 'cut' is not one of"),
        "max_prompt_tokens_0": (["data.max_prompt_tokens=0"], "data.max_prompt_tokens: must be at least 1"),
        "missing_model_path": (
            [f"model.path={tmp_path / 'nope'}"],
            f"model.path: {tmp_path / 'nope'} does not",
        ),
        "missing_data_file": ([f"data.sft_path={tmp_path / 'no.jsonl'}"], "data.sft_path:"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown_key",
        "ill_typed_override",
        "ill_typed_in_file",
        "bad_choice",
        "max_prompt_tokens_0",
        "missing_model_path",
        "missing_data_file",
    ],
)
def test_cli_config_and_path_errors_exit_2_and_write_nothing(tmp_path, capsys, case):
    args, expected = _config_cases(tmp_path)[case]
    code, err, out = _cli(tmp_path, capsys, *args)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def _data_cases(tmp_path):
    """(override args, expected text on stderr) per bad data input that only reading data finds."""
    bad_json = _write(tmp_path / "bad.jsonl", [{"prompt": "a"}, "{oops"])
    no_field = _write(tmp_path / "nofield.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long = _write(tmp_path / "long.jsonl", [{"prompt": "12+7="}, {"prompt": "x" * 80}])
    no_eos = _save_tokenizer(tmp_path / "tok")
    return {
        "malformed_jsonl": ([f"data.prompts_path={bad_json}"], f"{bad_json}:2: not valid JSON"),
        "missing_field": ([f"data.sft_path={no_field}"], f"{no_field}:2: missing field 'response'"),
        "empty_file": ([f"data.eval_path={empty}"], f"{empty}: no records"),
        "no_pad_no_eos": ([f"model.path={no_eos}"], f"model.path: the tokenizer at {no_eos} has neither"),
        "long_prompt_error": (
            [f"data.prompts_path={long}", "data.long_prompts=error"],
            f"{long}:2: prompt of 80 tokens is longer than data.max_prompt_tokens=64",
        ),
    }


@pytest.mark.parametrize(
    "case", ["malformed_jsonl", "missing_field", "empty_file", "no_pad_no_eos", "long_prompt_error"]
)
def test_cli_bad_data_exits_2_and_leaves_no_output_dir(tmp_path, capsys, case):
    """Needs run_pipeline to call prepare_inputs before it creates the output directory."""
    args, expected = _data_cases(tmp_path)[case]
    code, err, out = _cli(tmp_path, capsys, *args)
    assert code == 2 and expected in err, err
    assert "Traceback" not in err and err.count("rlp-engine: error:") == 1
    assert not out.exists()


# ---- values out of range and settings this machine cannot run: checked at load, before any output ----


def _range_cases():
    """(override args, the text naming the key) per value the config refuses at load."""
    return {
        "sft_batch_0": (["sft.batch_size=0"], "sft.batch_size: 0 is out of range; expected an int >= 1"),
        "rm_batch_0": (["rm.batch_size=0"], "rm.batch_size: 0 is out of range"),
        "uml_ib_batch_0": (["uml.ib_batch_size=0"], "uml.ib_batch_size: 0 is out of range"),
        "ppo_mini_0": (["ppo.mini_batch_size=0"], "ppo.mini_batch_size: 0 is out of range"),
        "ppo_rollout_neg": (["ppo.rollout_batch_size=-8"], "ppo.rollout_batch_size: -8 is out of range"),
        "eval_batch_0": (["eval.batch_size=0"], "eval.batch_size: 0 is out of range"),
        "samples_per_prompt_0": (["eval.samples_per_prompt=0"], "eval.samples_per_prompt: 0 is out of range"),
        "num_prompts_0": (["sample.num_prompts=0"], "sample.num_prompts: 0 is out of range"),
        "sample_n_1": (["sample.n=1"], "sample.n: 1 is out of range; expected an int >= 2"),
        "sft_lr_neg": (["sft.lr=-1"], "sft.lr: -1.0 is out of range; expected a finite number > 0"),
        "ppo_lr_0": (["ppo.lr=0"], "ppo.lr: 0.0 is out of range"),
        "ppo_steps_neg": (["ppo.steps=-1"], "ppo.steps: -1 is out of range; expected an int >= 0"),
        "mini_not_dividing": (
            ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=3"],
            "ppo.mini_batch_size: 3 does not divide ppo.rollout_batch_size 8",
        ),
        "device_gpu": (["run.device=gpu"], "run.device: 'gpu' is not a device; expected cpu, cuda or cuda:N"),
        "device_cuda_index": (
            [f"run.device=cuda:{torch.cuda.device_count() + 1}"],
            f"run.device: 'cuda:{torch.cuda.device_count() + 1}' but",
        ),
        "triton_on_cpu": (["run.backend=triton"], "run.backend: 'triton' needs a CUDA device"),
    }


@pytest.mark.parametrize("case", sorted(_range_cases()))
def test_cli_out_of_range_values_exit_2_naming_the_key_and_write_nothing(tmp_path, monkeypatch, capsys, case):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter lets Triton run on CPU
    args, expected = _range_cases()[case]
    code, err, out = _cli(tmp_path, capsys, *args)
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_device_without_cuda_exits_2(tmp_path, capsys):
    code, err, out = _cli(tmp_path, capsys, "run.device=cuda")
    assert code == 2 and "run.device: 'cuda' but torch.cuda.is_available() is False" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_out_of_range_values_in_a_file_name_the_file_and_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\numl:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{f}: uml\.batch_size: 0 is out of range"):
        load_config(f)


def test_limits_accept_the_defaults_and_the_edges():
    """Every preset passes; 0 steps, batch size 1, sample.n 2 and any lr > 0 are allowed."""
    for preset in ("default", "tiny"):
        load_config(preset=preset)
    edges = ["sft.steps=0", "ppo.steps=0", "sft.batch_size=1", "sample.n=2", "spg.lr=1e-12", "run.device=cpu"]
    cfg = load_config(preset="tiny", overrides=[*edges, "ppo.rollout_batch_size=6", "ppo.mini_batch_size=3"])
    assert (cfg.sft.steps, cfg.sample.n, cfg.spg.lr, cfg.ppo.mini_batch_size) == (0, 2, 1e-12, 3)


# ---- YAML floats: "1e-4" without a dot is a string to PyYAML (YAML 1.1) ----


def test_yaml_file_accepts_plain_float_syntax_for_float_fields(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "sft:\n  lr: 1e-4\nrm:\n  lr: 3E-5\nppo:\n  kl_coef: 2e-1\n  kl_target: 6e0\numl:\n  lr: .5e-3\n"
    )
    cfg = load_config(f)
    assert (cfg.sft.lr, cfg.rm.lr, cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.uml.lr) == (
        1e-4,
        3e-5,
        0.2,
        6.0,
        5e-4,
    )
    assert all(isinstance(v, float) for v in (cfg.sft.lr, cfg.ppo.kl_target))
    # the same as the override, which was accepted already
    assert load_config(overrides=["sft.lr=1e-4"]).sft.lr == cfg.sft.lr


def test_yaml_float_syntax_stays_a_string_elsewhere(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  steps: 1e3\n")  # an int field: no silent float -> int
    with pytest.raises(ConfigError, match=rf"^{f}: sft\.steps: expected int, got str '1e3'"):
        load_config(f)
    f.write_text("data:\n  sft_path: 1e3\n")  # a str field keeps the text
    assert load_config(f).data.sft_path == "1e3"
    f.write_text("sft:\n  lr: 1e-4x\n")
    with pytest.raises(ConfigError, match=r"sft\.lr: expected float, got str '1e-4x'"):
        load_config(f)


# ---- labels outside [0, V): every backend raises, naming the op, the argument and the value ----


@pytest.mark.parametrize("bad", [10, 11, -1, -101])
def test_logprobs_from_logits_label_out_of_range_every_backend(backend_name, bad):
    from rlp_engine.ops import backend, logprobs_from_logits

    logits = torch.randn(3, 5, 10)
    labels = torch.randint(0, 10, (3, 5))
    labels[0, 1] = -100  # ignore_index stays allowed
    labels[2, 3] = bad
    with backend(backend_name):
        with pytest.raises(ValueError, match=rf"^logprobs_from_logits: labels: {bad} is outside \[0, 10\)"):
            logprobs_from_logits(logits, labels)
        with pytest.raises(ValueError, match=rf"labels: {bad} is outside"):
            logprobs_from_logits(logits, labels.int(), return_entropy=True)
        labels[2, 3] = 9
        assert torch.isfinite(logprobs_from_logits(logits, labels)).all()
