"""rlp-engine: fused RLHF loss kernels and Reward Learning on Policy."""

__version__ = "0.1.0"
