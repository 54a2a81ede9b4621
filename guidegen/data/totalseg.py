"""TotalSegmentator class tables: label id → class name of the ``total`` task, v1 and v2.

Source: TotalSegmentator's ``totalsegmentator/map_to_binary.py`` (github.com/wasserth/
TotalSegmentator), ``class_map["total"]`` (v2, 117 classes) and ``class_map["total_v1"]``
(v1, 104 classes). The tables are written out below in id order; repeated structures
(vertebrae, ribs) are expanded by small helpers so the order is easy to check against the
source. :func:`totalseg_classes` asserts the class counts.

TotalSegmentator writes either one multi-label NIfTI with these ids (``--ml``) or one binary
mask per class named ``<class>.nii.gz``; the ``body`` task adds ``body.nii.gz`` (and
``body_trunc`` / ``body_extremities``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from guidegen.errors import GuideGenError

# Vertebrae from caudal to cranial, as both versions list them.
_LUMBAR_TO_CERVICAL = [f"L{i}" for i in range(5, 0, -1)] + [f"T{i}" for i in range(12, 0, -1)] + [f"C{i}" for i in range(7, 0, -1)]


def _ribs() -> list[str]:
    return [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]


_TOTAL_V1: list[str] = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
    "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right",                                   # 1..17
    *[f"vertebrae_{v}" for v in _LUMBAR_TO_CERVICAL],                                     # 18..41
    "esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
    "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
    "small_bowel", "duodenum", "colon",                                                  # 42..57
    *_ribs(),                                                                             # 58..81
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
    "urinary_bladder",                                                                    # 82..104
]

_TOTAL_V2: list[str] = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
    "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder",
    "prostate", "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1",          # 1..26
    *[f"vertebrae_{v}" for v in _LUMBAR_TO_CERVICAL],                                     # 27..50
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
    "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
    "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
    "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",    # 51..68
    "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
    "skull",                                                                              # 69..91
    *_ribs(),                                                                             # 92..115
    "sternum", "costal_cartilages",                                                       # 116..117
]

# Outputs of TotalSegmentator's ``body`` task (and its fused ``body.nii.gz``).
BODY_CLASS_NAMES = ("body", "body_trunc", "body_extremities")

_EXPECTED = {1: 104, 2: 117}


@lru_cache(maxsize=None)
def totalseg_classes(version: int = 2) -> dict[int, str]:
    """``{id: class name}`` of the ``total`` task of TotalSegmentator ``version`` (1 or 2)."""
    if version not in _EXPECTED:
        raise GuideGenError(f"--totalseg-version: expected 1 or 2, got {version}")
    names = _TOTAL_V1 if version == 1 else _TOTAL_V2
    assert len(names) == _EXPECTED[version] and len(set(names)) == len(names), "TotalSegmentator table is corrupt"
    return {i + 1: name for i, name in enumerate(names)}


def totalseg_ids(version: int = 2) -> dict[str, int]:
    """``{class name: id}`` (the inverse of :func:`totalseg_classes`)."""
    return {name: i for i, name in totalseg_classes(version).items()}


def known_class_names() -> frozenset[str]:
    """Every class-file name accepted in a per-class folder (either version, plus body)."""
    return frozenset(totalseg_classes(1).values()) | frozenset(totalseg_classes(2).values()) | frozenset(BODY_CLASS_NAMES)


# ------------------------------------------------------------ which version wrote an id map
# A multi-label map does not say which table its ids follow, and read with the wrong one it
# still "works" (v1 aorta 7 → v2 pancreas, v1 lung lobes → v2 esophagus/trachea/thyroid ...).
# The lungs tell them apart: v2 ids 10-14 are the five lobes, v1 ids 13-17 (10-12 pancreas and
# adrenals; v2 15-17 esophagus, trachea, thyroid). Read correctly, a torso CT's right/left lung
# volume ratio is about 1; read with the other table, the "lungs" are a mix of small structures
# and lobes of one side, and the ratio is about 20 (v1 read as v2) or 0.05 (v2 read as v1).
LUNG_RATIO_PLAUSIBLE = 2.5  # right/left within [1/2.5, 2.5]: a real pair of lungs (partly in view)
LUNG_RATIO_IMPLAUSIBLE = 6.0  # outside [1/6, 6]: not a pair of lungs
MIN_LUNG_VOXELS = 500  # fewer lung voxels under a reading: too little in view to judge it


@lru_cache(maxsize=None)
def _lung_ids(version: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(left lobe ids, right lobe ids)`` of ``version``, found by name in its table."""
    table = totalseg_classes(version)
    lobes = {i: name for i, name in table.items() if name.startswith("lung_")}
    return tuple(i for i, n in lobes.items() if n.endswith("_left")), tuple(i for i, n in lobes.items() if n.endswith("_right"))


def lung_ratio(counts: np.ndarray, version: int, *, min_voxels: int = MIN_LUNG_VOXELS) -> float | None:
    """Right/left lung volume of an id map read as TotalSegmentator ``version``.

    ``counts[i]`` is the number of voxels with id ``i`` (``np.bincount`` of the map). None when
    the lobe ids of that reading hold fewer than ``min_voxels`` voxels together; ``inf`` when
    only right-lung ids are present.
    """
    left_ids, right_ids = _lung_ids(version)
    left, right = (float(sum(counts[i] for i in ids if i < len(counts))) for ids in (left_ids, right_ids))
    if left + right < min_voxels:
        return None
    return right / left if left else math.inf


def guess_totalseg_version(counts: np.ndarray) -> int | None:
    """The TotalSegmentator version (1 or 2) whose ``total`` ids an id map follows, or None.

    ``counts[i]`` = voxels with id ``i``. Any id above v1's last (104) means v2. Otherwise the
    lungs decide: the version is returned only when its reading gives a plausible right/left
    lung ratio (:data:`LUNG_RATIO_PLAUSIBLE`) *and* the other reading an implausible one
    (:data:`LUNG_RATIO_IMPLAUSIBLE`). None (undecidable) when either reading has too few lung
    voxels in view (:data:`MIN_LUNG_VOXELS`, a noise floor in voxels, not ml), or when the two
    readings are not one plausible and one implausible: an abdominal CT with only the lung
    bases can look plausible both ways, a missing lung implausible both ways. Demanding both
    sides of the contrast keeps a wrong answer rare; callers decide what None means.
    """
    counts = np.asarray(counts)
    if counts[max(totalseg_classes(1)) + 1 :].any():
        return 2
    r1, r2 = lung_ratio(counts, 1), lung_ratio(counts, 2)
    if r1 is None or r2 is None:
        return None
    for version, mine, other in ((1, r1, r2), (2, r2, r1)):
        if _within(mine, LUNG_RATIO_PLAUSIBLE) and not _within(other, LUNG_RATIO_IMPLAUSIBLE):
            return version
    return None


def _within(ratio: float, factor: float) -> bool:
    return 1 / factor <= ratio <= factor
