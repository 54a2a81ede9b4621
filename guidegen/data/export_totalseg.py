"""Write a label map as TotalSegmentator-style output (the inverse of ``prepare``'s mapping).

Useful to test a pipeline end to end (the tests round-trip phantom cases through
``guidegen prepare``) and to hand guidegen label maps to tools that read TotalSegmentator
output. Each label-set class is split back into concrete TotalSegmentator classes so the merge
in ``prepare`` is exercised: classes with ``_left``/``_right`` sources are split at the body
midline by the world x coordinate (RAS: +x is the patient's right), and classes with several
sources per side (lung lobes, vertebrae, ribs, v1 heart chambers) are cut into bands along z.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from guidegen.data.totalseg import totalseg_classes, totalseg_ids
from guidegen.io import save_nifti
from guidegen.labels import LabelSet


def _world_x(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(X, Y, Z) world x coordinate (mm) of every voxel, for the left/right split."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return affine[0, 0] * i + affine[0, 1] * j + affine[0, 2] * k + affine[0, 3]


def _split_bands(mask: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Cut ``mask`` into ``len(names)`` bands along axis 2 at voxel-count quantiles."""
    if len(names) == 1 or not mask.any():
        return {names[0]: mask}
    z = np.argwhere(mask)[:, 2]
    edges = np.quantile(z, np.linspace(0, 1, len(names) + 1)[1:-1])
    band = np.searchsorted(edges, np.arange(mask.shape[2]), side="right")  # band index per z
    return {name: mask & (band == b)[None, None, :] for b, name in enumerate(names)}


def split_to_totalseg(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet, version: int = 2) -> dict[str, np.ndarray]:
    """``{TotalSegmentator class name: (X, Y, Z) bool mask}`` for the organ classes of ``labels``.

    Tumour and body voxels are not included (they have their own files); background too.
    """
    table = totalseg_classes(version)
    sources: dict[int, list[str]] = {}
    for name in table.values():
        cid = label_set.class_for_source(name, version)
        if cid:
            sources.setdefault(cid, []).append(name)
    present = labels > 0
    midline = float(_world_x(affine, labels.shape)[present].mean()) if present.any() else 0.0
    x = None
    out: dict[str, np.ndarray] = {}
    for cid, names in sources.items():
        mask = labels == cid
        sides = {"left": [n for n in names if "_left" in n], "right": [n for n in names if "_right" in n]}
        neutral = [n for n in names if n not in sides["left"] + sides["right"]]
        if neutral and sides["left"]:  # e.g. v1 heart_myocardium + chambers: lowest band(s) first
            bands = _split_bands(mask, neutral + ["_sided"])
            mask = bands.pop("_sided")
            out.update(bands)
        if sides["left"] and sides["right"]:
            x = _world_x(affine, labels.shape) if x is None else x
            for side, side_names in sides.items():
                side_mask = mask & ((x > midline) if side == "right" else (x <= midline))
                out.update(_split_bands(side_mask, side_names))
        else:
            out.update(_split_bands(mask, names))
    return out


def export_totalseg_multilabel(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, label_set: LabelSet, version: int = 2) -> None:
    """One multi-label NIfTI with TotalSegmentator ``total`` ids (uint8)."""
    ids = totalseg_ids(version)
    out = np.zeros(labels.shape, dtype=np.uint8)
    for name, mask in split_to_totalseg(labels, affine, label_set, version).items():
        out[mask] = ids[name]
    save_nifti(path, out, affine, np.uint8)


def export_totalseg_folder(folder: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, label_set: LabelSet, version: int = 2, *, body: bool = True, include_empty: bool = False) -> list[Path]:
    """One binary mask per class (``<class>.nii.gz``) in ``folder``, plus ``body.nii.gz``
    (every labelled voxel) when ``body``. Returns the files written."""
    folder = Path(folder)
    written = []
    for name, mask in sorted(split_to_totalseg(labels, affine, label_set, version).items()):
        if include_empty or mask.any():
            save_nifti(folder / f"{name}.nii.gz", mask, affine, np.uint8)
            written.append(folder / f"{name}.nii.gz")
    if body:
        save_nifti(folder / "body.nii.gz", labels > 0, affine, np.uint8)
        written.append(folder / "body.nii.gz")
    return written


def export_tumor_mask(path: str | os.PathLike, labels: np.ndarray, affine: np.ndarray, label_set: LabelSet) -> None:
    """Binary tumour mask (uint8) of a label map."""
    save_nifti(path, labels == label_set.tumor_id, affine, np.uint8)
