"""The arena's offline preference methods (DPO, IPO, SimPO): algos.preference's math on tensors against
float64 written out by hand, the recipe on a tiny model, and the stages end to end on the tiny preset."""

import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_preset

from rlp_engine.algos.preference import preference_losses, preference_metrics, sequence_logps, split_pairs
from rlp_engine.config import ConfigError, load_config
from rlp_engine.data.batch import PairData
from rlp_engine.data.records import Preference
from rlp_engine.recipes.preference import method_settings, pair_logps, preference_optimize, reference_logps
from rlp_engine.recipes.scaffold import TrainContext


def _mask(b, r, gen):
    m = (torch.rand(b, r, generator=gen) > 0.4).double()
    m[:, 0] = 1.0  # every row holds at least its first token (eos)
    return m


@pytest.mark.parametrize("shape", [(1, 1), (6, 5), (7, 13)])
def test_sequence_logps_sum_and_mean_match_float64(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    lp64 = (-3 * torch.rand(*shape, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = _mask(*shape, gen)
    lp32 = lp64.detach().float().requires_grad_(True)
    for average in (False, True):
        want = [
            sum(lp64[i, j] for j in range(shape[1]) if mask[i, j]) / (mask[i].sum() if average else 1)
            for i in range(shape[0])
        ]
        want = torch.stack(want)
        got = sequence_logps(lp32, mask.float(), average)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)
        w = torch.randn(shape[0], generator=gen, dtype=torch.float64)
        (g64,) = torch.autograd.grad((want * w).sum(), lp64)
        (g32,) = torch.autograd.grad((got * w.float()).sum(), lp32)
        torch.testing.assert_close(g32.double(), g64, rtol=1e-6, atol=1e-6)
        assert (g32[mask == 0] == 0).all()  # padding gets no gradient


def test_sequence_logps_hand_worked_and_bad_input():
    lp = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sequence_logps(lp, mask).tolist() == [-3.0, -0.5]
    assert sequence_logps(lp, mask, average=True).tolist() == [-1.5, -0.5]
    empty = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert sequence_logps(lp, empty).tolist() == [-3.0, 0.0]  # a sum over nothing is 0
    with pytest.raises(ValueError, match="no response token"):
        sequence_logps(lp, empty, average=True)
    with pytest.raises(ValueError, match="token_logps and mask"):
        sequence_logps(lp, mask[:, :2])


def test_split_pairs_halves_chosen_then_rejected():
    c, r = split_pairs(torch.arange(6))
    assert c.tolist() == [0, 1, 2] and r.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="even count"):
        split_pairs(torch.arange(5))


def _want(method, pc, pr, rc, rr, beta, ratio, eps):
    """Each method's per-pair loss in float64, from the papers' formulas."""
    if method == "simpo":
        z = beta * (pc - pr) - ratio * beta
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    d = (pc - rc) - (pr - rr)
    if method == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)


