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


def test_paired_p_against_the_closed_form_t_distribution_with_two_degrees_of_freedom():
    # ablated - full = 1, 2, 3 on both metrics: t = mean / (sd / sqrt(n)) = 2 / (1 / sqrt(3)) = sqrt(12);
    # with 2 degrees of freedom P(T > t) = 1/2 - t / (2 sqrt(2 + t^2)), so p = 1 - sqrt(12) / sqrt(14)
    full = [(10.0, 20.0), (11.0, 21.0), (12.0, 22.0)]
    ablated = [(11.0, 21.0), (13.0, 23.0), (15.0, 25.0)]
    expected = 1 - (12 ** 0.5) / (14 ** 0.5)
    assert ae_ablation.paired_p(full, ablated) == pytest.approx((expected, expected), rel=1e-9)
    assert all(p != p for p in ae_ablation.paired_p(full[:1], ablated[:1]))  # one seed: NaN


def test_merge_reports_the_paired_p_over_shared_seeds():
    runs = [_run(s, {"full": (10.0 + s, 20.0), "no random-window loss": (11.0 + 2 * s, 20.0 + s)}) for s in range(3)]
    _, compared = ae_ablation.merge_runs(runs)
    p_mae, p_tumour = compared["no random-window loss"]["paired_p"]
    assert p_mae == pytest.approx(1 - (12 ** 0.5) / (14 ** 0.5))  # differences 1, 2, 3 again
    assert 0 < p_tumour < 1  # differences 0, 1, 2


def test_paired_p_is_nan_when_every_seed_differs_by_the_same_amount():
    import math

    p_mae, p_tumour = ae_ablation.paired_p([(1.0, 1.0), (2.0, 5.0)], [(3.0, 2.0), (4.0, 7.0)])  # MAE +2, +2
    assert p_mae != p_mae
    # tumour +1, +2: t = 1.5 / (sqrt(0.5) / sqrt(2)) = 3 with 1 degree of freedom (Cauchy): p = 1 - 2 atan(3) / pi
    assert p_tumour == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-9)
