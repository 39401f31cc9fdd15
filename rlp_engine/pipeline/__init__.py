"""The end-to-end RLP pipeline: input preparation (inputs.py), the stages (stages.py) inside a run that
times, checkpoints and resumes them (run.py), evaluation (evaluate.py) and the report (report.py).
`run_pipeline(cfg)` runs it. Loaded on first use: `rlp_engine.pipeline.inputs` must import without
torch (the CLI's fast input checks), and importing it runs this file."""


def __getattr__(name: str):
    if name == "run_pipeline":
        from rlp_engine.pipeline.run import run_pipeline

        return run_pipeline
    raise AttributeError(f"module 'rlp_engine.pipeline' has no attribute {name!r}")


__all__ = ["run_pipeline"]
