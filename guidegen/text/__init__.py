"""Text conditioning (DESIGN §5): findings parser, knowledge augmentation, encoders, injection.

- :mod:`~guidegen.text.findings`: :class:`Findings` record and :func:`parse_findings`.
- :mod:`~guidegen.text.prompts`: :func:`canonical_prompt`, :func:`findings_vector`, :data:`FINDINGS_DIM`.
- :mod:`~guidegen.text.encoders`: :class:`TextEncoder` (MiniLM, local HF dir, trainable),
  :func:`build_text_encoder`, :class:`EmbeddingCache`.
- :mod:`~guidegen.text.knowledge`: :class:`KnowledgeInjection`, :class:`TextConditioner`,
  :func:`sample_drop_mask`.

Names are imported lazily so that ``guidegen parse`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Findings": "findings", "Tumor": "findings", "parse_findings": "findings", "ORGAN_SITES": "findings",
    "PAIRED_SITES": "findings",
    "canonical_prompt": "prompts", "findings_vector": "prompts", "FINDINGS_DIM": "prompts",
    "FINDINGS_LAYOUT": "prompts",
    "TextEncoder": "encoders", "MiniLMEncoder": "encoders", "HFEncoder": "encoders",
    "TrainableTokenEncoder": "encoders", "build_text_encoder": "encoders", "EmbeddingCache": "encoders",
    "KnowledgeInjection": "knowledge", "TextConditioner": "knowledge", "sample_drop_mask": "knowledge",
    "text_for_encoding": "knowledge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"guidegen.text.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'guidegen.text' has no attribute {name!r}")
