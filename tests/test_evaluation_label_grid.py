"""Label-map statistics of ``guidegen evaluate`` compare real and synthetic maps on one grid."""

from __future__ import annotations

import numpy as np
import pytest

from guidegen.data.layout import DatasetReader
from guidegen.data.phantom_dataset import write_phantom_dataset
from guidegen.evaluation.metrics import case_stats
from guidegen.evaluation.runner import dataset_label_stats, label_map_metrics, to_label_grid
from guidegen.labels import load_label_set

LS = load_label_set()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("labgrid")
    write_phantom_dataset(root / "real", n=2, grid=(40, 40, 48), seed=0, previews=False, progress=False)
    write_phantom_dataset(root / "syn", n=2, grid=(24, 24, 32), seed=50, previews=False, progress=False)
    return root


def test_real_maps_are_brought_to_the_synthetic_grid(sets):
    root = sets
    m, plots = label_map_metrics(root / "real", root / "syn", LS)
    assert m["label_map_grid"]["grid"] == [24, 24, 32] and m["label_map_grid"]["real_cases_resampled"] == 2
    reader = DatasetReader(root / "real")
    by_hand = []
    for case in reader.case_ids():
        rec = reader.load_case(case, with_ct=False)
        lab, aff = to_label_grid(rec.labels, rec.affine, (24, 24, 32), LS)
        assert lab.shape == (24, 24, 32) and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= set(np.unique(rec.labels))  # nearest neighbour: no new label ids
        by_hand.append(case_stats(lab, aff, LS))
    comps = np.stack([s.components for s in by_hand]).mean(0)
    for c in LS.organ_ids:
        assert m["components_mean_real"][LS.names[c]] == pytest.approx(round(float(comps[c]), 3))
    assert np.allclose(plots["volumes"]["real"], np.stack([s.volumes_ml for s in by_hand]))
    # volumes stay in ml: the resized crop's spacing keeps the organ volumes close to native
    native = [s for _, s, _ in dataset_label_stats(root / "real", "--real", LS)]
    liver = LS.id_of("liver")
    for a, b in zip(native, by_hand):
        assert b.volumes_ml[liver] == pytest.approx(a.volumes_ml[liver], rel=0.15)


def test_same_shape_sets_are_not_resampled(sets):
    root = sets
    m, _ = label_map_metrics(root / "syn", root / "syn", LS)
    assert m["label_map_grid"]["real_cases_resampled"] == 0
    assert m["components_mean_real"] == m["components_mean_synthetic"]
    assert m["organ_volume_w1"] == pytest.approx(0.0, abs=1e-9)
