"""Triton kernels, one file per fused op, each with its pure-torch `_ref` beside it.
Installed as `rlp_engine.kernels` (never as a top-level `kernels`)."""
