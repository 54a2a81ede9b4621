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

from functools import lru_cache

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
