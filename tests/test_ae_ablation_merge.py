"""benchmarks/ae_ablation.py --merge: per-seed rows and full-vs-ablation means over shared seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ae_ablation  # noqa: E402


def _run(seed, rows, steps=1000, n=20):
    return {"steps": steps, "seed": seed, "n": n,
            "rows": {k: {"soft_tissue_mae": m, "tumour_error": t} for k, (m, t) in rows.items()}}


def test_means_are_over_the_seeds_both_variants_ran():
    runs = [
        _run(0, {"full": (18.0, 20.0), "no random-window loss": (20.0, 16.0)}),  # full loses the tumour error here
        _run(1, {"full": (19.0, 10.0), "no random-window loss": (21.0, 20.0)}),
        _run(0, {"no label injection": (32.0, 100.0)}),  # another process, same seed
        _run(2, {"full": (50.0, 50.0)}),  # its ablation still running: left out of every mean
    ]
    by_seed, compared = ae_ablation.merge_runs(runs)
    assert list(by_seed[0]) == ["full", "no label injection", "no random-window loss"]  # VARIANTS order
    nrw = compared["no random-window loss"]
    assert nrw["seeds"] == [0, 1] and nrw["seed_wins"] == 1
    assert nrw["full"] == pytest.approx((18.5, 15.0)) and nrw["ablated"] == pytest.approx((20.5, 18.0))
    nli = compared["no label injection"]
    assert nli["seeds"] == [0] and nli["seed_wins"] == 1 and nli["full"] == pytest.approx((18.0, 20.0))


def test_full_wins_needs_both_metrics():
    assert ae_ablation.full_wins({"full": (1.0, 1.0), "a": (2.0, 2.0), "b": (3.0, 1.5)})
    assert not ae_ablation.full_wins({"full": (1.0, 3.0), "a": (2.0, 2.0)})


def test_merge_refuses_runs_of_different_length():
    with pytest.raises(ValueError, match="different steps"):
        ae_ablation.merge_runs([_run(0, {"full": (1, 1)}), _run(1, {"full": (1, 1)}, steps=500)])


def test_read_run_names_the_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 1000, "n": 20, "seed": 0, "rows": {"full": {"soft_tissue_mae": 1.0}}}')
    with pytest.raises(ValueError, match="bad.json: not an ae_ablation.py --json file"):
        ae_ablation.read_run(str(bad))
    with pytest.raises(ValueError, match="missing.json: cannot read"):
        ae_ablation.read_run(str(tmp_path / "missing.json"))
    good = tmp_path / "good.json"
    good.write_text('{"steps": 1000, "n": 20, "seed": 0, "rows": {"full": {"soft_tissue_mae": 1.0, "tumour_error": 2.0}}}')
    assert ae_ablation.read_run(str(good))["rows"]["full"]["tumour_error"] == 2.0
