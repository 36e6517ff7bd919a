"""Numeric precision of a run (`engine.precision`): what the forward runs in and what the inputs are cast to.

Two ways to train in reduced precision, one per kind of engine:
  autocast       (single, ddp)  the model stays fp32; `torch.autocast(device, dtype)` runs matmuls and convs
                                in bf16/fp16; inputs stay fp32; fp16 losses are scaled (`GradScaler`).
  engine casts   (deepspeed)    DeepSpeed holds the module in bf16/fp16 (fp32 master weights in its
                                optimizer) and scales fp16 losses itself; no autocast; inputs are cast to
                                the module's dtype.
DSR neurons integrate the membrane potential in at least fp32 either way (harness/snn/dsr.py).
"""

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """`name` (fp32 | bf16 | fp16) on a device of type `device_type`; `engine_casts_model` for DeepSpeed."""

    name: str
    device_type: str
    engine_casts_model: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The reduced dtype, or None for fp32."""
        return DTYPES[self.name]

    @property
    def input_dtype(self) -> torch.dtype:
        """What a batch is cast to before the forward."""
        return (self.dtype if self.engine_casts_model else None) or torch.float32

    @property
    def scales_loss(self) -> bool:
        """Whether the harness (not the engine) must scale the loss: fp16 under autocast."""
        return self.name == "fp16" and not self.engine_casts_model

    def autocast(self) -> AbstractContextManager:
        dtype = None if self.engine_casts_model else self.dtype
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)
