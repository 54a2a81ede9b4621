"""Label-map post-processing after stage 1: isolated-voxel cleanup and stray-lesion removal.

A categorical diffusion sampler can leave single voxels whose label differs from all six face
neighbours ("speckle"): noise voxels of the last steps that the network did not veto. No
anatomy in the label set is one voxel thick in all three directions at the working grids, so
:func:`relabel_isolated_voxels` gives each such voxel the most frequent label among its 26
neighbours. Larger structures - including a tumour of two or more voxels - are not touched.
``guidegen generate`` applies it to sampled label maps by default (``--raw-labels`` keeps the
model's output) and records how many voxels changed; ``benchmarks/tcss_eval.py`` reports the
metrics of both, so the model's own speckle stays visible.

:func:`keep_largest_lesions` removes tumour regions beyond the number of tumours the prompt
asked for: an under-trained sampler places the requested lesion and also leaves small tumour
fragments elsewhere (measured on the demo TCSS: one 317-voxel liver lesion plus 166 fragments of
1-5 voxels in one sample), and a segmentation model trained on such pairs would learn those
fragments as tumours. The choice is blind to the requested site (the largest regions are kept,
wherever they are), so the placement metric still judges the model. Removed voxels take the
majority label of the region's surrounding shell. Nothing is removed when the prompt names no
tumour: "no tumour stated" is not "no tumour".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FACES = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_NEIGHBOURS26 = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1) if (dx, dy, dz) != (0, 0, 0)]


def _shifted(padded: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    """View of the 1-voxel-padded volume moved by ``offset``, cropped back to the original shape."""
    x, y, z = (np.asarray(padded.shape) - 2).tolist()
    dx, dy, dz = offset
    return padded[1 + dx:1 + dx + x, 1 + dy:1 + dy + y, 1 + dz:1 + dz + z]


def isolated_voxels(labels: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels whose label differs from all 6 face neighbours.

    ``labels`` (X, Y, Z) integer ids; outside the volume counts as background (0).
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be (X, Y, Z), got shape {lab.shape}")
    padded = np.pad(lab, 1, constant_values=0)
    isolated = np.ones(lab.shape, dtype=bool)
    for offset in _FACES:
        isolated &= _shifted(padded, offset) != lab
    return isolated


def relabel_isolated_voxels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Give every isolated voxel (:func:`isolated_voxels`) the majority label of its 26 neighbours.

    One simultaneous pass over the original map (the result does not depend on voxel order);
    ties go to the smaller label id. Returns ``(cleaned (X, Y, Z) same dtype, voxels changed)``.
    """
    lab = np.asarray(labels)
    mask = isolated_voxels(lab)
    if not mask.any():
        return lab.copy(), 0
    padded = np.pad(lab, 1, constant_values=0)
    neighbours = np.stack([_shifted(padded, o)[mask] for o in _NEIGHBOURS26], axis=1).astype(np.int64)  # (n, 26)
    counts = np.zeros((neighbours.shape[0], int(neighbours.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.arange(neighbours.shape[0])[:, None], neighbours), 1)
    out = lab.copy()
    out[mask] = counts.argmax(axis=1).astype(lab.dtype)
    return out, int((out != lab).sum())


def keep_largest_lesions(labels: np.ndarray, tumor_id: int, keep: int) -> tuple[np.ndarray, int]:
    """Keep the ``keep`` largest tumour regions (26-connected); relabel the others.

    Each removed region takes the most frequent label in its 1-voxel shell (26-neighbourhood;
    outside the volume counts as background; the shell holds no tumour since tumour there would
    belong to the region). Of equally large regions the one met first in scan order is kept; a
    tie in the shell goes to the smaller label id. ``keep`` <= 0 leaves the map unchanged. Returns ``(cleaned copy, voxels changed)``.
    """
    lab = np.asarray(labels)
    out = lab.copy()
    if keep <= 0:
        return out, 0
    cc, n = ndimage.label(lab == tumor_id, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= keep:
        return out, 0
    sizes = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    drop = np.argsort(-sizes, kind="stable")[keep:] + 1
    padded_cc = np.pad(cc, 1)
    padded_lab = np.pad(lab, 1, constant_values=0)
    boxes = ndimage.find_objects(padded_cc)
    for k in drop:
        box = tuple(slice(s.start - 1, s.stop + 1) for s in boxes[k - 1])  # room for the shell
        region = padded_cc[box] == k
        shell = ndimage.binary_dilation(region, structure=np.ones((3, 3, 3), dtype=bool)) & ~region
        fill = np.bincount(padded_lab[box][shell].astype(np.int64)).argmax()
        out_box = tuple(slice(s.start - 1, s.stop - 1) for s in boxes[k - 1])
        out[out_box][region[1:-1, 1:-1, 1:-1]] = fill
    return out, int(sizes[drop - 1].sum())


def clean_label_map(labels: np.ndarray, tumor_id: int | None, requested_tumors: int) -> tuple[np.ndarray, dict[str, int]]:
    """The default post-process of a sampled map: isolated voxels, then stray lesions.

    Returns ``(cleaned (X, Y, Z), {"isolated_voxels": n, "stray_tumor_voxels": m})``.
    """
    out, isolated = relabel_isolated_voxels(labels)
    stray = 0
    if tumor_id is not None:
        out, stray = keep_largest_lesions(out, tumor_id, requested_tumors)
    return out, {"isolated_voxels": isolated, "stray_tumor_voxels": stray}
