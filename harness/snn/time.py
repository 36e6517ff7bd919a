"""The only place that reshapes time (DESIGN.md "Conventions").

Inside models, time is merged into the batch, time-major: a `[T*B, ...]` tensor whose step t is
`x.view(T, B, ...)[t]`.
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


def repeat_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: `[B, ...]` -> `[T*B, ...]`, the same input at every step (DSR.md section 4)."""
    check_time_steps(T)
    return fold_time(x.unsqueeze(0).expand(T, *x.shape))


def sequence_to_time_major(x: torch.Tensor) -> torch.Tensor:
    """Frame sequences `[B, T, ...]` (e.g. DVS frames) -> `[T*B, ...]`, time-major."""
    return fold_time(x.transpose(0, 1))
