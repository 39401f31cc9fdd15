"""Argument checks shared by the public ops. Every message names the op and the argument."""

from __future__ import annotations

import torch


def check_tensor(op: str, name: str, x, *, floating: bool = True, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(x.shape)}")


def check_same_shape(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}"
            )
        if x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}")


def check_mask(op: str, mask, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool, integer or floating, got {mask.dtype}")
    check_same_shape(op, like_name, like, mask=mask)


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: unknown {name} {value!r}; expected one of {tuple(choices)}")
