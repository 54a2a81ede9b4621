"""Pieces the training stages share: the text condition of a batch, per-class loss weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from guidegen.labels import LabelSet
from guidegen.text.findings import Findings, parse_findings
from guidegen.text.knowledge import TextConditioner


def findings_of(text: str, findings_json: str | None) -> Findings:
    """The stored findings of a case when the dataset has them, else those parsed from its text.

    Stored findings (phantom ground truth, or parsed once by ``prepare``) are preferred: they
    are what the case shows, even when the report omits a field.
    """
    stored = json.loads(findings_json) if findings_json else None
    return Findings.from_dict(stored) if stored else parse_findings(text)


def batch_condition(conditioner: TextConditioner, batch: dict, device: torch.device) -> dict[str, Tensor]:
    """``{"tokens" (B, L, D), "mask" (B, L), "findings_vec" (B, F)}`` on ``device`` for a batch."""
    texts = list(batch["text"])
    jsons = list(batch.get("findings_json", [None] * len(texts)))
    cond = conditioner.prepare(texts, [findings_of(t, j) for t, j in zip(texts, jsons)])
    return {k: v.to(device) for k, v in cond.items()}


def text_cache_dir(data_root: str | Path) -> Path:
    """Embedding cache location inside a dataset (frozen encoders only)."""
    return Path(data_root) / "cache" / "text"


def class_weight_vector(weights: dict[str, float], label_set: LabelSet) -> Tensor | None:
    """(K,) loss weights: ``weights`` (class name → weight) over ones, or None when empty."""
    if not weights:
        return None
    w = torch.ones(label_set.num_classes)
    for name, value in weights.items():
        w[label_set.id_of(name)] = value
    return w
