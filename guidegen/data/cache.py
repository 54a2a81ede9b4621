"""Preprocessing to the training grid, cached on disk keyed by the preprocessing config.

The paper's preprocessing (METHOD §6): RAS orientation, crop to the torso field of view, resize
the crop to a fixed grid (labels nearest, CT trilinear) so that the physical spacing varies per
case and is kept in the metadata. We crop the superior–inferior axis to the bounding box of the
organ labels (chest to pelvis) and the two in-plane axes to the body (so the body outline and
fat are kept), with a small margin.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from guidegen.io import atomic_write, spacing_from_affine, write_json_atomic
from guidegen.labels import LabelSet

CACHE_VERSION = 1


@dataclass(frozen=True)
class PreprocessConfig:
    grid: tuple[int, int, int]
    margin_voxels: int = 2
    label_set: str = "guidegen22"
    with_ct: bool = True

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def torso_bbox(labels: np.ndarray, label_set: LabelSet, margin: int) -> tuple[slice, slice, slice]:
    """Crop box: z from the organ labels, x/y from the body (all non-zero labels), + margin."""
    organ = np.isin(labels, label_set.organ_ids + ([label_set.tumor_id] if label_set.tumor_id is not None else []))
    anything = labels > 0
    if not organ.any():
        organ = anything
    if not anything.any():
        return tuple(slice(0, s) for s in labels.shape)  # type: ignore[return-value]

    def span(mask: np.ndarray, axis: int) -> slice:
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        return slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, labels.shape[axis]))

    return span(anything, 0), span(anything, 1), span(organ, 2)


def resize_labels(labels: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (X, Y, Z) label map to ``grid`` (uint8)."""
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.uint8)).float()[None, None]
    return F.interpolate(t, size=grid, mode="nearest-exact")[0, 0].to(torch.uint8).numpy()


def resize_ct(ct: np.ndarray, grid: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resize of an (X, Y, Z) HU volume to ``grid`` (float32 HU)."""
    t = torch.from_numpy(np.ascontiguousarray(ct, dtype=np.float32))[None, None]
    return F.interpolate(t, size=grid, mode="trilinear", align_corners=False)[0, 0].numpy()


def preprocess_case(labels: np.ndarray, ct: np.ndarray | None, affine: np.ndarray, cfg: PreprocessConfig, label_set: LabelSet) -> dict:
    """Crop + resize one case; returns arrays on ``cfg.grid`` and the resulting geometry.

    Returns ``{"labels": (X, Y, Z) uint8, "ct": (X, Y, Z) float32 HU or None,
    "spacing_mm": (3,), "extent_mm": (3,)}`` where spacing is that of the resized grid.
    """
    box = torso_bbox(labels, label_set, cfg.margin_voxels)
    cropped = labels[box]
    src_spacing = np.array(spacing_from_affine(affine))
    extent = src_spacing * np.array(cropped.shape)
    out = {
        "labels": resize_labels(cropped, cfg.grid),
        "ct": resize_ct(ct[box], cfg.grid) if (ct is not None and cfg.with_ct) else None,
        "spacing_mm": (extent / np.array(cfg.grid)).astype(np.float32),
        "extent_mm": extent.astype(np.float32),
    }
    return out


def source_stamp(paths: Sequence[str | Path]) -> np.ndarray:
    """(N, 2) int64: size in bytes and modification time in ns of each file a cache entry is
    computed from, so an entry whose label map or CT was replaced in place is known stale."""
    return np.array([[st.st_size, st.st_mtime_ns] for st in (os.stat(p) for p in paths)], dtype=np.int64).reshape(-1, 2)


class PreprocessCache:
    """``DATASET/cache/<key>/<case>.npz`` for one :class:`PreprocessConfig`.

    An entry stored with its ``sources`` (the case's NIfTI files) keeps their
    :func:`source_stamp`; loading it with ``sources`` returns None when a file changed since, so
    the dataset recomputes it (entries of earlier versions, without a stamp, are taken as they are).
    """

    def __init__(self, dataset_root: str | Path, cfg: PreprocessConfig):
        self.cfg = cfg
        self.dir = Path(dataset_root) / "cache" / cfg.key()

    def path(self, case: str) -> Path:
        return self.dir / f"{case}.npz"

    def is_fresh(self, case: str, sources: Sequence[str | Path] | None = None) -> bool:
        """Whether ``case`` is cached and, given its ``sources``, computed from them as they are now
        (reads the stamp only, not the volumes)."""
        p = self.path(case)
        if not p.is_file():
            return False
        if sources is None:
            return True
        with np.load(p) as z:
            return "source_stamp" not in z.files or np.array_equal(z["source_stamp"], source_stamp(sources))

    def load(self, case: str, sources: Sequence[str | Path] | None = None) -> dict | None:
        """The cached item, or None (not cached, or stale against ``sources``); absent arrays
        (e.g. no CT) come back as None."""
        if not self.is_fresh(case, sources):
            return None
        with np.load(self.path(case)) as z:
            item = {k: z[k] for k in z.files if k != "source_stamp"}
        item.setdefault("ct", None)
        return item

    def store(self, case: str, item: dict, sources: Sequence[str | Path] | None = None) -> None:
        if not (self.dir / "config.json").exists():
            write_json_atomic(self.dir / "config.json", {**asdict(self.cfg), "version": CACHE_VERSION})
        arrays = {k: np.asarray(v) for k, v in item.items() if v is not None}
        if sources is not None:
            arrays["source_stamp"] = source_stamp(sources)
        with atomic_write(self.path(case)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
