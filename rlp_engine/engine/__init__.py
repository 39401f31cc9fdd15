"""The engine: token batches, generation, metrics, distributed layouts and resharding, and the
end-to-end RLP pipeline (`rlp_engine.engine.pipeline.run_pipeline`)."""
