"""Per-sample QC (guidegen.qc): HU levels, the training reference and the label-map checks."""

from __future__ import annotations

import numpy as np
import pytest

from guidegen import qc


def test_trimmed_mean_hand_computed():
    v = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000.0])  # 11 values: int(1.1) = 1 cut at each end
    assert qc.trimmed_mean(v) == pytest.approx(5.0)
    assert qc.trimmed_mean(np.array([3.0, 4.0])) == pytest.approx(3.5)  # nothing to cut


def _bone_case(label_set, cortex_share: float, blur: bool):
    """A label map with a rib block of 100 voxels: cortex at 920 HU, marrow at 290 HU (or its mean)."""
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:1] = label_set.id_of("rib")
    ct = np.full(labels.shape, -1000.0, np.float32)
    n_cortex = int(round(cortex_share * 100))
    rib = np.r_[np.full(n_cortex, 920.0), np.full(100 - n_cortex, 290.0)]
    ct[:1] = (np.full(100, rib.mean()) if blur else rib).reshape(1, 10, 10)
    return ct, labels


def test_hu_level_of_a_bimodal_class_follows_its_mean_not_its_majority_mode(label_set):
    # the failure the trimmed mean fixes: a blurred rib keeps its mean but not its median
    sharp, labels = _bone_case(label_set, 0.6, blur=False)
    blurred, _ = _bone_case(label_set, 0.6, blur=True)
    med = lambda ct: qc.hu_levels(ct, labels, label_set, "median")["rib"]  # noqa: E731
    lvl = lambda ct: qc.hu_levels(ct, labels, label_set)["rib"]  # noqa: E731
    assert med(sharp) == 920.0 and med(blurred) == pytest.approx(668.0)
    assert abs(lvl(sharp) - lvl(blurred)) < 30  # 10 % trimmed: (40·920 + 40·290)/80 = 605 vs 668
    # a 55/45 case moves the median by 630 HU; the level moves continuously
    other, _ = _bone_case(label_set, 0.45, blur=False)
    assert med(other) == 290.0 and abs(lvl(other) - lvl(sharp)) < 120
    assert qc.hu_levels(sharp, labels, label_set)["air"] == -1000.0


def test_hu_checks_margin_statistic_and_message(label_set):
    ct, labels = _bone_case(label_set, 0.6, blur=True)  # rib level 668, air -1000
    ref = {"air": [-1001.0, -999.0], "rib": [700.0, 760.0]}
    info, failures = qc.hu_checks(ct, labels, label_set, ref)
    assert info["statistic"] == "trimmed_mean_10" and info["levels"]["rib"] == pytest.approx(668.0)
    assert failures == ["rib HU level 668 outside training range [700, 760]"]  # 32 HU below: beyond the 25 HU margin
    _, ok = qc.hu_checks(ct, labels, label_set, {"rib": [680.0, 760.0]})
    assert ok == []  # 12 HU below, inside the margin
    # an old reference (medians) is compared as medians: the sharp rib's median 920 is inside [900, 930]
    sharp, _ = _bone_case(label_set, 0.6, blur=False)
    assert qc.hu_checks(sharp, labels, label_set, {"rib": [900.0, 930.0]}, "median")[1] == []
    assert qc.hu_checks(sharp, labels, label_set, {"rib": [900.0, 930.0]})[1] != []


def test_hu_reference_ranges(label_set):
    a, labels = _bone_case(label_set, 0.6, blur=True)
    b = a.copy()
    b[labels > 0] += 50
    ref = qc.hu_reference([(a, labels), (b, labels)], label_set)
    assert ref["rib"] == [pytest.approx(668.0), pytest.approx(718.0)] and ref["air"] == [-1000.0, -1000.0]


def test_label_checks_name_the_failures(label_set):
    from guidegen.data.phantom import render_phantom

    case = render_phantom(0, (48, 48, 64))
    info, failures = qc.label_checks(case.labels, case.affine, case.findings, label_set)
    assert failures == [] and info["organs_present"] == 19
    lab = case.labels.copy()
    lab[lab == label_set.id_of("spleen")] = label_set.body_id
    lab[lab == label_set.id_of("heart")] = label_set.body_id
    _, failures = qc.label_checks(lab, case.affine, {"tumors": [{"site": "gallbladder", "side": None, "size_mm": 30}]}, label_set)
    assert failures[0] == "only 17 organ groups present (missing spleen, heart)"
    assert "requested gallbladder tumour not placed" in failures


def test_quality_check_holds_a_textured_ct_to_the_median_reference(label_set):
    """``settings.ct_texture``: organ medians against the autoencoder's ``hu_reference_median``;
    otherwise (or without that reference) the LDM's trimmed-mean reference."""
    from types import SimpleNamespace

    from guidegen.text.findings import Findings

    ct, labels = _bone_case(label_set, 0.8, blur=False)  # a thin rib: mostly cortex, trimmed mean 857, median 920
    ldm_meta = {"hu_reference": {"rib": [700.0, 760.0]}, "hu_reference_statistic": "trimmed_mean_10"}
    ae_meta = {"hu_reference_median": {"rib": [910.0, 930.0]}}
    pipe = SimpleNamespace(label_set=label_set, ct=SimpleNamespace(meta=ldm_meta, ae_meta=ae_meta))

    def hu_qc(texture: bool, pipe=pipe) -> dict:
        sample = SimpleNamespace(labels=labels, ct=ct, affine=np.eye(4), findings=Findings(),
                                 settings={"ct_texture": texture}, model_grid=None)
        return qc.quality_check(sample, pipe)["hu"]

    textured, smooth = hu_qc(True), hu_qc(False)
    assert textured["statistic"] == "median" and textured["levels"]["rib"] == 920.0
    assert smooth["statistic"] == "trimmed_mean_10" and smooth["levels"]["rib"] > 785  # beyond 760 + 25
    no_median = SimpleNamespace(label_set=label_set, ct=SimpleNamespace(meta=ldm_meta, ae_meta={}))
    assert hu_qc(True, no_median)["statistic"] == "trimmed_mean_10"  # an AE exported without it


def test_quality_check_reads_hu_on_the_model_grid_when_the_ct_was_resampled(label_set):
    """A user's map on another grid: the anatomy is checked on it, the HU calibration on the
    model-grid pair the generator produced (interpolation to the user's grid mixes neighbours)."""
    from types import SimpleNamespace

    from guidegen.text.findings import Findings

    ct, labels = _bone_case(label_set, 0.8, blur=False)
    smeared = np.full_like(ct, 300)  # the same map with its CT blurred into the neighbours: rib median 300
    ref = {"hu_reference_median": {"rib": [910.0, 930.0]}}
    pipe = SimpleNamespace(label_set=label_set, ct=SimpleNamespace(meta={}, ae_meta=ref))
    resampled = SimpleNamespace(labels=labels, ct=smeared, affine=np.eye(4), findings=Findings(),
                                settings={"ct_texture": True}, model_grid=(labels, ct))
    out = qc.quality_check(resampled, pipe)
    assert out["hu"]["grid"] == "model" and out["hu"]["levels"]["rib"] == 920.0
    assert not any("rib" in f for f in out["failures"])
    on_output = qc.quality_check(SimpleNamespace(**{**vars(resampled), "model_grid": None}), pipe)
    assert on_output["hu"]["grid"] == "output" and "rib HU level 300 outside training range [910, 930]" in on_output["failures"]
