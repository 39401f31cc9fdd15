"""rlp_engine.integrations.verl.register() against the installed verl 0.9.1 (loaded by
test_compat_peers.verl_modules): after it, verl's own getters return rlp-engine's functions under the
documented names, and those give what verl's built-ins give when called the way verl's trainer and
workers call them, on fresh random inputs with masks that have holes and empty rows."""

import importlib
import sys

import numpy as np
import pytest
import torch
from test_compat_peers import masks, seeded, verl_modules

from rlp_engine.compat import verl as compat
from rlp_engine.integrations import verl as integration

_ = seeded
B, T = 8, 11
_ACTOR = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def core():
    core_algos, _ = verl_modules()
    integration.register()
    return core_algos


def _algo_config(**fields):
    return importlib.import_module("verl.trainer.config").AlgoConfig(**fields)


def test_getters_return_ours_and_register_is_idempotent(core):
    assert core.get_policy_loss_fn("rlp_vanilla") is compat.compute_policy_loss_vanilla
    for name, fn in integration.ADV_ESTIMATORS.items():
        assert core.get_adv_estimator_fn(name) is fn
    before = (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY))
    assert integration.register() == ["rlp_vanilla", *integration.ADV_ESTIMATORS]
    assert (dict(core.POLICY_LOSS_REGISTRY), dict(core.ADV_ESTIMATOR_REGISTRY)) == before
    assert core.get_policy_loss_fn("vanilla") is core.compute_policy_loss_vanilla  # verl's untouched


def test_a_name_taken_by_another_function_is_refused(core, monkeypatch):
    monkeypatch.setitem(core.POLICY_LOSS_REGISTRY, "rlp_vanilla", core.compute_policy_loss_vanilla)
    with pytest.raises(ValueError, match="policy-loss registry already has 'rlp_vanilla'"):
        integration.register()
    monkeypatch.setitem(core.POLICY_LOSS_REGISTRY, "rlp_vanilla", compat.compute_policy_loss_vanilla)
    monkeypatch.setitem(core.ADV_ESTIMATOR_REGISTRY, "rlp_rloo", core.compute_rloo_outcome_advantage)
    with pytest.raises(ValueError, match="advantage-estimator registry already has 'rlp_rloo'"):
        integration.register()


def test_without_verl_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)  # import of it fails
    with pytest.raises(ImportError, match=r"needs verl \(pip install verl==0.9.1\)"):
        integration.register()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dp_size", [1, 2])
def test_rlp_vanilla_is_verls_vanilla(core, mode, dp_size):
    for mask in masks(B, T, (torch.float32, torch.bool)):
        info = {}
        if dp_size > 1:
            info = {"dp_size": dp_size, "batch_num_tokens": int(mask.sum()) * 2 + 5}
            info.update(global_batch_size=B * 2, loss_scale_factor=9 if mode.endswith("norm") else None)
        cfg = core.ActorConfig(
            **_ACTOR, clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_c=2.0, global_batch_info=info
        )
        old = torch.randn(B, T) * 0.3 - 2.0
        lp = old + torch.randn(B, T) * 0.2
        adv = torch.randn(B, T)
        isw = torch.rand(B, T) + 0.5
        got = []
        for name in ("rlp_vanilla", "vanilla"):
            x = lp.clone().requires_grad_(True)
            # as verl.workers.utils.losses.ppo_loss calls it
            loss, metrics = core.get_policy_loss_fn(name)(
                old_log_prob=old,
                log_prob=x,
                advantages=adv,
                response_mask=mask,
                loss_agg_mode=mode,
                config=cfg,
                rollout_is_weights=isw,
            )
            got.append((loss, metrics, torch.autograd.grad(loss, x)[0]))
        (loss, metrics, grad), (want, want_m, want_g) = got
        assert loss.dtype == want.dtype
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_g, rtol=1e-5, atol=1e-7)
        assert metrics.keys() == want_m.keys()
        for k in metrics:
            assert metrics[k] == pytest.approx(want_m[k], rel=1e-5, abs=1e-6), k


def _outcome_batch(with_baselines):
    """verl's compute_advantage kwargs for a registered estimator: rewards on the last response
    token, the uid groups (numpy object array, shuffled; one group of a single row), the config."""
    mask = masks(B, T, (torch.float32,))[0]
    mask[1, 0] = 1.0  # verl's outcome rewards need one response token per row
    rewards = torch.zeros(B, T)
    last = (mask * torch.arange(T)).argmax(-1)
    rewards[torch.arange(B), last] = torch.randn(B)
    uids = np.array([f"uid-{g}" for g in [0, 1, 0, 2, 1, 0, 1, 3]], dtype=object)
    kw = {"token_level_rewards": rewards, "response_mask": mask, "index": uids}
    if with_baselines:
        kw["reward_baselines"] = torch.randn(B)
    return kw


@pytest.mark.parametrize("name", ["rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax"])
def test_estimators_are_verls(core, name):
    kw = _outcome_batch(with_baselines=name == "remax")
    cfg = _algo_config(gamma=0.9)
    got = core.get_adv_estimator_fn("rlp_" + name)(**kw, config=cfg)
    want = core.get_adv_estimator_fn(name)(**kw, config=cfg)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_rlp_grpo_reads_the_std_switch_from_the_config(core, norm):
    """verl's trainer passes norm_adv_by_std_in_grpo to its own "grpo" on a hard-coded branch and
    only `config` to a registered estimator: rlp_grpo called that way equals verl's grpo called with
    the switch, and an explicit argument still wins over the config."""
    kw = _outcome_batch(with_baselines=False)
    got, _ = core.get_adv_estimator_fn("rlp_grpo")(**kw, config=_algo_config(norm_adv_by_std_in_grpo=norm))
    want, _ = core.compute_grpo_outcome_advantage(**kw, norm_adv_by_std_in_grpo=norm)
    other, _ = core.compute_grpo_outcome_advantage(**kw, norm_adv_by_std_in_grpo=not norm)
    assert not torch.allclose(want, other)  # the switch matters on these inputs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    explicit, _ = core.get_adv_estimator_fn("rlp_grpo")(
        **kw, norm_adv_by_std_in_grpo=not norm, config=_algo_config(norm_adv_by_std_in_grpo=norm)
    )
    torch.testing.assert_close(explicit, other, rtol=1e-5, atol=1e-6)
