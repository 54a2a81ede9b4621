"""Shared bits of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompts_for(n: int) -> list[str]:
    """``n`` evaluation prompts unlike the phantom's report templates (see tcss_eval.py)."""
    from tcss_eval import make_prompts

    return [text for text, _ in make_prompts(n)]
