"""The adaptive KL controller (Ziegler et al. 2019; TRL's and verl's AdaptiveKLController): the update
rule on hand-worked values and against the real controllers when installed, its config keys, and a
tiny real PPO run whose coefficient follows the measured KL, is logged and resumes exactly."""

import copy
import dataclasses
import math
import random

import pytest
import torch
from tiny import tiny_preset

from rlp_engine.algos.ppo import adaptive_kl_coef, next_kl_coef
from rlp_engine.config import ConfigError, load_config
from rlp_engine.engine.checkpoint import CheckpointStore, LoopCheckpoint
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import MetricsLogger, Throughput
from rlp_engine.models import ScalarHeadModel
from rlp_engine.models.policy import unwrap_lm
from rlp_engine.recipes.ppo import init_ppo, make_experience, ppo, ppo_step
from rlp_engine.recipes.scaffold import TrainContext

PROMPTS = [f"{a}+{b}=" for a in range(4) for b in range(4)]


# ---------------------------------------------------------------- the update rule


@pytest.mark.parametrize(
    ("coef", "kl", "target", "horizon", "n", "want"),
    [
        # e = 1.5/1 - 1 = 0.5 -> clipped to 0.2; 1 + 0.2 * 10/100 = 1.02; 0.1 * 1.02
        (0.1, 1.5, 1.0, 100, 10, 0.102),
        # e = 0.9/1 - 1 = -0.1 (inside the clip); 1 - 0.1 * 50/100 = 0.95; 0.1 * 0.95
        (0.1, 0.9, 1.0, 100, 50, 0.095),
        # e = 3/2 - 1 = 0.5 -> 0.2; 1 + 0.2 * 64/10000 = 1.00128; 0.0067 * 1.00128
        (0.0067, 3.0, 2.0, 10000, 64, 0.006708576),
        # e = 0.1/6 - 1 = -0.98333 -> -0.2; 1 - 0.2 * 512/10000 = 0.98976; 0.2 * 0.98976
        (0.2, 0.1, 6.0, 10000, 512, 0.197952),
        # e = 2.2/2 - 1 = 0.1; 1 + 0.1 * 8/4 = 1.2; 0.5 * 1.2
        (0.5, 2.2, 2.0, 4, 8, 0.6),
        # KL on target: e = 0, unchanged
        (0.3, 2.0, 2.0, 7, 3, 0.3),
    ],
)
def test_update_rule_hand_worked(coef, kl, target, horizon, n, want):
    assert adaptive_kl_coef(coef, kl, target, horizon, n) == pytest.approx(want, rel=1e-12)


def test_proportional_error_is_clipped_both_ways():
    # horizon == n_steps: the multiplier is 1 + e, so clipping shows as a factor of exactly 1.2 / 0.8
    for kl in (1.2, 5.0, 1e6, math.inf):  # e = 0.2, 4, ~1e6, inf -> 0.2
        assert adaptive_kl_coef(0.25, kl, 1.0, 8, 8) == pytest.approx(0.25 * 1.2, rel=1e-12)
    for kl in (0.8, 0.5, 1e-9, 0.0):  # e = -0.2, -0.5, ~-1, -1 -> -0.2
        assert adaptive_kl_coef(0.25, kl, 1.0, 8, 8) == pytest.approx(0.25 * 0.8, rel=1e-12)
    # just inside the band: not clipped (e = 0.1 and -0.1)
    assert adaptive_kl_coef(0.25, 1.1, 1.0, 8, 8) == pytest.approx(0.25 * 1.1, rel=1e-12)
    assert adaptive_kl_coef(0.25, 0.9, 1.0, 8, 8) == pytest.approx(0.25 * 0.9, rel=1e-12)
    # more samples than the horizon: 1 + 0.2 * 30/10 = 1.6; 1 - 0.2 * 30/10 = 0.4
    assert adaptive_kl_coef(1.0, 9.0, 1.0, 10, 30) == pytest.approx(1.6, rel=1e-12)
    assert adaptive_kl_coef(1.0, 0.0, 1.0, 10, 30) == pytest.approx(0.4, rel=1e-12)


def test_nan_kl_leaves_the_coefficient_and_bad_arguments_raise():
    assert adaptive_kl_coef(0.05, math.nan, 1.0, 100, 8) == 0.05
    for target in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="target must be a finite number > 0"):
            adaptive_kl_coef(0.05, 1.0, target, 100, 8)
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        adaptive_kl_coef(0.05, 1.0, 1.0, 0, 8)


