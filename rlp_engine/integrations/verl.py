"""rlp-engine's PPO policy loss and outcome advantage estimators in verl's own registries.

    from rlp_engine.integrations import verl as rlp_verl
    rlp_verl.register()   # once, in the driver and in each worker process, before training starts

then select them by name in the verl config:

    algorithm.adv_estimator=rlp_grpo  actor_rollout_ref.actor.policy_loss.loss_mode=rlp_vanilla

Registered names (verl 0.9.1's `register_policy_loss` / `register_adv_est` in
verl.trainer.ppo.core_algos; the functions are rlp_engine.compat.verl's, which are exact against verl's
own: same values, dtypes, metrics and errors, tests/test_integrations_verl.py):
- policy loss "rlp_vanilla": verl's "vanilla" (clipped PPO with dual clip, every loss_agg_mode).
- advantage estimators "rlp_grpo", "rlp_rloo", "rlp_reinforce_plus_plus",
  "rlp_reinforce_plus_plus_baseline", "rlp_remax": verl's "grpo", "rloo", ... of the same names.

verl's trainer calls a registered estimator with (token_level_rewards, response_mask, config, index,
reward_baselines where present) and no `norm_adv_by_std_in_grpo`: its own "grpo" gets that argument only
on a hard-coded branch. So "rlp_grpo" reads `config.norm_adv_by_std_in_grpo` (verl's AlgoConfig field,
default True) when the argument is not given. GAE is not registrable: verl special-cases "gae" and
passes `values` to it alone (use rlp_engine.compat.verl.compute_gae_advantage_return in a verl tree).

The registries are per process: call register() in every process that looks a name up (verl's
driver, where the advantage is computed, and each actor worker, where the loss is).
"""

from __future__ import annotations

import importlib

from rlp_engine.compat import verl as compat


def compute_grpo_outcome_advantage(
    token_level_rewards,
    response_mask,
    index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=None,
    config=None,
):
    """compat.verl's GRPO (verl's own), with `norm_adv_by_std_in_grpo` read from `config` (verl's
    AlgoConfig, default True) when not given: the registry path of verl's trainer never passes it."""
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = True if config is None else config.get("norm_adv_by_std_in_grpo", True)
    return compat.compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config
    )


POLICY_LOSSES = {"rlp_vanilla": compat.compute_policy_loss_vanilla}
ADV_ESTIMATORS = {
    "rlp_grpo": compute_grpo_outcome_advantage,
    "rlp_rloo": compat.compute_rloo_outcome_advantage,
    "rlp_reinforce_plus_plus": compat.compute_reinforce_plus_plus_outcome_advantage,
    "rlp_reinforce_plus_plus_baseline": compat.compute_reinforce_plus_plus_baseline_outcome_advantage,
    "rlp_remax": compat.compute_remax_outcome_advantage,
}


def _core_algos():
    """verl.trainer.ppo.core_algos, or an ImportError saying what is missing."""
    try:
        return importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError as e:
        raise ImportError(
            "rlp_engine.integrations.verl.register() needs verl (pip install verl==0.9.1): importing "
            f"verl.trainer.ppo.core_algos failed: {e}"
        ) from e


def _check_free(registry: dict, name: str, fn, kind: str) -> None:
    """A name already taken by another function is an error (never silently replaced)."""
    if name in registry and registry[name] is not fn:
        raise ValueError(
            f"rlp_engine.integrations.verl.register(): verl's {kind} registry already has {name!r} "
            f"bound to {registry[name]!r}, not rlp-engine's"
        )


def register() -> list[str]:
    """Register rlp-engine's policy loss and advantage estimators in verl's registries under the
    names in POLICY_LOSSES and ADV_ESTIMATORS; returns those names. Idempotent (a second call changes
    nothing); ValueError if a name is bound to another function; ImportError if verl is absent."""
    core = _core_algos()
    for name, fn in POLICY_LOSSES.items():
        _check_free(core.POLICY_LOSS_REGISTRY, name, fn, "policy-loss")
    for name, fn in ADV_ESTIMATORS.items():
        _check_free(core.ADV_ESTIMATOR_REGISTRY, name, fn, "advantage-estimator")
    for name, fn in POLICY_LOSSES.items():
        core.register_policy_loss(name)(fn)
    for name, fn in ADV_ESTIMATORS.items():
        core.register_adv_est(name)(fn)
    return [*POLICY_LOSSES, *ADV_ESTIMATORS]
