"""Metric math: distribution distances, Dice, and label-map anatomy checks (DESIGN §8).

All functions are pure (arrays in, numbers out). Label maps are (X, Y, Z) arrays of label-set
ids in RAS+ voxel order (axis 0 → patient right, 1 → anterior, 2 → superior) with a diagonal
or general 4x4 affine in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg, ndimage
from scipy.stats import wasserstein_distance

from guidegen.labels import LabelSet
from guidegen.postprocess import isolated_voxels, region_shells, tumor_regions

_STRUCT26 = np.ones((3, 3, 3), dtype=bool)


# ------------------------------------------------------------------------- distributions
def frechet_distance(feat_a: np.ndarray, feat_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``; a small ``eps`` on the diagonal
    keeps the matrix square root finite when N < D (covariances are then singular).
    """
    a, b = np.asarray(feat_a, np.float64), np.asarray(feat_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    offset = np.eye(len(cov_a)) * eps
    covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if isinstance(covmean, tuple):  # older SciPy may return (sqrtm, error estimate)
        covmean = covmean[0]
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


# Pairwise distances are computed one block of rows at a time, so memory stays O(block * N * D)
# instead of the (N, N, D) a single broadcast needs (~3.6 GB at N = 2000, D = 112). Each block
# uses the same broadcast formula as a full computation, so distances are bit-identical to it
# (ties at a k-NN radius, e.g. duplicate points, are decided exactly as before).
_PAIRWISE_BLOCK_BYTES = 64 * 2 ** 20


def _row_blocks(n_rows: int, n_cols: int, dim: int, block_bytes: int | None = None):
    """Row slices covering ``range(n_rows)`` so each (rows, n_cols, dim) float64 block fits the budget."""
    budget = _PAIRWISE_BLOCK_BYTES if block_bytes is None else block_bytes
    rows = max(1, int(budget // max(8 * n_cols * max(dim, 1), 1)))
    for start in range(0, n_rows, rows):
        yield slice(start, min(start + rows, n_rows))


def _pairwise_block(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances of the rows of ``a`` to the rows of ``b``."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _knn_radii(x: np.ndarray, k: int, block_bytes: int | None = None) -> np.ndarray:
    """Distance of each row of (N, D) ``x`` to its k-th nearest other row (k capped at N - 1)."""
    k = min(k, len(x) - 1)
    radii = np.empty(len(x), dtype=np.float64)
    for rows in _row_blocks(len(x), len(x), x.shape[1], block_bytes):
        # column 0 of the sorted row is the point itself (distance 0)
        radii[rows] = np.partition(_pairwise_block(x[rows], x), k, axis=1)[:, k]
    return radii


def _in_manifold(ref: np.ndarray, radii: np.ndarray, query: np.ndarray, block_bytes: int | None = None) -> np.ndarray:
    """(len(query),) bool: the query row lies within ``radii[j]`` of some row ``ref[j]``."""
    inside = np.empty(len(query), dtype=bool)
    for rows in _row_blocks(len(query), len(ref), ref.shape[1], block_bytes):
        inside[rows] = (_pairwise_block(query[rows], ref) <= radii[None, :]).any(axis=1)
    return inside


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, *, block_bytes: int | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) from (N, D) feature sets.

    Each set's manifold is the union of balls around its points with radius = distance to the
    k-th nearest neighbour in the same set. Precision: fraction of fake points inside the real
    manifold; recall: fraction of real points inside the fake manifold. Both in [0, 1].
    ``k`` is capped at (set size - 1). Distances are computed in row blocks of at most
    ``block_bytes`` (default 64 MiB) of temporaries, so memory grows as O(N), not O(N^2 D).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("need at least 2 samples per set for k-NN radii")
    precision = float(_in_manifold(real, _knn_radii(real, k, block_bytes), fake, block_bytes).mean())
    recall = float(_in_manifold(fake, _knn_radii(fake, k, block_bytes), real, block_bytes).mean())
    return precision, recall


def relative_w1(real: np.ndarray, synth: np.ndarray) -> float:
    """W1 distance of two 1-D samples divided by the mean of ``real`` (0 = identical)."""
    real, synth = np.asarray(real, np.float64), np.asarray(synth, np.float64)
    scale = abs(real.mean())
    if len(real) == 0 or len(synth) == 0 or scale == 0:
        return float("nan")
    return float(wasserstein_distance(real, synth) / scale)


# ------------------------------------------------------------------------------------ dice
def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) Dice of integer label maps of equal shape (any leading batch dims allowed).

    A class absent from both ``pred`` and ``target`` gets NaN (no evidence either way); one
    present in only one of them gets 0.
    """
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {target.shape}")
    inter = np.bincount(target[pred == target].astype(np.int64), minlength=num_classes)[:num_classes]
    sp = np.bincount(pred.astype(np.int64), minlength=num_classes)[:num_classes]
    st = np.bincount(target.astype(np.int64), minlength=num_classes)[:num_classes]
    denom = sp + st
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)


def mean_dice_per_class(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) per-class Dice averaged over cases (N, ...); NaN where no case has the class."""
    rows = np.stack([dice_per_class(p, t, num_classes) for p, t in zip(preds, targets)])
    with np.errstate(invalid="ignore"):
        out = np.full(num_classes, np.nan)
        seen = ~np.isnan(rows).all(0)
        out[seen] = np.nanmean(rows[:, seen], axis=0)
    return out


# ------------------------------------------------------------------------ label-map stats
@dataclass
class TumorComponent:
    """One connected tumour region: voxels, world centroid (mm), neighbour class counts."""

    voxels: int
    volume_ml: float
    centroid_mm: np.ndarray
    shell_counts: np.ndarray  # (C,) label counts in a 1-voxel shell around the component

    @property
    def diameter_mm(self) -> float:
        """Equivalent-sphere diameter: the diameter of a sphere with the same volume."""
        return sphere_diameter_mm(self.volume_ml * 1000.0)


def sphere_diameter_mm(volume_mm3: float) -> float:
    """Equivalent-sphere diameter (mm) of a volume in mm³ (how report sizes and lesions compare)."""
    return float((6.0 * volume_mm3 / np.pi) ** (1.0 / 3.0))


def sphere_volume_mm3(diameter_mm: float) -> float:
    """Volume (mm³) of a sphere of ``diameter_mm``: the inverse of :func:`sphere_diameter_mm`."""
    return float(np.pi / 6.0 * diameter_mm ** 3)


@dataclass
class CaseStats:
    """Per-case label-map statistics used by the label-map metrics."""

    volumes_ml: np.ndarray  # (C,) volume per class
    components: np.ndarray  # (C,) connected components per class (26-connectivity)
    order: dict[str, bool | None]  # anatomical order checks (None: organs missing)
    tumors: list[TumorComponent] = field(default_factory=list)
    midline_x_mm: float = 0.0  # world x of the spine (or body) centre, for left/right checks


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return np.asarray(affine)[:3, :3] @ np.asarray(ijk, np.float64) + np.asarray(affine)[:3, 3]


def _profiles(mask: np.ndarray) -> list[np.ndarray]:
    """Voxel counts of a boolean (X, Y, Z) mask per index along each axis: three 1-D arrays.

    Centroids and extents come from these instead of ``np.argwhere``, whose (N, 3) int64 index
    array takes 1.4 GB for a 60-million-voxel body mask of a full-resolution CT.
    """
    axes = range(mask.ndim)
    return [mask.sum(axis=tuple(a for a in axes if a != k), dtype=np.int64) for k in axes]


def mask_centroid(mask: np.ndarray) -> np.ndarray | None:
    """Voxel-index centroid (float, one entry per axis) of a boolean mask; None when it is empty."""
    prof = _profiles(mask)
    total = prof[0].sum()
    if total == 0:
        return None
    return np.array([(np.arange(len(p), dtype=np.float64) * p).sum() / total for p in prof])


def mask_extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lowest, highest) voxel index per axis of a boolean mask, both inclusive; None when empty."""
    nz = [np.flatnonzero(p) for p in _profiles(mask)]
    if not len(nz[0]):
        return None
    return np.array([n[0] for n in nz]), np.array([n[-1] for n in nz])


def anatomical_order(labels: np.ndarray, label_set: LabelSet) -> dict[str, bool | None]:
    """Three coarse anatomy checks on an (X, Y, Z) RAS label map (z = superior).

    - ``lungs_above_liver``: lung centroid is superior to the liver centroid;
    - ``bladder_lowest``: the urinary bladder centroid is inferior to every other organ's;
    - ``heart_between_lungs``: the heart centroid lies left-right within the lungs' extent
      and superior-inferior within their extent.
    A check is None when an organ it needs is absent.
    """
    def cent(name: str) -> np.ndarray | None:
        return mask_centroid(labels == label_set.id_of(name)) if name in label_set.names else None

    lung, liver, bladder, heart = cent("lung"), cent("liver"), cent("urinary_bladder"), cent("heart")
    out: dict[str, bool | None] = {"lungs_above_liver": None, "bladder_lowest": None, "heart_between_lungs": None}
    if lung is not None and liver is not None:
        out["lungs_above_liver"] = bool(lung[2] > liver[2])
    if bladder is not None:
        others = [cent(label_set.name_of(i)) for i in label_set.organ_ids if label_set.name_of(i) != "urinary_bladder"]
        zs = [c[2] for c in others if c is not None]
        out["bladder_lowest"] = bool(all(bladder[2] < z for z in zs)) if zs else None
    if heart is not None and lung is not None:
        lo, hi = mask_extent(labels == label_set.id_of("lung"))
        out["heart_between_lungs"] = bool(lo[0] < heart[0] < hi[0] and lo[2] <= heart[2] <= hi[2])
    return out


def isolated_fraction(labels: np.ndarray) -> float:
    """Share of non-background voxels whose label differs from all 6 face neighbours (speckle).

    ``labels`` (X, Y, Z) integer ids; the volume border is padded with background. A clean
    label map has few (thin structures such as ribs give some); a diffusion sampler that leaves
    noise voxels behind has many.
    """
    lab = np.asarray(labels)
    fg = lab != 0
    return float((fg & isolated_voxels(lab)).sum() / max(int(fg.sum()), 1))


def case_stats(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet) -> CaseStats:
    """Volumes, component counts, order checks and tumour components of one label map."""
    labels = np.asarray(labels)
    n = label_set.num_classes
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    volumes = np.bincount(labels.ravel().astype(np.int64), minlength=n)[:n] * voxel_ml
    comps = np.zeros(n, dtype=np.int64)
    for c in range(1, n):
        if volumes[c] > 0:
            comps[c] = ndimage.label(labels == c, structure=_STRUCT26)[1]
    tumors: list[TumorComponent] = []
    tid = label_set.tumor_id
    if tid is not None and volumes[tid] > 0:
        # the numbering guidegen.postprocess drops regions by: tumors[j] is region j + 1
        for _, box, mask, shell_labels in region_shells(labels, tumor_regions(labels, tid)[0]):
            counts = np.bincount(shell_labels.astype(np.int64), minlength=n)[:n]
            centroid = mask_centroid(mask) + [b.start for b in box]
            tumors.append(TumorComponent(int(mask.sum()), float(mask.sum() * voxel_ml), _world(affine, centroid), counts))
    return CaseStats(volumes, comps, anatomical_order(labels, label_set), tumors, midline_x_mm(labels, affine, label_set))


def midline_x_mm(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet) -> float:
    """World x (mm) of the spine's centroid, else of all labelled voxels (0 for an empty map):
    the patient's midline for left/right checks of paired organs."""
    spine = mask_centroid(labels == label_set.id_of("vertebrae")) if "vertebrae" in label_set.names else None
    centre = spine if spine is not None else mask_centroid(labels > 0)
    return float(_world(affine, centre)[0]) if centre is not None else 0.0


# ------------------------------------------------------------------------------ tumours
def match_tumors(requested: list[dict], stats: CaseStats, label_set: LabelSet, min_share: float = 0.1) -> list[dict]:
    """Check each requested tumour against the tumour regions of the label map.

    ``requested``: the ``tumors`` of a findings dict, ``[{"site", "side", "size_mm"}]``. A
    request is *placed* when some not yet used tumour region touches or sits inside the
    requested organ: the organ makes up at least ``min_share`` of the region's 1-voxel shell
    (the tumour label overwrites the organ, so "inside" shows as the organ all around it) and,
    for a paired organ with a side, the region's centroid is on that side of the spine. Among
    the qualifying regions the largest is taken (ties: the larger organ share): a sampled map may
    hold a real lesion and a few stray tumour voxels, and a stray voxel deep in the organ must
    not stand for the lesion. Largest requests are matched first. Returns one dict per request: site, side,
    requested_mm, placed, measured_mm (equivalent-sphere diameter, or None), size_ok
    (within ±50 % of the request, or None when unplaced or no size was asked) and region (the
    index into ``stats.tumors`` of the matched region, or None).
    """
    results: list[dict] = []
    used: set[int] = set()
    order = sorted(range(len(requested)), key=lambda i: -(requested[i].get("size_mm") or 0.0))
    by_index: dict[int, dict] = {}
    for i in order:
        req = requested[i]
        site, side, size = req.get("site"), req.get("side"), req.get("size_mm")
        best, best_key = None, (0, 0.0)
        if site in label_set.names:
            oid = label_set.id_of(site)
            for j, comp in enumerate(stats.tumors):
                if j in used:
                    continue
                share = comp.shell_counts[oid] / max(int(comp.shell_counts.sum()), 1)
                if side in ("left", "right"):
                    right = comp.centroid_mm[0] > stats.midline_x_mm  # RAS: +x is the patient's right
                    if right != (side == "right"):
                        continue
                if share >= min_share and (comp.voxels, share) > best_key:
                    best, best_key = j, (comp.voxels, share)
        rec = {"site": site, "side": side, "requested_mm": size, "placed": best is not None, "measured_mm": None, "size_ok": None,
               "region": best}
        if best is not None:
            used.add(best)
            d = stats.tumors[best].diameter_mm
            rec["measured_mm"] = round(d, 2)
            if size:
                rec["size_ok"] = bool(abs(d - float(size)) <= 0.5 * float(size))
        by_index[i] = rec
    results = [by_index[i] for i in range(len(requested))]
    return results
