"""The decoder's voxel texture: p(target − decoded | class, decoded level) as quantile tables.

Why: the autoencoder's decoder is deterministic, and a voxel's HU holds detail that the ×4
coarser latent cannot carry. At the demo grid (~8 mm voxels) a rib voxel is cortex (~950 HU) or
marrow (~300 HU) by where the grid point falls inside the rib; the decoder can give the class
one value there, and the class-mean loss term keeps it at the mean (~710 HU), so the ribs'
*median*, which real CT has at the cortex, is lost (all 20 reconstructions of the shipped AE
below the real range); the heart's myocardium and contrast-filled chambers blur the same way. A
loss on the output cannot fix that: per voxel, a deterministic output is either the mean or the
median of what the latent leaves open, not both (docs/measurements.md).

This model draws what the latent leaves open. For each class k the decoded level (normalised
units) is cut into ``bins`` ranges at the quantiles of its training values; for each (class,
range) the residuals ``target − decoded`` of training reconstructions are kept as ``quantiles``
evenly spaced quantiles. Sampling draws a residual for every voxel from the table of its class
and decoded level by inverting that empirical CDF (linear between the table's levels). The
tables are measured, not trained: one pass over training cases at export
(:func:`fit_texture_tables`). Draws are independent per voxel (white texture); the level and
the class carry the dependence that matters for the HU statistics.

Shapes and value ranges:
    decoded  (B, 1, X, Y, Z) float, the decoder's output in normalised units (≈ [-1, 1])
    labels   (B, X, Y, Z) long, label-set ids in [0, num_classes)
    edges    (K, bins - 1) per-class bin edges of the decoded level, normalised units
    table    (K, bins, quantiles) residual quantiles at levels (j + 0.5) / quantiles, normalised units
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn


class VoxelTexture(nn.Module):
    """Per-voxel residual sampler over quantile tables (all zeros, so a no-op, until fitted).

    Args:
        num_classes: K, the label set's size.
        bins: ranges of the decoded level per class (1 = the class alone decides).
        quantiles: Q, residual quantiles kept per (class, range).
    """

    def __init__(self, num_classes: int, bins: int, quantiles: int) -> None:
        super().__init__()
        if bins < 1 or quantiles < 2:
            raise ValueError(f"VoxelTexture needs bins >= 1 and quantiles >= 2, got {bins} and {quantiles}")
        self.register_buffer("edges", torch.zeros(num_classes, bins - 1))
        self.register_buffer("table", torch.zeros(num_classes, bins, quantiles))

    @property
    def fitted(self) -> bool:
        """Whether the tables were measured (an unfitted table is all zeros)."""
        return bool(self.table.abs().sum() > 0)

    def bins_of(self, decoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) decoded + (B, X, Y, Z) ids → (B, X, Y, Z) long range index in [0, bins).

        The index is the number of the class's edges strictly below the voxel's level (numpy's
        ``searchsorted`` with side ``"left"``).
        """
        level = decoded[:, 0]
        bins = torch.zeros_like(labels)
        for edge in self.edges.to(decoded.dtype).T:  # one volume-sized gather per edge, not (…, bins - 1) at once
            bins += level > edge[labels]
        return bins

    def quantile(self, labels: torch.Tensor, bins: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The residual at probability ``u`` in [0, 1] of each voxel's table, same shape as ``labels``.

        Table entry j sits at level (j + 0.5) / Q; in between the CDF is linear, outside the first
        and last entries it is clamped (the tails stop at the extreme quantiles kept).
        """
        q = self.table.shape[-1]
        pos = (u * q - 0.5).clamp(0, q - 1)
        lo = pos.floor().long().clamp(max=q - 2)
        frac = (pos - lo).to(self.table.dtype)
        row = (labels * self.table.shape[1] + bins) * q
        flat = self.table.reshape(-1)
        return flat[row + lo] * (1 - frac) + flat[row + lo + 1] * frac

    def sample(self, decoded: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One residual draw per voxel: (B, 1, X, Y, Z) in normalised units, to add to ``decoded``."""
        labels = labels.long()
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
        return self.quantile(labels, self.bins_of(decoded, labels), u).unsqueeze(1).to(decoded.dtype)


def fit_texture_tables(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int, bins: int,
                       quantiles: int, per_class_case: int = 20_000, min_count: int = 64,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Measure (edges (K, bins - 1), table (K, bins, Q)) from ``cases`` of (decoded, target, labels).

    Each case gives its decoded and target volumes (X, Y, Z) in normalised units and its ids
    (X, Y, Z). At most ``per_class_case`` voxels of each class are kept per case (a random subset,
    ``seed``), so memory stays bounded on large grids. Edges are the class's decoded-level
    quantiles at i / bins; a range with fewer than ``min_count`` voxels takes the class's pooled
    residuals; a class never seen keeps zeros (no texture).
    """
    rng = np.random.default_rng(seed)
    levels: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    resid: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for decoded, target, labels in cases:
        decoded, target, labels = (np.asarray(a).reshape(-1) for a in (decoded, target, labels))
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], np.arange(num_classes + 1))
        for k in range(num_classes):
            idx = order[starts[k]:starts[k + 1]]
            if idx.size > per_class_case:
                idx = rng.choice(idx, per_class_case, replace=False)
            levels[k].append(decoded[idx])
            resid[k].append(target[idx] - decoded[idx])
    edges = np.zeros((num_classes, bins - 1), np.float64)
    table = np.zeros((num_classes, bins, quantiles), np.float64)
    probs = (np.arange(quantiles) + 0.5) / quantiles
    for k in range(num_classes):
        lev, res = np.concatenate([np.zeros(0), *levels[k]]), np.concatenate([np.zeros(0), *resid[k]])
        if lev.size == 0:
            continue
        edges[k] = np.quantile(lev, np.arange(1, bins) / bins)
        pooled = np.quantile(res, probs)
        which = np.searchsorted(edges[k], lev, side="left")
        for b in range(bins):
            sel = res[which == b]
            table[k, b] = np.quantile(sel, probs) if sel.size >= min_count else pooled
    return torch.from_numpy(edges).float(), torch.from_numpy(table).float()
