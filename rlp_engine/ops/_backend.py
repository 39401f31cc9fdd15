"""Backend choice for every op: "torch" (the pure-torch reference), "cpp" (the compiled extension
rlp_engine._C: C++ on CPU, and its CUDA kernels on GPU for the ops that have one) or "triton" (GPU;
on CPU only under TRITON_INTERPRET=1, for tests).

By default CUDA tensors take Triton and CPU tensors take C++ (torch when the extension is not built).
`backend(name)` overrides the choice explicitly for a block of code; nothing is swapped by
environment variables at import time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings

import torch

BACKENDS = ("torch", "cpp", "triton")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlp_backend", default=None)


@contextlib.contextmanager
def backend(name: str):
    """Run the ops in this block on one backend: "torch", "cpp" or "triton"."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {BACKENDS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str | None:
    """The backend forced by an enclosing `backend(...)` block, or None."""
    return _forced.get()


@functools.cache
def cpp_available() -> bool:
    try:
        import rlp_engine._C  # noqa: F401  (registers torch.ops.rlp.*)
    except ImportError as err:
        warnings.warn(
            f"rlp_engine._C is not built ({err}); CPU ops fall back to pure torch. "
            "Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=3,
        )
        return False
    return True


def cpp_ops():
    """torch.ops.rlp, after loading the extension (raises a clear error when it is not built)."""
    if not cpp_available():
        raise RuntimeError("backend 'cpp' needs rlp_engine._C: `pip install --no-build-isolation -e .`")
    return torch.ops.rlp


def has_cuda_kernel(schema: str) -> bool:
    """Whether rlp_engine._C was built with a CUDA kernel for torch.ops.rlp.<schema>."""
    return cpp_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"rlp::{schema}", "CUDA")


def triton_usable_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    # The interpreter must be switched on before triton is first imported.
    return os.environ.get("TRITON_INTERPRET") == "1"


def select(
    op: str, *tensors: torch.Tensor, supported: tuple[str, ...] = BACKENDS, cuda_op: str | None = None
) -> str:
    """The backend `op` runs on for these tensors; raises when a forced backend cannot run here.
    `cuda_op` names the extension's schema whose CUDA kernel (when built) lets "cpp" run on GPU."""
    device = tensors[0].device
    forced = _forced.get()
    if forced is not None:
        if forced not in supported:
            raise NotImplementedError(f"{op}: no {forced!r} implementation (has {supported})")
        if forced == "cpp" and device.type != "cpu":
            if device.type == "cuda" and cuda_op is not None and has_cuda_kernel(cuda_op):
                return forced
            raise RuntimeError(f"{op}: backend 'cpp' has no kernel for {device} tensors")
        if forced == "triton" and not triton_usable_on(device):
            raise RuntimeError(
                f"{op}: backend 'triton' on {device} needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return forced
    if device.type == "cuda" and "triton" in supported:
        return "triton"
    if device.type == "cpu" and "cpp" in supported and cpp_available():
        return "cpp"
    return "torch"
