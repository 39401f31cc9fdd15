"""Typed configs: presets, YAML files, dotted overrides, and clear errors for bad keys and values."""

import pytest

from rlp_engine.config import ConfigError, load_config, parse_override


def test_default_preset_has_alpacafarm_ppo_and_rlp_defaults():
    cfg = load_config()
    p = cfg.ppo
    # AlpacaFarm's except beta: 0.0067 let PPO drift onto what the proxy RM cannot see (config.py)
    assert (p.kl_kind, p.kl_coef, p.whiten_rewards, p.gamma, p.lam) == ("k1_nonneg", 0.15, True, 1.0, 1.0)
    assert (p.whiten_advantages, p.clip, p.value_clip, p.vf_coef, p.entropy_coef) == (
        True,
        0.2,
        0.2,
        0.1,
        0.0,
    )
    assert (p.temperature, cfg.eval.temperature) == (1.0, 0.7)
    assert (cfg.uml.lam, cfg.uml.beta, cfg.sample.n, cfg.spg.gamma) == (0.5, 0.01, 10, 0.5)


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nppo:\n  kl_coef: 0.05\n  steps: 3\nmodel:\n  path: null\n")
    cfg = load_config(f, ["ppo.steps=7", "sft.lr=1e-3", "run.tensorboard=false"])
    assert cfg.model.hidden_size == 32  # from the tiny preset
    assert cfg.ppo.kl_coef == 0.05  # from the file
    assert cfg.ppo.steps == 7  # the override wins over the file
    assert cfg.sft.lr == 1e-3 and isinstance(cfg.sft.lr, float)
    assert cfg.run.tensorboard is False


def test_int_widens_to_float_but_not_the_reverse():
    assert load_config(overrides=["ppo.kl_coef=1"]).ppo.kl_coef == 1.0
    with pytest.raises(ConfigError, match=r"ppo\.steps: expected int, got float"):
        load_config(overrides=["ppo.steps=2.5"])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("ppo:\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: ppo\.kl_coeff: unknown key"):
        load_config(f)


def test_unknown_section_and_wrong_type_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optimizer\.lr: unknown section 'optimizer'"):
        load_config(f)
    f.write_text("sft:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: sft\.steps: expected int, got str 'many'"):
        load_config(f)
    f.write_text("run:\n  progress: 1\n")
    with pytest.raises(ConfigError, match=r"run\.progress: expected bool"):
        load_config(f)


def test_bad_choice_and_malformed_override():
    with pytest.raises(ConfigError, match=r"ppo\.kl_kind: 'k9' is not one of"):
        load_config(overrides=["ppo.kl_kind=k9"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(overrides=["ppo.steps"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config(preset="huge")


def _config_accepts(key, value) -> bool:
    try:
        return getattr(load_config(overrides=[f"{key}={value}"]).ppo, key.split(".")[1]) == value
    except ConfigError:
        return False


def _op_accepts(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except ValueError:
        return False
    return True


# names the ops refuse, near the ones they accept
NEAR_MISSES = ("k9", "K3", "k3++", "+", "kl_nonneg", "seq-sum", "token_mean", "seq-mean-token-sum-norm+")


def test_config_accepts_exactly_the_kinds_and_agg_modes_the_ops_accept():
    """ppo.kl_kind / ppo.agg take the names the ops take (one list, rlp_engine.op_names): the "+"
    kinds too (config used to refuse ppo.kl_kind=k3+ although kl_penalty accepts it)."""
    import torch

    from rlp_engine import ops

    lp, ref = torch.randn(2, 3), torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for kind in (*ops.KL_KINDS, *NEAR_MISSES):
        op = _op_accepts(ops.kl_penalty, lp, ref, kind)
        assert _config_accepts("ppo.kl_kind", kind) == op, kind
    for agg in (*ops.AGG_MODES, *NEAR_MISSES):
        op = _op_accepts(ops.ppo_policy_loss, lp, ref, ref, mask, agg=agg)
        assert op == _op_accepts(ops.agg_loss, lp, mask, agg), agg
        assert _config_accepts("ppo.agg", agg) == op, agg
    assert _config_accepts("ppo.kl_kind", "k3+") and not _config_accepts("ppo.kl_kind", "k9")


def test_parse_override_values():
    assert parse_override("model.path=null") == ("model.path", None)
    assert parse_override("a.b=3e-4") == ("a.b", 3e-4)
    assert parse_override("a.b=k1_nonneg") == ("a.b", "k1_nonneg")
    assert parse_override("a.b=true") == ("a.b", True)