def _reference_controller(module: str):
    # the installed, pinned verl and TRL through test_compat_peers' loaders (their unrelated heavy
    # imports, e.g. ray and pandas, stubbed), not a bare import that skips on this environment
    from test_compat_peers import trl_modules, verl_modules

    mod = {"trl.trainer.utils": trl_modules, "verl.trainer.ppo.core_algos": verl_modules}[module]()[0]
    if not hasattr(mod, "AdaptiveKLController"):
        pytest.skip(f"{module} has no AdaptiveKLController in this version")
    return mod.AdaptiveKLController


@pytest.mark.parametrize("module", ["trl.trainer.utils", "verl.trainer.ppo.core_algos"])
def test_matches_the_real_adaptive_kl_controller(module):
    """TRL (<= 0.11, trl.trainer.utils) and verl (core_algos) keep Ziegler's controller; both take
    (init_kl_coef, target, horizon) positionally and update(current, n_steps). Bit-identical."""
    cls = _reference_controller(module)
    rng = random.Random(7)
    for _ in range(200):
        coef, target = rng.uniform(1e-4, 1.0), rng.uniform(0.05, 10.0)
        kl = target * rng.choice([rng.uniform(0.0, 3.0), rng.uniform(0.85, 1.15)])  # clipped or not
        horizon, n = rng.randint(1, 20000), rng.randint(1, 1024)
        ctrl = cls(coef, target, horizon)
        ctrl.update(kl, n)
        assert float(ctrl.value) == adaptive_kl_coef(coef, kl, target, horizon, n)


def test_next_kl_coef_fixed_without_a_target():
    cfg = load_config().ppo
    assert cfg.kl_target is None
    assert (
        next_kl_coef(0.0067, 5.0, 64, target=cfg.kl_target, horizon=cfg.kl_horizon) == 0.0067
    )  # fixed: any KL leaves it
    cfg = load_config(overrides=["ppo.kl_target=1.0", "ppo.kl_horizon=64"]).ppo
    assert next_kl_coef(0.0067, 5.0, 64, target=cfg.kl_target, horizon=cfg.kl_horizon) == pytest.approx(
        0.0067 * 1.2, rel=1e-12
    )


# ---------------------------------------------------------------- config


