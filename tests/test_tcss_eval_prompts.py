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


def test_exact_mcnemar_against_hand_computed_binomial_tails():
    # 6 prompts only B places, none only A: p = 2 * 0.5**6
    gained, lost, p = tcss_eval.mcnemar_exact([False] * 6 + [True] * 4, [True] * 10)
    assert (gained, lost) == (6, 0) and abs(p - 0.03125) < 1e-12
    # 3 against 1: P(X >= 3 | n = 4) = 5/16, two-sided 10/16
    gained, lost, p = tcss_eval.mcnemar_exact([False, False, False, True, True], [True, True, True, False, True])
    assert (gained, lost) == (3, 1) and abs(p - 0.625) < 1e-12
    assert tcss_eval.mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)  # no discordant pair


def test_paired_rows_pair_by_prompt_and_refuse_different_prompt_lists(tmp_path):
    import json

    import pytest

    def arm(name, prompts, placed, prompt_seed=tcss_eval.PROMPT_SEED):
        rows = [{"prompt": p, "largest_placed": x, "cleaned": {"largest_placed": x}} for p, x in zip(prompts, placed)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"settings": {"prompt_seed": prompt_seed, "guidance": 1.0}, "rows": rows}))
        return str(path)

    a0, a1 = arm("a0", ["p0", "p2"], [False, True]), arm("a1", ["p1"], [False])  # two shards
    b = arm("b", ["p2", "p1", "p0"], [True, True, True])  # one shard, another order
    _, _, pairs = tcss_eval.paired_rows([a0, a1], [b])
    assert [(ra["prompt"], rb["prompt"]) for ra, rb in pairs] == [("p0", "p0"), ("p2", "p2"), ("p1", "p1")]
    with pytest.raises(ValueError, match="same prompts"):
        tcss_eval.paired_rows([a0], [b])
    with pytest.raises(ValueError, match="same prompts"):
        tcss_eval.paired_rows([a0, a1], [arm("c", ["p2", "p1", "p0"], [True] * 3, prompt_seed=1)])


def test_paired_rows_name_a_file_that_is_not_a_tcss_eval_result(tmp_path):
    import pytest

    bad = tmp_path / "notes.json"
    bad.write_text('{"rows": []}')  # JSON, but no settings
    with pytest.raises(ValueError, match="notes.json: not a tcss_eval.py --json file"):
        tcss_eval.paired_rows([str(bad)], [str(bad)])
    with pytest.raises(ValueError, match="missing.json: not a tcss_eval.py --json file"):
        tcss_eval.paired_rows([str(tmp_path / "missing.json")], [str(bad)])
