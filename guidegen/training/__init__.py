"""Training: the shared engine (:mod:`guidegen.training.trainer`) and the per-stage tasks."""

from guidegen.training.ema import EMA
from guidegen.training.trainer import (
    FitResult,
    ResumableBatchSampler,
    StageTask,
    StepContext,
    Trainer,
    export_checkpoint,
    find_checkpoint,
    load_model_weights,
)

__all__ = [
    "EMA",
    "FitResult",
    "ResumableBatchSampler",
    "StageTask",
    "StepContext",
    "Trainer",
    "export_checkpoint",
    "find_checkpoint",
    "load_model_weights",
]
