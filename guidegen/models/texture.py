"""The decoder's voxel texture: p(target − decoded | class, decoded level) as quantile tables.

Why: the autoencoder's decoder is deterministic, and a voxel's HU holds detail that the ×4
coarser latent cannot carry. At the demo grid (~8 mm voxels) a rib voxel is cortex (~950 HU) or
marrow (~300 HU) by where the grid point falls inside the rib; the decoder can give the class
one value there, and the class-mean loss term keeps it at the mean (~710 HU), so the ribs'
*median*, which real CT has at the cortex, is lost (all 20 reconstructions of the shipped AE
below the real range); the heart's myocardium and contrast-filled chambers blur the same way. A
loss on the output cannot fix that: per voxel, a deterministic output is either the mean or the
median of what the latent leaves open, not both (docs/measurements.md).

This model draws what the latent leaves open. Voxels are grouped by class k and, with
``depths`` D > 1, by how deep they lie inside their structure (d = 0 on its border, … D - 1 and
deeper: :func:`~guidegen.models.autoencoder.structure_depth`), group g = k·D + d. For each group
the decoded level (normalised units) is cut into ``bins`` ranges at the quantiles of its training
values; for each (group, range) the residuals ``target − decoded`` of training reconstructions are
kept as ``quantiles`` evenly spaced quantiles. Sampling draws a residual for every voxel from the
table of its group and decoded level by inverting that empirical CDF (linear between the table's
levels). Why depth: a border voxel's residual mixes its neighbour's tissue (the heart's wall
against the contrast-filled chambers, a thin bowel loop against fat), an interior one's does not,
and the decoded level alone does not tell them apart (pilot on 20 reconstructions of the shipped
AE: heart medians outside the real range 4 → 1 of 20 with D = 3, docs/measurements.md). The
tables are measured, not trained: one pass over training cases at export
(:func:`fit_texture_tables`). Draws are independent per voxel (white texture); the level, the
class and the depth carry the dependence that matters for the HU statistics.

Shapes and value ranges (G = K·D groups; with D = 1 a group is a class):
    decoded  (B, 1, X, Y, Z) float, the decoder's output in normalised units (≈ [-1, 1])
    labels   (B, X, Y, Z) long, label-set ids in [0, K)
    depth    (B, X, Y, Z) long in [0, D), the voxel's depth inside its structure, clipped
    edges    (G, bins - 1) per-group bin edges of the decoded level, normalised units
    table    (G, bins, quantiles) residual quantiles at levels (j + 0.5) / quantiles, normalised units
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
        bins: ranges of the decoded level per group (1 = the group alone decides).
        quantiles: Q, residual quantiles kept per (group, range).
        depths: D, depth classes inside a structure (1 = by class only; the tables then have
            the layout of a texture without depth, so such checkpoints load unchanged).
    """

    def __init__(self, num_classes: int, bins: int, quantiles: int, depths: int = 1) -> None:
        super().__init__()
        if bins < 1 or quantiles < 2 or depths < 1:
            raise ValueError(f"VoxelTexture needs bins >= 1, quantiles >= 2 and depths >= 1, got {bins}, {quantiles} and {depths}")
        self.depths = depths
        self.register_buffer("edges", torch.zeros(num_classes * depths, bins - 1))
        self.register_buffer("table", torch.zeros(num_classes * depths, bins, quantiles))

    @property
    def fitted(self) -> bool:
        """Whether the tables were measured (an unfitted table is all zeros)."""
        return bool(self.table.abs().sum() > 0)

    def groups_of(self, labels: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """(B, X, Y, Z) ids and depths → (B, X, Y, Z) long group index ``label · D + min(depth, D - 1)``."""
        return labels.long() * self.depths + depth.long().clamp(0, self.depths - 1)

    def bins_of(self, decoded: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) decoded + (B, X, Y, Z) groups → (B, X, Y, Z) long range index in [0, bins).

        The index is the number of the group's edges strictly below the voxel's level (numpy's
        ``searchsorted`` with side ``"left"``).
        """
        level = decoded[:, 0]
        bins = torch.zeros_like(groups)
        for edge in self.edges.to(decoded.dtype).T:  # one volume-sized gather per edge, not (…, bins - 1) at once
            bins += level > edge[groups]
        return bins

    def quantile(self, groups: torch.Tensor, bins: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The residual at probability ``u`` in [0, 1] of each voxel's table, same shape as ``groups``.

        Table entry j sits at level (j + 0.5) / Q; in between the CDF is linear, outside the first
        and last entries it is clamped (the tails stop at the extreme quantiles kept).
        """
        q = self.table.shape[-1]
        pos = (u * q - 0.5).clamp(0, q - 1)
        lo = pos.floor().long().clamp(max=q - 2)
        frac = (pos - lo).to(self.table.dtype)
        row = (groups * self.table.shape[1] + bins) * q
        flat = self.table.reshape(-1)
        return flat[row + lo] * (1 - frac) + flat[row + lo + 1] * frac

    def sample(self, decoded: torch.Tensor, labels: torch.Tensor, depth: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One residual draw per voxel: (B, 1, X, Y, Z) in normalised units, to add to ``decoded``.

        ``depth`` (B, X, Y, Z): each voxel's depth inside its structure (zeros when D = 1).
        """
        groups = self.groups_of(labels, depth)
        u = torch.rand(groups.shape, generator=generator, device=groups.device)
        return self.quantile(groups, self.bins_of(decoded, groups), u).unsqueeze(1).to(decoded.dtype)


def fit_texture_tables(cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
                       bins: int, quantiles: int, depths: int = 1, per_group_case: int = 20_000, min_count: int = 64,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Measure (edges (G, bins - 1), table (G, bins, Q)), G = K·D, from ``cases`` of (decoded, target, labels, depth).

    Each case gives its decoded and target volumes (X, Y, Z) in normalised units, its ids and its
    voxels' depths inside their structures (X, Y, Z; clipped at D - 1). At most ``per_group_case``
    voxels of each group are kept per case (a random subset, ``seed``), so memory stays bounded on
    large grids. Edges are the group's decoded-level quantiles at i / bins; a range with fewer
    than ``min_count`` voxels takes the group's pooled residuals. A depth d ≥ 1 of a class with
    fewer than ``min_count`` voxels takes the tables of depth d - 1 (a structure seen thin in
    training and drawn thick is textured as its deepest voxels seen); a class never seen keeps
    zeros (no texture).
    """
    rng = np.random.default_rng(seed)
    n_groups = num_classes * depths
    levels: list[list[np.ndarray]] = [[] for _ in range(n_groups)]
    resid: list[list[np.ndarray]] = [[] for _ in range(n_groups)]
    for decoded, target, labels, depth in cases:
        decoded, target, labels, depth = (np.asarray(a).reshape(-1) for a in (decoded, target, labels, depth))
        groups = labels.astype(np.int64) * depths + np.clip(depth, 0, depths - 1)
        order = np.argsort(groups, kind="stable")
        starts = np.searchsorted(groups[order], np.arange(n_groups + 1))
        for g in range(n_groups):
            idx = order[starts[g]:starts[g + 1]]
            if idx.size > per_group_case:
                idx = rng.choice(idx, per_group_case, replace=False)
            levels[g].append(decoded[idx])
            resid[g].append(target[idx] - decoded[idx])
    edges = np.zeros((n_groups, bins - 1), np.float64)
    table = np.zeros((n_groups, bins, quantiles), np.float64)
    probs = (np.arange(quantiles) + 0.5) / quantiles
    for g in range(n_groups):
        lev, res = np.concatenate([np.zeros(0), *levels[g]]), np.concatenate([np.zeros(0), *resid[g]])
        if g % depths and lev.size < min_count:  # too few voxels this deep: as the depth above
            edges[g], table[g] = edges[g - 1], table[g - 1]
            continue
        if lev.size == 0:
            continue
        edges[g] = np.quantile(lev, np.arange(1, bins) / bins)
        pooled = np.quantile(res, probs)
        which = np.searchsorted(edges[g], lev, side="left")
        for b in range(bins):
            sel = res[which == b]
            table[g, b] = np.quantile(sel, probs) if sel.size >= min_count else pooled
    return torch.from_numpy(edges).float(), torch.from_numpy(table).float()
