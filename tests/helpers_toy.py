"""A toy label map for the tumour-finding tests: a left kidney and a liver in a body box."""

from __future__ import annotations

import numpy as np

from guidegen.io import ras_affine


def kidney_liver_map(label_set, tumour_spheres: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(labels (40, 30, 30) uint8, affine (2 mm voxels, RAS), tumour masks)``.

    The kidney fills x 5-14 (low x: the patient's left), the liver x 25-34, both y, z 10-19.
    ``tumour_spheres``: ``(centre x, squared radius)`` of each tumour ball, centred at y = z = 15
    and painted over the organs in that order.
    """
    labels = np.zeros((40, 30, 30), np.uint8)
    labels[2:38, 2:28, 2:28] = label_set.body_id
    labels[5:15, 10:20, 10:20] = label_set.id_of("kidney")
    labels[25:35, 10:20, 10:20] = label_set.id_of("liver")
    x, y, z = np.meshgrid(*(np.arange(n) for n in labels.shape), indexing="ij")
    masks = [(x - cx) ** 2 + (y - 15) ** 2 + (z - 15) ** 2 <= r2 for cx, r2 in tumour_spheres]
    for mask in masks:
        labels[mask] = label_set.tumor_id
    return labels, ras_affine((2.0, 2.0, 2.0)), masks
