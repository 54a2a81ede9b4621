"""Label-map post-processing after stage 1: isolated-voxel cleanup and stray-lesion removal.

A categorical diffusion sampler can leave single voxels whose label differs from all six face
neighbours ("speckle"): noise voxels of the last steps that the network did not veto. No
anatomy in the label set is one voxel thick in all three directions at the working grids, so
:func:`relabel_isolated_voxels` gives each such voxel the most frequent label among its 26
neighbours. Larger structures - including a tumour of two or more voxels - are not touched.
``guidegen generate`` applies it to sampled label maps by default (``--raw-labels`` keeps the
model's output) and records how many voxels changed; ``benchmarks/tcss_eval.py`` reports the
metrics of both, so the model's own speckle stays visible.

:func:`keep_requested_lesions` removes the tumour regions that match no tumour of the prompt:
an under-trained sampler leaves, besides a lesion, tumour fragments all over the torso
(measured on the demo TCSS at guidance 4: one 317-voxel region plus 166 fragments of 1-5 voxels
in one sample), and a segmentation model trained on such pairs would learn those fragments as
tumours. For each requested tumour the largest region touching the requested organ (and side)
is kept, exactly as :func:`guidegen.evaluation.metrics.match_tumors` matches them; every other
tumour region takes the majority label of its surrounding shell. Nothing is removed when the
prompt names no tumour ("no tumour stated" is not "no tumour"). Because this selection uses the
requested site, it can only keep what the model placed: ``benchmarks/tcss_eval.py`` reports the
model's own, site-blind placement (is its largest tumour region in the requested organ?) next to it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_FACES = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_STRUCT26 = np.ones((3, 3, 3), dtype=bool)
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


def tumor_regions(labels: np.ndarray, tumor_id: int) -> tuple[np.ndarray, int]:
    """26-connected tumour regions: ``(region ids (X, Y, Z) int, 1..n in scan order; n)``.

    The numbering of :func:`guidegen.evaluation.metrics.case_stats` (its ``tumors[j]`` is region j+1).
    """
    return ndimage.label(np.asarray(labels) == tumor_id, structure=_STRUCT26)


def region_shells(labels: np.ndarray, regions: np.ndarray):
    """For each region k = 1..n of ``regions`` (as from :func:`tumor_regions`), in order, yield
    ``(k, box, mask, shell_labels)``: ``box`` the region's bounding box grown by one voxel (clipped
    to the volume), ``mask`` the region inside it (bool), ``shell_labels`` (S,) the labels of its
    1-voxel 26-neighbourhood shell. Voxels outside the volume are not part of the shell.

    Works inside each box, so a map with many small fragments costs their boxes, not one pass
    over the whole volume per fragment.
    """
    lab = np.asarray(labels)
    for k, tight in enumerate(ndimage.find_objects(regions), start=1):
        if tight is None:
            continue
        box = tuple(slice(max(t.start - 1, 0), min(t.stop + 1, size)) for t, size in zip(tight, regions.shape))
        mask = regions[box] == k
        shell = ndimage.binary_dilation(mask, structure=_STRUCT26) & ~mask
        yield k, box, mask, lab[box][shell]


def drop_tumor_regions(labels: np.ndarray, tumor_id: int, keep: set[int]) -> tuple[np.ndarray, int]:
    """Relabel every tumour region (:func:`tumor_regions`) whose id is not in ``keep``.

    A removed region takes the most frequent label in its shell (:func:`region_shells`; the shell
    holds no tumour, which would belong to the region); ties go to the smaller label id, and a
    region with no shell (the whole volume) becomes background. Returns ``(cleaned copy, voxels changed)``.
    """
    lab = np.asarray(labels)
    out = lab.copy()
    changed = 0
    for k, box, mask, shell_labels in region_shells(lab, tumor_regions(lab, tumor_id)[0]):
        if k in keep:
            continue
        out[box][mask] = np.bincount(shell_labels.astype(np.int64)).argmax() if shell_labels.size else 0
        changed += int(mask.sum())
    return out, changed


def keep_requested_lesions(labels: np.ndarray, affine: np.ndarray, label_set, requested: list[dict]) -> tuple[np.ndarray, int]:
    """Keep, per requested tumour (``{"site", "side", "size_mm"}``), its matched region; drop the rest.

    ``requested`` empty (or a label set without a tumour class) leaves the map unchanged.
    Returns ``(cleaned copy, voxels changed)``.
    """
    from guidegen.evaluation.metrics import case_stats, match_tumors

    lab = np.asarray(labels)
    if not requested or label_set.tumor_id is None:
        return lab.copy(), 0
    matches = match_tumors(requested, case_stats(lab, affine, label_set), label_set)
    return drop_tumor_regions(lab, label_set.tumor_id, {m["region"] + 1 for m in matches if m["placed"]})


def clean_label_map(labels: np.ndarray, affine: np.ndarray, label_set, requested: list[dict]) -> tuple[np.ndarray, dict[str, int]]:
    """The default post-process of a sampled map: unrequested tumour regions, then isolated voxels.

    The lesions are matched on the model's own map: relabelling isolated organ voxels first can
    move a lesion's organ share across the "touches the organ" threshold and so drop the requested
    lesion for a small fragment (seen on 2 of 20 tcss_eval samples: a 44 mm pancreatic lesion
    replaced by a 14 mm one). Stray single tumour voxels are tumour regions, so the first pass
    removes them either way.
    ``requested``: the prompt's tumours as dicts (``Findings.to_dict()["tumors"]``).
    Returns ``(cleaned (X, Y, Z), {"isolated_voxels": n, "stray_tumor_voxels": m})``.
    """
    out, stray = keep_requested_lesions(labels, affine, label_set, requested)
    out, isolated = relabel_isolated_voxels(out)
    return out, {"isolated_voxels": isolated, "stray_tumor_voxels": stray}
