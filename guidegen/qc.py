"""Per-sample quality control for ``guidegen generate`` (recorded in ``meta/<id>.json``).

Label-map checks reuse the evaluation metrics (organs present, anatomical order, tumour where
the prompt asked); HU calibration compares the generated CT's air, fat and per-organ HU levels
with the ranges seen in training, which the latent-generator checkpoint carries in its meta
(``hu_reference``, written by :func:`hu_reference`, and ``hu_reference_statistic``).

The HU level of a class is its 10 % trimmed mean (:func:`trimmed_mean`), not its median. Bone
classes are bimodal at CT voxel sizes - in the phantom a rib is ~70 % cortex at ~920 HU and
~30 % marrow near 290 HU - so their median sits on whichever mode has the majority: the real
vertebra medians jump between 306 and 630 HU from case to case while their means stay at
~500, and an autoencoder that blurs the two modes moves the median by ~160 HU while keeping
the mean within 35 HU (rib means 14-33 HU off, seeds 0-2, the shipped demo autoencoder). A calibration check must
follow the mean; trimming 10 % at each end keeps it robust to partial-volume outliers at the
class border. References written before this (no statistic recorded) hold medians and are
compared as medians.

A CT rendered with the autoencoder's voxel texture (``settings.ct_texture``; models/texture.py)
does not blur the modes: each voxel of a rib is drawn as cortex or marrow, so its median sits on
the majority mode as in real CT (20 reconstructions: organ medians inside the real range 96 %,
78 % without the texture). Its organ levels are checked as medians, against the medians'
ranges the autoencoder's export recorded (``hu_reference_median``); the mean of a bimodal class
then follows the label map's anatomy (a thin sampled rib is mostly cortex), not the calibration.
"""

from __future__ import annotations

import numpy as np

from guidegen.labels import LabelSet

MIN_ORGANS = 18
# Fallback when a checkpoint carries no training reference: broad physical ranges (HU).
DEFAULT_HU_REFERENCE = {"air": [-1100.0, -900.0], "fat": [-150.0, -50.0], "lung": [-950.0, -600.0], "liver": [20.0, 200.0]}
HU_MARGIN = 25.0  # tolerance around the training range (HU)
HU_STATISTIC = "trimmed_mean_10"
# a user's map may reach beyond the torso the model renders (legs, head); up to this share of its
# labelled voxels (the box margin's partial slices) pass, more is reported
OUTSIDE_BOX_SHARE = 0.01


