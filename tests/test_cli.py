"""The `rlp-engine` command for a person at a terminal: --version, train --print-config, the key
metrics printed at every logging step, no deprecation warning from our own generator calls, and
checkpoint files that load with weights_only=True."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

from rlp_engine import __version__
from rlp_engine.cli import main
from rlp_engine.config import load_config, to_dict
from rlp_engine.engine.checkpoint import from_plain, to_plain
from rlp_engine.engine.metrics import MetricsLogger, console_line

# ---- --version and --print-config ----


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlp-engine {__version__}"


def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nppo:\n  kl_coef: 0.05\n")
    args = ["train", "--config", str(f), "--output-dir", str(out), "--print-config", "sft.lr=1e-4"]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = load_config(f, ["sft.lr=1e-4"])
    want.run.output_dir = str(out)
    assert printed == to_dict(want)
    assert (printed["model"]["hidden_size"], printed["ppo"]["kl_coef"], printed["sft"]["lr"]) == (
        32,
        0.05,
        1e-4,
    )
    assert not out.exists()
    # a bad value is still refused, with nothing printed on stdout
    assert main([*args, "sft.batch_size=0"]) == 2
    got = capsys.readouterr()
    assert got.out == "" and "sft.batch_size: 0 is out of range" in got.err


# ---- one line of key metrics per logging step ----


def test_console_line_shows_the_key_metrics_present(tmp_path, capsys):
    values = {"loss": 0.123456, "grad_norm": 3.0, "score": -1.23456e-5, "kl": 2.0, "gold": 0.5, "lr": 1e-3}
    assert console_line("ppo", 7, values) == (
        "{'stage': 'ppo', 'step': 7, 'loss': 0.1235, 'score': -1.235e-05, 'kl': 2.0, 'gold': 0.5}"
    )
    assert console_line("sft", 0, {"lr": 0.1}) == "{'stage': 'sft', 'step': 0}"
    logger = MetricsLogger(tmp_path, console=True)
    logger.log("rm", 3, {"loss": torch.tensor(0.75), "acc": 0.5, "grad_norm": 1.0})
    assert capsys.readouterr().out == "{'stage': 'rm', 'step': 3, 'loss': 0.75, 'acc': 0.5}\n"
    MetricsLogger(tmp_path / "quiet").log("rm", 3, {"loss": 0.75})  # console off: the default
    logger.replay([{"stage": "rm", "step": 4, "loss": 0.5}])  # replayed lines (resume) are not printed
    assert capsys.readouterr().out == ""
    logger.close()


# ---- no deprecation warning from our own transformers calls ----


def test_generator_model_call_raises_no_future_warning():
    """transformers 5.2x renamed forward's past_key_values to cache; the old name warned on every run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlp_engine.engine.generator import Generator

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 5))
    gen = Generator(model, 12, fast=False)  # the model's own forward at every step
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = gen.generate(ids, torch.ones_like(ids), max_new_tokens=4, temperature=1.0)
    assert out.tokens.shape == (2, 4)


# ---- checkpoint files load with weights_only=True ----


def test_plain_round_trip_of_records_and_refusals():
    from rlp_engine.algos.rlp import PolicySamples
    from rlp_engine.data.records import Preference

    meta = {
        "results": {"pairs": [Preference("a", "b", "c")], "samples": PolicySamples(["p"], [["x", "y"]])},
        "stats": {"acc": np.float64(0.25), "n": np.int64(3)},
        "loop": {"gen": torch.randint(0, 255, (8,), dtype=torch.uint8), "order": (1, 2)},
    }
    plain = to_plain(meta)
    assert type(plain["stats"]["acc"]) is float and type(plain["stats"]["n"]) is int
    back = from_plain(plain)
    assert back["results"] == meta["results"] and back["loop"]["order"] == (1, 2)
    with pytest.raises(TypeError, match=r"meta\['x'\] is a set"):
        to_plain({"x": {1}})
    with pytest.raises(ValueError, match="not an rlp_engine dataclass"):
        from_plain({"__dataclass__": "os.PathLike", "fields": {}})
