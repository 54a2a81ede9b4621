"""Shipped demo checkpoints (package data under ``guidegen/weights/``).

A checkpoint is a directory with ``model.safetensors``, ``config.yaml`` and ``meta.json``
(DESIGN §7). The shipped ones live in ``guidegen/weights/<preset>/<stage>/``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

STAGES = ("tcss", "autoencoder", "ldm")


def shipped_root() -> Path:
    return Path(str(resources.files("guidegen") / "weights"))


def list_shipped() -> list[str]:
    """Names ``<preset>/<stage>`` of shipped checkpoint directories that hold weights."""
    root = shipped_root()
    if not root.is_dir():
        return []
    return sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if (p / "model.safetensors").is_file())


def total_train_steps(meta: dict) -> int | None:
    """All training steps behind an exported checkpoint: its own plus those of the runs it was
    continued from (``--init-from``; ``meta.json`` ``total_train_steps``), else its ``train_steps``."""
    return meta.get("total_train_steps", meta.get("train_steps"))