def trimmed_mean(values: np.ndarray, cut: float = 0.1) -> float:
    """Mean of the values left after cutting ``int(cut · n)`` from each end (scipy's trim_mean)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, dtype=np.float64).ravel(), cut))


_STATISTICS = {"trimmed_mean_10": trimmed_mean, "median": lambda v: float(np.median(v))}


def fat_voxels(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """HU of body-envelope voxels in the fat range (−200…0): subcutaneous and visceral fat."""
    body = ct[labels == label_set.body_id] if label_set.body_id is not None else ct[labels > 0]
    return body[(body > -200) & (body < 0)]


def hu_levels(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet, statistic: str = HU_STATISTIC) -> dict[str, float]:
    """HU level (``statistic``: see the module docstring) of air (label 0), fat, every organ class
    present and the tumour; classes with fewer than 8 voxels are left out."""
    level = _STATISTICS[statistic]
    out: dict[str, float] = {}
    air = ct[labels == 0]
    if air.size:
        out["air"] = level(air)
    fat = fat_voxels(ct, labels, label_set)
    if fat.size:
        out["fat"] = level(fat)
    for cid in label_set.organ_ids + ([label_set.tumor_id] if label_set.tumor_id is not None else []):
        vox = ct[labels == cid]
        if vox.size >= 8:
            out[label_set.name_of(cid)] = level(vox)
    return out


def hu_reference(cases, label_set: LabelSet, statistic: str = HU_STATISTIC) -> dict[str, list[float]]:
    """``{name: [min, max]}`` of per-case HU levels over training ``cases`` ((ct, labels) pairs)."""
    per: dict[str, list[float]] = {}
    for ct, labels in cases:
        for name, value in hu_levels(np.asarray(ct), np.asarray(labels), label_set, statistic).items():
            per.setdefault(name, []).append(value)
    return {k: [round(min(v), 1), round(max(v), 1)] for k, v in per.items()}


def label_checks(labels: np.ndarray, affine: np.ndarray, findings: dict, label_set: LabelSet) -> tuple[dict, list[str]]:
    from guidegen.evaluation.metrics import case_stats, match_tumors

    stats = case_stats(labels, affine, label_set)
    present = [label_set.name_of(i) for i in label_set.organ_ids if stats.volumes_ml[i] > 0]
    missing = [label_set.name_of(i) for i in label_set.organ_ids if stats.volumes_ml[i] == 0]
    tumors = match_tumors(findings.get("tumors") or [], stats, label_set)
    failures = []
    if len(present) < MIN_ORGANS:
        failures.append(f"only {len(present)} organ groups present (missing {', '.join(missing)})")
    failures += [f"anatomical order: {k} fails" for k, ok in stats.order.items() if ok is False]
    failures += [f"requested {t['site']} tumour not placed" for t in tumors if not t["placed"]]
    return {"organs_present": len(present), "missing": missing, "order": stats.order, "tumors": tumors}, failures


def hu_checks(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet, reference: dict | None,
              statistic: str = HU_STATISTIC) -> tuple[dict, list[str]]:
    """Air, fat and organ HU levels against ``reference`` (ranges of the same ``statistic``) ± HU_MARGIN."""
    if reference is None:
        reference, statistic = DEFAULT_HU_REFERENCE, HU_STATISTIC
    levels = hu_levels(ct, labels, label_set, statistic)
    failures = []
    for name in ("air", "fat", *[label_set.name_of(i) for i in label_set.organ_ids]):
        if name in levels and name in reference:
            lo, hi = reference[name]
            if not (lo - HU_MARGIN <= levels[name] <= hi + HU_MARGIN):
                failures.append(f"{name} HU level {levels[name]:.0f} outside training range [{lo:.0f}, {hi:.0f}]")
    return {"statistic": statistic, "levels": {k: round(v, 1) for k, v in levels.items()}}, failures


def quality_check(sample, pipe) -> dict:
    """QC of one :class:`guidegen.pipeline.Sample`: ``{"passed", "failures", "labels", "hu"}``.

    The anatomy is checked on the sample's own label map; the HU calibration on the model grid
    (``sample.model_grid`` when the CT was generated on a resampled copy of a user's map, and
    ``hu["grid"]`` says which): interpolating the CT to a finer grid mixes thin structures with
    their neighbours, which says nothing about the generator's calibration.
    """
    label_set = pipe.label_set
    labels_info, failures = label_checks(sample.labels, sample.affine, sample.findings.to_dict(), label_set)
    out = {"labels": labels_info}
    if sample.ct is not None:
        meta = pipe.ct.meta if pipe.ct is not None else {}
        # a reference without a recorded statistic predates the trimmed mean: it holds medians
        reference, statistic = meta.get("hu_reference"), meta.get("hu_reference_statistic", "median")
        median_reference = pipe.ct.ae_meta.get("hu_reference_median") if pipe.ct is not None else None
        if sample.settings.get("ct_texture") and median_reference:
            reference, statistic = median_reference, "median"
        outside = sample.settings.get("labelled_outside_box", {}).get("share", 0.0)
        if outside > OUTSIDE_BOX_SHARE:
            failures.append(f"{outside:.0%} of the labelled voxels lie beyond the organs' z-range the model renders "
                            "(filled with their class's median HU, not generated)")
        labels, ct = sample.model_grid if sample.model_grid is not None else (sample.labels, sample.ct)
        hu_info, hu_fail = hu_checks(ct, labels, label_set, reference, statistic)
        out["hu"] = {**hu_info, "grid": "model" if sample.model_grid is not None else "output"}
        failures += hu_fail
    out.update({"passed": not failures, "failures": failures})
    return out
