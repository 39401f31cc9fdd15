"""One-line integrations with other RLHF projects, through their own extension points.

`rlp_engine.integrations.verl.register()` puts rlp-engine's PPO loss and advantage estimators in
verl's registries; `rlp_engine.integrations.trl.FusedGRPOTrainer` is TRL's GRPOTrainer with its
per-token log-probs from the fused LM-head op. Each module imports its project only when used.
"""