def test_config_keys_defaults_and_valid_values(tmp_path):
    p = load_config().ppo
    assert (p.kl_coef, p.kl_target, p.kl_horizon) == (0.15, None, 10000)
    p = load_config(overrides=["ppo.kl_target=6", "ppo.kl_horizon=1"]).ppo
    assert p.kl_target == 6.0 and isinstance(p.kl_target, float) and p.kl_horizon == 1
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  kl_target: 0.5\n  kl_horizon: 512\n")
    p = load_config(f, ["ppo.kl_target=null"]).ppo
    assert (p.kl_target, p.kl_horizon) == (None, 512)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.kl_target=0", r"override ppo\.kl_target: 0\.0 is out of range; expected a finite number > 0"),
        ("ppo.kl_target=-1.5", r"override ppo\.kl_target: -1\.5 is out of range"),
        ("ppo.kl_target=.inf", r"override ppo\.kl_target: inf is out of range"),
        ("ppo.kl_target=.nan", r"override ppo\.kl_target: nan is out of range"),
        ("ppo.kl_target=lots", r"override ppo\.kl_target: expected float, got str 'lots'"),
        ("ppo.kl_horizon=0", r"override ppo\.kl_horizon: 0 is out of range; expected an int >= 1"),
        ("ppo.kl_horizon=-5", r"override ppo\.kl_horizon: -5 is out of range"),
        ("ppo.kl_horizon=2.5", r"override ppo\.kl_horizon: expected int, got float"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_config_errors_name_the_file_and_a_zero_start(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ppo:\n  kl_horizon: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: ppo\.kl_horizon: 0 is out of range"):
        load_config(f)
    # a multiplicative controller never leaves 0
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef: 0\.0 with ppo\.kl_target set"):
        load_config(overrides=["ppo.kl_target=1", "ppo.kl_coef=0"])
    assert load_config(overrides=["ppo.kl_coef=0"]).ppo.kl_coef == 0.0  # fixed at 0 stays allowed


# ---------------------------------------------------------------- a tiny real PPO run


@pytest.fixture(scope="module")
def tiny():
    # beta 0.0067 (AlpacaFarm's; the default is 0.15 now): the hand-worked values below start there
    return tiny_preset(("ppo.kl_coef=0.0067",))


def _state(tiny, **ppo_fields):
    """A PPOState whose reference is the policy plus noise: the KL to it is > 0 from the first rollout
    (with an identical reference the first rollout's KL is exactly 0)."""
    cfg, tok, policy = tiny
    ppo_cfg = dataclasses.replace(cfg.ppo, **ppo_fields)
    state = init_ppo(policy, ScalarHeadModel.from_causal_lm(policy), tok, ppo_cfg, cfg.data, seed=0)
    with torch.no_grad():
        for p in state.ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return state


def _run_steps(state, steps: int) -> list[dict]:
    tp = Throughput()
    out = []
    for step in range(steps):
        before = state.kl_coef
        m = ppo_step(state, PROMPTS[:8], tp, step=step)
        assert m["kl_coef"] == before  # logged: the coefficient this rollout was shaped with
        assert m["kl_seq_mean"] > 0
        want = next_kl_coef(
            before, m["kl_seq_mean"], 8, target=state.cfg.kl_target, horizon=state.cfg.kl_horizon
        )
        assert state.kl_coef == want  # updated by the all-rank mean summed KL over the 8 samples
        out.append(m)
    return out


@pytest.mark.parametrize(("target", "factor"), [(1e-6, 1.2), (1e6, 0.8)])
def test_coefficient_rises_above_target_and_falls_below(tiny, target, factor):
    """kl_horizon = 8 = the rollout batch: a clipped error moves beta by exactly x1.2 (KL far above
    the target) or x0.8 (far below) each step."""
    state = _state(tiny, kl_target=target, kl_horizon=8)
    _run_steps(state, 3)
    assert state.kl_coef == pytest.approx(0.0067 * factor**3, rel=1e-12)


def test_fixed_coefficient_stays_constant(tiny):
    state = _state(tiny)  # kl_target None
    metrics = _run_steps(state, 3)
    assert state.kl_coef == 0.0067 and [m["kl_coef"] for m in metrics] == [0.0067] * 3


def test_rewards_are_shaped_with_the_states_coefficient(tiny):
    """gamma = lam = 1: the return at the first response token is the sum of the shaped rewards,
    seq_score - beta * sum_t kl_t, so two betas differ by (b2 - b1) * summed KL per sequence."""
    cfg, tok, _ = tiny
    state = _state(tiny)
    batch = sample(state.actor, tok, PROMPTS, state.cfg, cfg.data).batch
    tp = Throughput()
    low = make_experience(state, batch, tp)
    state.kl_coef = 0.5  # cfg.kl_coef stays 0.0067
    high = make_experience(state, batch, tp)
    kl_sum = low.kl.sum(-1)
    assert (kl_sum > 0).any()
    torch.testing.assert_close(low.returns[:, 0] - high.returns[:, 0], (0.5 - 0.0067) * kl_sum)


def test_ppo_loop_logs_and_resumes_the_coefficient_exactly(tiny, tmp_path):
    """ppo() with a checkpoint every 2 steps, then a second ppo() resumed from the step-2 checkpoint:
    the coefficient comes back from the loop state, so steps 2-3 (kl_coef included) and the final
    actor are bit-identical to the uninterrupted run."""
    cfg, tok, policy = tiny
    ppo_cfg = dataclasses.replace(cfg.ppo, steps=4, kl_target=0.05, kl_horizon=8, lr=3e-3)
    store = CheckpointStore(tmp_path / "resume", keep=2)
    rm = ScalarHeadModel.from_causal_lm(policy)  # the stage's input: the same in both runs

    def run(resume_from=None):
        logger = MetricsLogger()
        ckpt = LoopCheckpoint(store, "ppo", 2, dict, resume_from=resume_from)
        args = (policy, copy.deepcopy(rm), tok, PROMPTS, ppo_cfg, cfg.data)
        actor = ppo(*args, TrainContext(stage="ppo", logger=logger, log_every=1, ckpt=ckpt))
        curves = {k: v for k, v in logger.curves["ppo"].items() if "seconds" not in k}
        return curves, unwrap_lm(actor).state_dict()

    full, full_actor = run()
    coefs = [v for _, v in full["kl_coef"]]
    assert len(coefs) == 4 and coefs[0] == 0.0067 and len(set(coefs)) == 4  # logged every step, moving
    path, meta = store.latest()
    assert meta["loop"]["step"] == 2 and meta["loop"]["kl_coef"] == coefs[2]
    resumed, resumed_actor = run(resume_from=(path, meta))
    assert resumed["kl_coef"] == full["kl_coef"][2:]
    for k, v in resumed.items():
        assert v == full[k][2:], k
    for k, v in full_actor.items():
        assert torch.equal(v, resumed_actor[k]), k
