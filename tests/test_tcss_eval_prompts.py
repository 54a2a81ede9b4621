"""benchmarks/tcss_eval.py prompt lists: seeded, one per seed, and every prompt parses to its request."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tcss_eval  # noqa: E402

from guidegen.pipeline import prompt_findings  # noqa: E402


def test_prompt_lists_are_seeded_and_the_default_is_the_reported_set():
    reported = tcss_eval.make_prompts(12)
    assert reported == tcss_eval.make_prompts(12, tcss_eval.PROMPT_SEED)
    validation = tcss_eval.make_prompts(12, 1)
    assert validation == tcss_eval.make_prompts(12, 1)
    assert {t for t, _ in validation}.isdisjoint(t for t, _ in reported)  # a tuning set shares no prompt


def test_every_prompt_parses_to_its_requested_site_side_and_size():
    for seed in (tcss_eval.PROMPT_SEED, 1):
        for text, want in tcss_eval.make_prompts(18, seed):
            (tumor,) = prompt_findings(text).tumors
            assert (tumor.site, tumor.side) == (want["site"], want["side"]), text
            assert abs(tumor.size_mm - want["size_mm"]) < 1e-6, text
