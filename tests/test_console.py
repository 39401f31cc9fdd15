"""Console output: the metrics line is a `logging` record of the "rlp_engine" logger (nothing printed
without a handler; log_to_console prints it on stdout, once however often it is called), and the
progress bars of sampling (generate.sample, RLP's sample_policy) and evaluation (one per policy):
shown on a terminal with the right label and total, never on a pipe, and the samples, figures and
torch RNG state the same with and without them."""

import dataclasses
import io
import logging

import pytest
import torch
from test_evaluate import PROMPTS, char_tokenizer, toy_gold

import rlp_engine.engine.generate as generate_mod
from rlp_engine.config import load_config
from rlp_engine.engine.console import ConsoleHandler, log_to_console, progress
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import MetricsLogger
from rlp_engine.models import tiny_llama
from rlp_engine.pipeline.evaluate import evaluate_policies
from rlp_engine.recipes.rlp import sample_policy

LIB = logging.getLogger("rlp_engine")
METRICS = logging.getLogger("rlp_engine.engine.metrics")


@pytest.fixture
def no_console_handler():
    """The "rlp_engine" loggers as a library user finds them (no ConsoleHandler, levels NOTSET),
    restored after the test (the CLI tests in this process may have configured them)."""
    saved, levels = list(LIB.handlers), (LIB.level, METRICS.level)
    for h in saved:
        if isinstance(h, ConsoleHandler):
            LIB.removeHandler(h)
    LIB.setLevel(logging.NOTSET)
    METRICS.setLevel(logging.NOTSET)
    yield
    for h in list(LIB.handlers):
        LIB.removeHandler(h)
    for h in saved:
        LIB.addHandler(h)
    LIB.setLevel(levels[0])
    METRICS.setLevel(levels[1])


def test_metrics_line_is_a_logging_record_and_prints_nothing_without_a_handler(
    tmp_path, caplog, capsys, no_console_handler
):
    assert any(isinstance(h, logging.NullHandler) for h in LIB.handlers)
    caplog.set_level(logging.INFO, logger="rlp_engine")
    logger = MetricsLogger(tmp_path, console=True)
    logger.log("ppo", 4, {"loss": torch.tensor(0.25), "score": 1.5, "kl": 0.0123456, "gold": 0.5, "lr": 1.0})
    (rec,) = caplog.records
    assert (rec.name, rec.levelno) == ("rlp_engine.engine.metrics", logging.INFO)
    want = "{'stage': 'ppo', 'step': 4, 'loss': 0.25, 'score': 1.5, 'kl': 0.01235, 'gold': 0.5}"
    assert rec.getMessage() == want
    logger.replay([{"stage": "ppo", "step": 5, "loss": 0.5}])  # resume's replay: not logged again
    MetricsLogger(tmp_path / "quiet").log("rm", 3, {"loss": 0.75})  # console off
    assert len(caplog.records) == 1
    logger.close()
    # the library configures no output: pytest's capture handler aside, nothing reaches stdout/stderr
    got = capsys.readouterr()
    assert got.out == "" and got.err == ""


def test_log_to_console_prints_each_record_once_on_stdout(tmp_path, capsys, no_console_handler):
    first = log_to_console()
    assert log_to_console() is first  # the CLI's main() may run many times in one process
    logger = MetricsLogger(None, console=True)
    logger.log("rm", 3, {"loss": 0.75, "acc": 0.5, "grad_norm": 1.0})
    METRICS.debug("below INFO: not printed")
    # other modules' INFO diagnostics stay off (the CLI printed none before); their warnings go to
    # stderr, where they went before the package had a handler
    logging.getLogger("rlp_engine.engine").info("weight sync: not printed")
    logging.getLogger("rlp_engine.engine").warning("a warning")
    got = capsys.readouterr()
    assert got.out == "{'stage': 'rm', 'step': 3, 'loss': 0.75, 'acc': 0.5, 'grad_norm': 1.0}\n"
    assert got.err == "a warning\n"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(preset="tiny")
    tok = char_tokenizer()
    torch.manual_seed(0)
    policies = {"sft": tiny_llama(cfg.model, tok), "ppo": tiny_llama(cfg.model, tok)}
    return cfg, tok, policies


def _sample(tiny, seed: int, **bar):
    cfg, tok, policies = tiny
    torch.manual_seed(seed)
    s = sample(policies["sft"], tok, PROMPTS[:5], cfg.eval, cfg.data, n=2, batch_size=4, **bar)
    return s, torch.get_rng_state()


def test_sample_bar_on_a_terminal_only_and_same_samples(tiny, monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    with_bar, rng_with = _sample(tiny, 11, show_progress=True, desc="pref n=2")
    assert "pref n=2:" in term.getvalue() and "/3 " in term.getvalue()  # 10 rows in chunks of 4: 3
    plain, rng_plain = _sample(tiny, 11)
    for a, b in ((with_bar.batch.input_ids, plain.batch.input_ids), (with_bar.logprobs, plain.logprobs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert with_bar.responses == plain.responses and torch.equal(rng_with, rng_plain)
    other, _ = _sample(tiny, 12)
    assert other.responses != plain.responses  # the comparison above can tell seeds apart
    pipe = io.StringIO()  # not a terminal: no bar even when asked
    monkeypatch.setattr("sys.stderr", pipe)
    _sample(tiny, 11, show_progress=True, desc="pref n=2")
    assert pipe.getvalue() == ""


class Bars:
    """Records each progress() call of generate.sample (desc, total) and returns the real bar."""

    def __init__(self):
        self.calls = []

    def __call__(self, iterable, *, desc, enabled, total=None):
        self.calls.append((desc, enabled, len(iterable)))
        return progress(iterable, desc=desc, enabled=enabled, total=total)


def test_evaluation_bar_per_policy_and_same_report(tiny, monkeypatch):
    cfg, tok, policies = tiny
    eval_cfg = dataclasses.replace(cfg.eval, num_prompts=6, samples_per_prompt=3, batch_size=8)
    bars = Bars()
    monkeypatch.setattr(generate_mod, "progress", bars)
    args = (policies, {}, tok, PROMPTS, eval_cfg, cfg.data, toy_gold)
    shown = evaluate_policies(*args, seed=5, show_progress=True)
    assert bars.calls == [("eval sft", True, 3), ("eval ppo", True, 3)]  # 18 rows in chunks of 8
    bars.calls.clear()
    assert evaluate_policies(*args, seed=5) == shown
    assert [c[1] for c in bars.calls] == [False, False]


def test_rlp_sample_policy_bar(tiny, monkeypatch):
    cfg, tok, policies = tiny
    sample_cfg = dataclasses.replace(cfg.sample, n=2)
    bars = Bars()
    monkeypatch.setattr(generate_mod, "progress", bars)
    torch.manual_seed(3)
    shown = sample_policy(policies["ppo"], tok, PROMPTS, sample_cfg, cfg.data, show_progress=True)
    assert bars.calls == [("sample P", True, 1)]  # 16 rows: one chunk of 256
    torch.manual_seed(3)
    assert sample_policy(policies["ppo"], tok, PROMPTS, sample_cfg, cfg.data) == shown