@pytest.mark.parametrize(
    "method,beta,ratio,eps",
    [("dpo", 0.1, 0.0, 0.0), ("dpo", 0.5, 0.0, 0.2), ("ipo", 0.1, 0.0, 0.0), ("ipo", 1.3, 0.0, 0.0),
     ("simpo", 2.0, 0.5, 0.0), ("simpo", 2.5, -0.3, 0.1)],
)  # fmt: skip
def test_preference_losses_match_float64_forward_and_gradient(method, beta, ratio, eps):
    gen = torch.Generator().manual_seed(7)
    n = 9
    x64 = [(-20 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]
    x32 = [t.detach().float().requires_grad_(True) for t in x64]
    refs32 = (None, None) if method == "simpo" else (x32[2], x32[3])
    losses, r_c, r_r = preference_losses(
        method, x32[0], x32[1], *refs32, beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps
    )
    want = _want(method, *x64, beta, ratio, eps)
    torch.testing.assert_close(losses.double(), want.detach(), rtol=1e-5, atol=1e-5)
    shift = (0, 0) if method == "simpo" else (x64[2], x64[3])
    torch.testing.assert_close(r_c.double(), beta * (x64[0] - shift[0]).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_r.double(), beta * (x64[1] - shift[1]).detach(), rtol=1e-5, atol=1e-5)
    assert not r_c.requires_grad and not r_r.requires_grad
    used = 2 if method == "simpo" else 4
    g64 = torch.autograd.grad(want.mean(), x64[:used])
    g32 = torch.autograd.grad(losses.mean(), x32[:used])
    for a, b in zip(g32, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_preference_losses_hand_worked():
    one = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # d = (-1 + 2) - (-3 + 2) = 2; DPO: -log sigmoid(0.5 * 2) = log(1 + e^-1)
    dpo, r_c, r_r = preference_losses("dpo", *one, beta=0.5)
    assert dpo.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert (r_c.item(), r_r.item()) == (pytest.approx(0.5), pytest.approx(-0.5))
    # IPO: (2 - 1 / (2 * 0.25))^2 = 0
    assert preference_losses("ipo", *one, beta=0.25)[0].item() == pytest.approx(0.0, abs=1e-7)
    # SimPO: z = 2 * (-1 + 3) - 0.5 * 2 = 3
    simpo = preference_losses("simpo", *one[:2], beta=2.0, gamma_beta_ratio=0.5)[0]
    assert simpo.item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-6)


def test_preference_losses_refuse_bad_input():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="method"):
        preference_losses("kto", x, x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_losses("dpo", x, x, beta=0.1)
    with pytest.raises(ValueError, match="reference-free"):
        preference_losses("simpo", x, x, x, x, beta=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_losses("ipo", x, x, x, x, beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_losses("dpo", x, x, x, x, beta=0.0)


def test_preference_metrics_hand_worked():
    m = preference_metrics(torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.0]), torch.tensor([0.0, 1.0]))
    assert {k: v.item() for k, v in m.items()} == {
        "loss": 2.0,
        "reward_acc": 0.5,
        "margin": -0.75,
        "chosen_reward": -0.25,
        "rejected_reward": 0.5,
    }


def test_method_settings_and_config():
    keys = ["label_smoothing=0.1", "dpo_beta=0.2", "ipo_beta=0.3", "simpo_beta=3"]
    keys += ["simpo_gamma_beta_ratio=0.7"]
    cfg = load_config(overrides=[f"offline.{k}" for k in keys]).offline
    assert method_settings("dpo", cfg) == {"beta": 0.2, "label_smoothing": 0.1}
    assert method_settings("ipo", cfg) == {"beta": 0.3}  # IPO does not smooth
    assert method_settings("simpo", cfg) == {"beta": 3.0, "gamma_beta_ratio": 0.7, "label_smoothing": 0.1}
    with pytest.raises(ValueError, match="method"):
        method_settings("orpo", cfg)
    for bad in ("offline.dpo_beta=0", "offline.label_smoothing=0.5", "offline.batch_size=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(overrides=[bad])


@pytest.fixture(scope="module")
def tiny():
    cfg, tok, policy = tiny_preset()
    policy.eval()
    # the right sum is preferred over one off by one
    pairs = [Preference(f"{a}+{b}=", str(a + b), str(a + b + 1)) for a in range(4) for b in range(4)]
    return cfg, tok, policy, pairs


def _objective(model, ref, data, method, settings):
    """(mean loss, implicit-reward accuracy) of `model` on all of `data`."""
    with torch.no_grad():
        batch = data.batch(range(len(data)))
        chosen, rejected = pair_logps(model, batch, average=method == "simpo")
        refs = (None, None) if method == "simpo" else ref
        m = preference_metrics(*preference_losses(method, chosen, rejected, *refs, **settings))
    return m["loss"].item(), m["reward_acc"].item()


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo"])
def test_preference_optimize_improves_its_objective_and_leaves_the_policy(tiny, method):
    cfg, tok, policy, pairs = tiny
    off = dataclasses.replace(cfg.offline, steps=30, batch_size=16, lr=3e-3, warmup_steps=2)
    data = PairData(tok, pairs, cfg.data)
    ref = reference_logps(policy, data, 5, "cpu")  # odd batch size: the concatenation keeps the order
    settings = method_settings(method, off)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    loss0, acc0 = _objective(policy, ref, data, method, settings)
    trained = preference_optimize(policy, tok, pairs, method, off, cfg.data, TrainContext(stage=method))
    loss1, acc1 = _objective(trained, ref, data, method, settings)
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert acc1 > acc0 and acc1 >= 0.75, (acc0, acc1)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # policy untouched
    if method == "dpo":
        assert loss0 == pytest.approx(math.log(2), abs=1e-4)  # the policy is its own reference


def test_stages_dpo_ipo_simpo_end_to_end(tmp_path):
    from rlp_engine.cli import main

    out = tmp_path / "run"
    args = ["--output-dir", str(out), "run.threads=1", "run.stages=dpo,ipo,simpo"]
    rc = main(["train", "--preset", "tiny", *args])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert {"sft", "ppo", "dpo", "ipo", "simpo"} <= set(report["policies"])
    assert "DPO" in (out / "report.md").read_text()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in logged if r.get("stage") == "dpo"]
    assert len(dpo) == load_config(preset="tiny").offline.steps
    assert {"loss", "reward_acc", "margin", "chosen_reward", "rejected_reward"} <= set(dpo[-1])


def _train(out, *args):
    """`rlp-engine train` (or tests/fault_runner.py's) as a subprocess on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    return res


def _outcome(out):
    """Exported weights of the offline stages (hashes) and their metrics lines."""
    weights = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for name in ("dpo", "ipo")
        for p in sorted((out / "checkpoints" / name).glob("*.safetensors"))
    }
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, [r for r in lines if r.get("stage") in ("dpo", "ipo")]


@pytest.mark.slow  # three CLI processes, ~45 s on one thread
def test_killed_offline_stage_resumes_to_the_uninterrupted_result(tmp_path):
    """Killed inside IPO one step after its step-2 checkpoint (DPO finished before): the resumed run
    loads DPO's weights, continues IPO and ends with the uninterrupted run's weights and metrics."""
    args = ["train", "--preset", "tiny", "run.stages=dpo,ipo", "run.checkpoint_every=2"]
    args += ["run.tensorboard=false", "run.threads=1"]
    base, out = tmp_path / "base", tmp_path / "run"
    assert _train(base, "-m", "rlp_engine.cli", *args, "--output-dir", str(base)).returncode == 0
    runner = str(Path(__file__).with_name("fault_runner.py"))
    first = _train(out, runner, "--kill-at", "ipo:3", "--", *args, "--output-dir", str(out))
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    res = _train(out, "-m", "rlp_engine.cli", "train", "--output-dir", str(out), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = _outcome(out), _outcome(base)
    assert len(want[0]) == 2 and len(want[1]) == 2 * load_config(preset="tiny").offline.steps
    assert got == want
