"""Exponential moving average (EMA) of a module's weights.

The EMA copy is what samples and exported inference checkpoints use. It is kept in float32 on
the model's device and updated after every optimizer step. Every rank keeps its own copy and
updates it identically (DDP keeps the live weights identical on all ranks), so no
communication is needed and any rank could export it; only rank 0 saves it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA of ``module``'s floating-point parameters and buffers.

    ``decay_t = min(decay, (1 + n) / (10 + n))`` after ``n`` updates: the usual warm-up, so
    that short (CPU demo) runs are not dominated by the random initialisation. Integer
    buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied, not averaged.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the EMA weights towards ``module``'s (an unwrapped, non-DDP module)."""
        weight = 1.0 - self.current_decay()
        ema_state = self.module.state_dict(keep_vars=True)
        floats_ema, floats_src = [], []
        for name, src in module.state_dict(keep_vars=True).items():
            dst = ema_state[name]
            if dst.dtype.is_floating_point:
                floats_ema.append(dst.data)
                floats_src.append(src.data.to(dst.dtype))
            else:
                dst.data.copy_(src.data)
        if floats_ema:
            torch._foreach_lerp_(floats_ema, floats_src, weight)  # ema += w * (src - ema)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
