"""Evaluation of generated sets against real ones, HTML report, and nnU-Net export (DESIGN §8).

Modules: ``sets`` (dataset → arrays on the evaluation grid), ``metrics`` (pure metric math),
``features`` (the real-trained 3D feature encoder), ``attributes`` (text-fidelity classifier),
``runner`` (``evaluate()``, the driver behind ``guidegen evaluate``), ``report`` (self-contained HTML),
``export`` (nnU-Net v2 raw datasets), ``degrade`` (known-bad copies for checking the metrics).
The segmentation network lives in :mod:`guidegen.models.segmenter`.
"""

from __future__ import annotations

import importlib

# public name → module; imported on first use so that e.g. the export command does not load torch
_EXPORTS = {
    "EvalConfig": "guidegen.evaluation.runner",
    "EvalResult": "guidegen.evaluation.runner",
    "evaluate": "guidegen.evaluation.runner",
    "export_nnunet": "guidegen.evaluation.export",
    "check_nnunet_dataset": "guidegen.evaluation.export",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guidegen.evaluation' has no attribute {name!r}")
