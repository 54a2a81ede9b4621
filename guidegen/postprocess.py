"""Label-map post-processing after stage 1: isolated-voxel cleanup.

A categorical diffusion sampler can leave single voxels whose label differs from all six face
neighbours ("speckle"): noise voxels of the last steps that the network did not veto. No
anatomy in the label set is one voxel thick in all three directions at the working grids, so
:func:`relabel_isolated_voxels` gives each such voxel the most frequent label among its 26
neighbours. Larger structures - including a tumour of two or more voxels - are not touched.
``guidegen generate`` applies it to sampled label maps by default (``--raw-labels`` keeps the
model's output) and records how many voxels changed; ``benchmarks/tcss_eval.py`` reports the
metrics of both, so the model's own speckle stays visible.
"""

from __future__ import annotations

import numpy as np

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
