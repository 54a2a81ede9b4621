"""Slice montages: CT (several HU windows) with the label map overlaid, saved as PNG."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guidegen.io import atomic_write  # noqa: E402
from guidegen.labels import LabelSet  # noqa: E402

# (center, width) in HU: the radiologist's standard windows
WINDOWS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1500.0)}


def window_to_unit(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU through a display window to [0, 1] (clipped)."""
    return np.clip((np.asarray(hu, dtype=np.float32) - (center - width / 2)) / width, 0.0, 1.0)


def label_rgba(labels: np.ndarray, label_set: LabelSet, alpha: float = 0.45, skip_body: bool = True) -> np.ndarray:
    """(..., 4) float RGBA overlay; background (and body, by default) transparent."""
    colors = label_set.colors().astype(np.float32) / 255.0
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    rgba[..., :3] = colors[labels]
    visible = labels > 0
    if skip_body and label_set.body_id is not None:
        visible &= labels != label_set.body_id
    rgba[..., 3] = np.where(visible, alpha, 0.0)
    return rgba


def orthogonal_slices(vol: np.ndarray, center: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal slices of an (X, Y, Z) RAS volume, oriented for display.

    Display convention (radiological): axial seen from the feet (patient right on the image
    left, anterior up); coronal and sagittal with superior up.
    """
    cx, cy, cz = center if center is not None else (s // 2 for s in vol.shape)
    axial = vol[:, :, cz]  # (X, Y)
    coronal = vol[:, cy, :]  # (X, Z)
    sagittal = vol[cx, :, :]  # (Y, Z)
    # x grows towards the patient's right, so columns run x-descending to put the patient's
    # right on the image left; rows run y- (or z-) descending to put anterior (superior) on top.
    return {
        "axial": np.flipud(axial.T)[:, ::-1],
        "coronal": np.flipud(coronal.T)[:, ::-1],
        "sagittal": np.flipud(sagittal.T)[:, ::-1],  # anterior on the image left
    }


def _aspects(spacing: tuple[float, float, float]) -> dict[str, float]:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}


def save_case_preview(
    path: str | os.PathLike,
    labels: np.ndarray,
    ct: np.ndarray | None,
    label_set: LabelSet,
    *,
    title: str = "",
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    center: tuple[int, int, int] | None = None,
) -> None:
    """PNG montage: rows = CT (soft-tissue window), CT (lung window), CT + labels (or labels alone).

    ``labels`` (X, Y, Z) ids; ``ct`` (X, Y, Z) HU or None for label-only cases.
    """
    if center is None and label_set.tumor_id is not None and np.any(labels == label_set.tumor_id):
        center = tuple(int(v) for v in np.argwhere(labels == label_set.tumor_id).mean(axis=0))  # show the tumour
    lab_slices = orthogonal_slices(labels, center)
    rows: list[tuple[str, dict[str, np.ndarray] | None, tuple[float, float] | None]] = []
    if ct is not None:
        ct_slices = orthogonal_slices(ct, center)
        rows += [("CT soft tissue", ct_slices, WINDOWS["soft tissue"]), ("CT lung", ct_slices, WINDOWS["lung"]), ("CT + labels", ct_slices, WINDOWS["soft tissue"])]
    else:
        rows += [("labels", None, None)]
    aspects = _aspects(spacing)
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for r, (row_name, slices, window) in enumerate(rows):
        for c, view in enumerate(("axial", "coronal", "sagittal")):
            ax = axes[r, c]
            if slices is not None:
                ax.imshow(window_to_unit(slices[view], *window), cmap="gray", vmin=0, vmax=1, aspect=aspects[view], interpolation="nearest")
            else:
                ax.imshow(np.zeros(lab_slices[view].shape), cmap="gray", vmin=0, vmax=1, aspect=aspects[view])
            if row_name.endswith("labels"):
                ax.imshow(label_rgba(lab_slices[view], label_set, alpha=0.5 if slices is not None else 1.0, skip_body=slices is not None), aspect=aspects[view], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=9)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
