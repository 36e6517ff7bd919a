"""The only place that reshapes time (DESIGN.md "Conventions").

Inside models, time is merged into the batch, time-major: a `[T*B, ...]` tensor whose step t is
`x.view(T, B, ...)[t]`.

Memory layout: an image batch in channels-last layout (`engine.channels_last`: [B, C, H, W] stored as
[B, H, W, C]) stays channels-last through the encoders (`repeat_time`; `sequence_to_time_major` for frames
[B, T, C, H, W] stored channels-last per frame, [B, T, H, W, C]), so the first convolution on CUDA gets the
layout its weights have; `fold_time`/`unfold_time` are views that keep whatever layout they are given where
the merged dimensions allow it.
"""

import torch


def check_time_steps(T: int) -> int:
    """Return `T` if it is an integer >= 1, else raise ValueError naming `T`."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an integer >= 1 (time steps), got {T!r}")
    return T


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """`[T, B, ...]` -> `[T*B, ...]` (time-major merge)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def unfold_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """`[T*B, ...]` -> `[T, B, ...]`; ValueError if the first dimension is not divisible by `T`."""
    check_time_steps(T)
    if x.dim() == 0 or x.shape[0] % T != 0:
        lead = x.shape[0] if x.dim() else "a scalar"
        raise ValueError(f"input first dimension must be divisible by T={T} (layout [T*B, ...]), got {lead}")
    return x.reshape(T, x.shape[0] // T, *x.shape[1:])


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether `x` ([N, C, H, W], or frames [B, T, C, H, W]) is stored with its channels innermost and more than
    one channel (with one, both layouts are the same memory)."""
    if x.dim() not in (4, 5) or x.shape[-3] == 1:
        return False
    lead = x.dim() - 3  # the batch (and time) dimensions before C, H, W
    return x.permute(*range(lead), lead + 1, lead + 2, lead).is_contiguous()


def _from_channels_last(nhwc: torch.Tensor) -> torch.Tensor:
    """`[N, H, W, C]` contiguous -> the same memory as `[N, C, H, W]` in channels-last layout."""
    return nhwc.permute(0, 3, 1, 2)


def repeat_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: `[B, ...]` -> `[T*B, ...]`, the same input at every step (DSR.md section 4); a
    channels-last image batch gives a channels-last result."""
    check_time_steps(T)
    if is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1)
        return _from_channels_last(fold_time(nhwc.unsqueeze(0).expand(T, *nhwc.shape)))
    return fold_time(x.unsqueeze(0).expand(T, *x.shape))


def sequence_to_time_major(x: torch.Tensor) -> torch.Tensor:
    """Frame sequences `[B, T, ...]` (e.g. DVS frames) -> `[T*B, ...]`, time-major; frames stored channels-last
    ([B, T, H, W, C]) give a channels-last result."""
    if is_channels_last(x):
        return _from_channels_last(fold_time(x.permute(1, 0, 3, 4, 2)))
    return fold_time(x.transpose(0, 1))
