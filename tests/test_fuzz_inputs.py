"""Fuzzing of the user-facing readers: the JSONL data readers (rlp_engine.data.jsonl) and the config
loader (rlp_engine.config.load_config). Property: every input either loads or raises the project's
own error (DataError / ConfigError) whose message names the file (and line) or the key, never any
other exception. Derandomized, so CI sees the same examples every run."""

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlp_engine.config import ConfigError, TrainConfig, load_config
from rlp_engine.data.jsonl import DataError, read_jsonl, read_preferences, read_prompts, read_sft

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,  # no replay of examples saved by earlier runs: every run sees the same examples
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

READERS = (read_jsonl, read_sft, read_preferences, read_prompts)

# JSON values: scalars (incl. big ints and non-ASCII text), nested lists and objects.
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Records close to the accepted forms: the real field names with random values, plus random keys.
FIELDS = ("prompt", "response", "chosen", "rejected", "instruction", "input", "output")
FIELDS += ("output_1", "output_2", "preference")
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=6)
json_lines = st.lists(
    st.one_of(records.map(json.dumps), json_values.map(json.dumps), st.just(""), st.text(max_size=12)),
    max_size=6,
)


def _check_data_error(err: DataError, path: Path) -> None:
    msg = str(err)
    # "<path>: ..." for file-level errors, "<path>:<line>: ..." for a record's.
    assert re.match(re.escape(str(path)) + r"(:\d+)?: \S", msg), msg
    if "no records" not in msg and "no such file" not in msg:
        assert re.match(re.escape(str(path)) + r":\d+: ", msg), msg


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
@SETTINGS
@given(data=st.binary(max_size=64))
def test_jsonl_random_bytes(tmp_path, reader, data):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    try:
        reader(path)
    except DataError as err:
        _check_data_error(err, path)


@pytest.mark.parametrize("reader", READERS, ids=lambda f: f.__name__)
@SETTINGS
@given(lines=json_lines, crlf=st.booleans())
def test_jsonl_random_json_lines(tmp_path, reader, lines, crlf):
    path = tmp_path / "data.jsonl"
    path.write_text(("\r\n" if crlf else "\n").join(lines), encoding="utf-8")
    try:
        out = reader(path)
    except DataError as err:
        _check_data_error(err, path)
    else:
        assert len(out) >= 1


def _config_keys() -> list[str]:
    cfg = TrainConfig()
    keys = []
    for sec in dataclasses.fields(cfg):
        keys += [f"{sec.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, sec.name))]
    return keys


KEYS = _config_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
FIELD_NAMES = sorted({k.split(".")[1] for k in KEYS})

yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["cpu", "cuda", "cuda:7", "k3", "token-mean", "1e-3", "default", "tiny", "auto"])
)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
sections = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), yaml_values, max_size=4)
yaml_keys = st.sampled_from(SECTIONS) | st.sampled_from(["preset"]) | st.text(max_size=5) | st.integers()
yaml_trees = st.dictionaries(yaml_keys, sections | yaml_values, max_size=4)
override_values = st.sampled_from(
    [
        "",
        "null",
        "true",
        "0",
        "-1",
        "1e-3",
        "3.",
        ".5",
        "1e999",
        "nan",
        "inf",
        "[",
        "{a: 1}",
        "[1, 2]",
        "'x",
        "cpu",
        "cuda:0",
        "k3",
        ": :",
        "&a *b",
        "!!python/name:os.system",
    ]
) | st.text(max_size=8)


overrides = st.lists(
    st.tuples(
        st.sampled_from(KEYS) | st.text(max_size=8), st.sampled_from(["=", "", "=="]), override_values
    ).map("".join),
    max_size=3,
)


def _check_config_error(err: ConfigError, path: Path) -> None:
    msg = str(err)
    names_file = msg.startswith(f"{path}: ")
    names_override = msg.startswith("override ")
    names_key = re.match(r"[a-z_]+\.[a-z_0-9]+: ", msg) is not None
    assert names_file or names_override or names_key, msg


def _load(text_or_bytes, override_list):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        if isinstance(text_or_bytes, bytes):
            path.write_bytes(text_or_bytes)
        else:
            path.write_text(text_or_bytes, encoding="utf-8")
        try:
            load_config(path, override_list)
        except ConfigError as err:
            _check_config_error(err, path)


@SETTINGS
@given(tree=yaml_trees, override_list=overrides)
def test_config_random_yaml_trees(tree, override_list):
    _load(yaml.safe_dump(tree, allow_unicode=True), override_list)


@SETTINGS
@given(text=st.text(max_size=40) | st.binary(max_size=40))
def test_config_random_file_contents(text):
    _load(text, [])


@SETTINGS
@given(override_list=overrides)
def test_config_random_overrides(override_list):
    try:
        load_config(None, override_list)
    except ConfigError as err:
        _check_config_error(err, Path("<none>"))


# Bugs the fuzzing found (minimal examples as hypothesis printed them), fixed: each must give a ConfigError.
def test_config_file_not_utf8():
    _load(b"\x80", [])


@pytest.mark.parametrize("tree", [{"preset": {"agg": None}}, {"preset": [1]}])
def test_config_unhashable_preset(tree):
    _load(yaml.safe_dump(tree), [])


@pytest.mark.parametrize("text", ["model.path==", "model.path=: :", "model.path==\x1f", "ppo.kl_coef=["])
def test_config_override_bad_yaml_value(text):
    try:
        load_config(None, [text])
    except ConfigError as err:
        _check_config_error(err, Path("<none>"))
