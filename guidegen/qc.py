"""Per-sample quality control for ``guidegen generate`` (recorded in ``meta/<id>.json``).

Label-map checks reuse the evaluation metrics (organs present, anatomical order, tumour where
the prompt asked); HU calibration compares the generated CT's air, fat and per-organ medians
with the ranges seen in training, which the latent-generator checkpoint carries in its meta
(``hu_reference``, written by :func:`hu_reference`).
"""

from __future__ import annotations

import numpy as np

from guidegen.labels import LabelSet

MIN_ORGANS = 18
# Fallback when a checkpoint carries no training reference: broad physical ranges (HU).
DEFAULT_HU_REFERENCE = {"air": [-1100.0, -900.0], "fat": [-150.0, -50.0], "lung": [-950.0, -600.0], "liver": [20.0, 200.0]}
HU_MARGIN = 25.0  # tolerance around the training range (HU)


def fat_voxels(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """HU of body-envelope voxels in the fat range (−200…0): subcutaneous and visceral fat."""
    body = ct[labels == label_set.body_id] if label_set.body_id is not None else ct[labels > 0]
    return body[(body > -200) & (body < 0)]


def hu_medians(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet) -> dict[str, float]:
    """Median HU of air (label 0), fat, and every organ class present."""
    out: dict[str, float] = {}
    air = ct[labels == 0]
    if air.size:
        out["air"] = float(np.median(air))
    fat = fat_voxels(ct, labels, label_set)
    if fat.size:
        out["fat"] = float(np.median(fat))
    for cid in label_set.organ_ids + ([label_set.tumor_id] if label_set.tumor_id is not None else []):
        vox = ct[labels == cid]
        if vox.size >= 8:
            out[label_set.name_of(cid)] = float(np.median(vox))
    return out


def hu_reference(cases, label_set: LabelSet) -> dict[str, list[float]]:
    """``{name: [min, max]}`` of per-case HU medians over training ``cases`` ((ct, labels) pairs)."""
    per: dict[str, list[float]] = {}
    for ct, labels in cases:
        for name, med in hu_medians(np.asarray(ct), np.asarray(labels), label_set).items():
            per.setdefault(name, []).append(med)
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


def hu_checks(ct: np.ndarray, labels: np.ndarray, label_set: LabelSet, reference: dict | None) -> tuple[dict, list[str]]:
    ref = reference or DEFAULT_HU_REFERENCE
    meds = hu_medians(ct, labels, label_set)
    failures = []
    for name in ("air", "fat", *[label_set.name_of(i) for i in label_set.organ_ids]):
        if name in meds and name in ref:
            lo, hi = ref[name]
            if not (lo - HU_MARGIN <= meds[name] <= hi + HU_MARGIN):
                failures.append(f"{name} median {meds[name]:.0f} HU outside training range [{lo:.0f}, {hi:.0f}]")
    return {"medians": {k: round(v, 1) for k, v in meds.items()}}, failures


def quality_check(sample, pipe) -> dict:
    """QC of one :class:`guidegen.pipeline.Sample`: ``{"passed", "failures", "labels", "hu"}``."""
    label_set = pipe.label_set
    labels_info, failures = label_checks(sample.labels, sample.affine, sample.findings.to_dict(), label_set)
    out = {"labels": labels_info}
    if sample.ct is not None:
        reference = pipe.ct.meta.get("hu_reference") if pipe.ct is not None else None
        hu_info, hu_fail = hu_checks(sample.ct, sample.labels, label_set, reference)
        out["hu"] = hu_info
        failures += hu_fail
    out.update({"passed": not failures, "failures": failures})
    return out
