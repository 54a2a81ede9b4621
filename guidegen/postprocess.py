"""Label-map post-processing after stage 1: stray-lesion removal, detached organ parts, isolated voxels.

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


def relabel_regions(labels: np.ndarray, regions: np.ndarray, keep: set[int], exclude: tuple[int, ...] = ()) -> tuple[np.ndarray, int]:
    """Give every region of ``regions`` (ids 1..n, 0 = none) whose id is not in ``keep`` the most
    frequent label of its shell (:func:`region_shells`), leaving out the labels in ``exclude``.

    Ties go to the smaller label id; a region with no usable shell label becomes background.
    Returns ``(cleaned copy, voxels changed)``.
    """
    lab = np.asarray(labels)
    out = lab.copy()
    changed = 0
    for k, box, mask, shell_labels in region_shells(lab, regions):
        if k in keep:
            continue
        usable = shell_labels[~np.isin(shell_labels, exclude)].astype(np.int64)
        out[box][mask] = np.bincount(usable).argmax() if usable.size else 0
        changed += int(mask.sum())
    return out, changed


def drop_tumor_regions(labels: np.ndarray, tumor_id: int, keep: set[int]) -> tuple[np.ndarray, int]:
    """Relabel every tumour region (:func:`tumor_regions`) whose id is not in ``keep`` by the
    majority of its shell (:func:`relabel_regions`; the shell holds no tumour, which would belong
    to the region). Returns ``(cleaned copy, voxels changed)``.
    """
    lab = np.asarray(labels)
    return relabel_regions(lab, tumor_regions(lab, tumor_id)[0], keep)


def organ_parts(labels: np.ndarray, class_id: int, tumor_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The separate parts of one organ class: ``(part ids (X, Y, Z) int, 0 outside the class; organ
    voxels per part (n,), part k at index k - 1)``.

    Parts are 26-connected with tumour voxels counted as bridges: a lesion that cuts a kidney in
    two leaves one kidney, not two.
    """
    lab = np.asarray(labels)
    organ = lab == class_id
    tumor = lab == tumor_id if tumor_id is not None else np.zeros_like(organ)
    comps, n = ndimage.label(organ | tumor, structure=_STRUCT26)
    organ_voxels = np.bincount(comps[organ], minlength=n + 1)[1:]
    present = np.flatnonzero(organ_voxels) + 1  # tumour-only components hold no organ voxel
    parts = np.zeros_like(comps)
    parts[organ] = np.searchsorted(present, comps[organ]) + 1
    return parts, organ_voxels[present - 1]


# a voxel within this distance of a lesion is "near" it for the organ-part ranking: the rims a
# forced lesion leaves are 1-3 voxels thick on the demo grid (5.6-8.2 mm voxels), and the GPU
# presets scale volume matching's pooling box, which makes the rims, by the grid: so the reach is
# physical, 2 demo voxels
LESION_RIM_MM = 14.0


def lesion_rim_voxels(affine: np.ndarray) -> int:
    """:data:`LESION_RIM_MM` in 26-neighbourhood steps on a grid with this (4, 4) affine (>= 1):
    2 on the demo grid, 5 at 128³ and 11 at 256³ over the same field of view."""
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return max(1, int(round(LESION_RIM_MM / float(spacing.mean()))))


def keep_organ_parts(labels: np.ndarray, label_set, lesions: np.ndarray | None = None,
                     rim_voxels: int = 2) -> tuple[np.ndarray, int]:
    """Keep, for every class with a fixed number of parts (``LabelClass.parts``: 1 liver, 2 kidneys),
    its that-many largest parts (:func:`organ_parts`), sized by their voxels farther than
    ``rim_voxels`` 26-neighbourhood steps from a lesion (ties by all their voxels;
    :func:`lesion_rim_voxels` gives it for a grid); every other part takes the
    majority label of its shell other than the class itself and the tumour (so a removed fragment
    never grows a lesion). ``lesions``: (X, Y, Z) bool, the lesions the parts are judged against
    (default: the tumour voxels of ``labels``). Returns ``(cleaned copy, voxels changed)``.

    *Why*: a sampled map can hold a detached piece of an organ - a bladder-labelled rim around a
    large lesion, a splinter of liver in the chest - that no body has. It moves the
    organ's centroid (the anatomical-order checks read centroids), and the CT stage paints it as
    organ tissue where a segmentation model trained on real anatomy sees none. nnU-Net's
    post-processing keeps the largest component per class for the same reason. A rim wraps its
    lesion, so around a 5 cm lesion it can hold more voxels than the real bladder (3 of 50
    tcss_eval samples; up to 437 voxels against the bladder's 263); almost all of its voxels lie
    within 2 voxels of the lesion, while a real organ's seldom do.
    """
    out = np.asarray(labels).copy()
    changed = 0
    exclude_tumor = () if label_set.tumor_id is None else (label_set.tumor_id,)
    if lesions is None:
        lesions = out == label_set.tumor_id if label_set.tumor_id is not None else np.zeros(out.shape, bool)
    near_lesion = (ndimage.binary_dilation(lesions, structure=_STRUCT26, iterations=rim_voxels)
                   if lesions.any() else lesions)
    for cls in label_set.classes:
        if cls.parts is None:
            continue
        parts, sizes = organ_parts(out, cls.id, label_set.tumor_id)
        if len(sizes) <= cls.parts:
            continue
        away = np.bincount(parts[(parts > 0) & ~near_lesion], minlength=len(sizes) + 1)[1:]
        keep = {int(k) + 1 for k in np.lexsort((-sizes, -away))[:cls.parts]}
        out, n = relabel_regions(out, parts, keep, exclude=(cls.id, *exclude_tumor))
        changed += n
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
    """The default post-process of a sampled map: unrequested tumour regions, detached organ
    parts (:func:`keep_organ_parts`), then isolated voxels.

    The lesions are matched on the model's own map: relabelling isolated organ voxels first can
    move a lesion's organ share across the "touches the organ" threshold and so drop the requested
    lesion for a small fragment (seen on 2 of 20 tcss_eval samples: a 44 mm pancreatic lesion
    replaced by a 14 mm one). Stray single tumour voxels are tumour regions, so the first pass
    removes them either way. Organ parts come after the lesions, so only the kept lesions bridge
    an organ's pieces, and before the isolated voxels, so a one-voxel splinter is relabelled once.
    ``requested``: the prompt's tumours as dicts (``Findings.to_dict()["tumors"]``).
    Returns ``(cleaned (X, Y, Z), {"isolated_voxels": n, "stray_tumor_voxels": m, "organ_part_voxels": p})``.
    """
    out, stray = keep_requested_lesions(labels, affine, label_set, requested)
    # the parts are judged against every lesion the model drew: a rim stays a rim after its
    # lesion was removed as unrequested
    sampled_lesions = np.asarray(labels) == label_set.tumor_id if label_set.tumor_id is not None else None
    out, parts = keep_organ_parts(out, label_set, sampled_lesions, lesion_rim_voxels(affine))
    out, isolated = relabel_isolated_voxels(out)
    return out, {"isolated_voxels": isolated, "stray_tumor_voxels": stray, "organ_part_voxels": parts}
