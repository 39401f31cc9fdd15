"""The engine: generation, metrics, checkpoints, guards, distributed layouts and resharding."""
