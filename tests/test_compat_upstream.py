"""verl's and OpenRLHF's own unit tests of the functions rlp_engine.compat replaces, run with ours
substituted: the test files their wheels install (site-packages/tests/...) are loaded unchanged and
the names they imported from the real package are rebound to rlp_engine.compat's functions.

- verl 0.9.1: tests/trainer/ppo/test_loss_aggregation_on_cpu.py (agg_loss),
  test_value_loss_normalization_on_cpu.py (compute_value_loss) and, of test_core_algos_on_cpu.py,
  the GAE and KL-penalty tests (the rest cover estimators rlp_engine does not replace).
- OpenRLHF 0.11.2: tests/test_kl_estimator_gradient.py (compute_approx_kl).
- TRL 1.12: neither its wheel nor its sdist ships its tests, so none run here.
"""

import pytest
from test_compat_peers import _VERL_STUBS, openrlhf_modules, upstream_test_module, verl_modules

from rlp_engine.compat import openrlhf, verl


def _export(module, names, prefix, **substitutes):
    """Rebind `substitutes` in `module` and publish its tests `names` here under `prefix`."""
    for name, fn in substitutes.items():
        assert hasattr(module, name), f"{module.__name__} no longer imports {name}"
        setattr(module, name, fn)
    for name in names:
        globals()[f"test_{prefix}_{name.removeprefix('test_')}"] = getattr(module, name)


def _tests(module):
    return [n for n in vars(module) if n.startswith("test_")]


def _skip_all(prefix, reason):
    def test_skipped():
        pytest.skip(reason)

    globals()[f"test_{prefix}_upstream_tests"] = test_skipped


try:
    verl_modules()
    agg = upstream_test_module("verl", "trainer/ppo/test_loss_aggregation_on_cpu.py", _VERL_STUBS)
    _export(agg, _tests(agg), "verl_agg", agg_loss=verl.agg_loss)
    value = upstream_test_module("verl", "trainer/ppo/test_value_loss_normalization_on_cpu.py", _VERL_STUBS)
    _export(value, _tests(value), "verl_value", compute_value_loss=verl.compute_value_loss)
    core = upstream_test_module("verl", "trainer/ppo/test_core_algos_on_cpu.py", _VERL_STUBS)
    _export(
        core,
        [
            "test_multi_turn_compute_gae_advantage_return",
            "test_kl_penalty_straight_through_value_matches_base",
            "test_kl_penalty_k3_plus_uses_k2_gradient",
        ],
        "verl_core",
        compute_gae_advantage_return=verl.compute_gae_advantage_return,
        kl_penalty=verl.kl_penalty,
    )
except pytest.skip.Exception as why:
    _skip_all("verl", str(why))

try:
    openrlhf_modules()
    kl = upstream_test_module("openrlhf", "test_kl_estimator_gradient.py", ["deepspeed"])
    _export(kl, _tests(kl), "openrlhf_kl", compute_approx_kl=openrlhf.compute_approx_kl)
except pytest.skip.Exception as why:
    _skip_all("openrlhf", str(why))
