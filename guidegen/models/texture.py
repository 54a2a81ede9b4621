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
(:func:`fit_texture_tables`).

Grain: the draws are not independent between neighbours. Residuals of real CT are spatially
correlated (noise texture, partial volume), so ``sample`` takes each voxel's probability ``u``
from a Gaussian copula: a unit-variance normal field filtered along each axis so that its lag-1
correlation is the one measured on the training residuals after Gaussianising them through
these same tables (:func:`measure_grain`), then ``u = Φ(z)``. Every voxel's ``u`` is still
uniform, so each table's marginal is drawn unchanged; only the grain between neighbours is new.
A texture whose ``grain`` is zero draws white noise exactly as before (bitwise).

Shapes and value ranges (G = K·D groups; with D = 1 a group is a class):
    decoded  (B, 1, X, Y, Z) float, the decoder's output in normalised units (≈ [-1, 1])
    labels   (B, X, Y, Z) long, label-set ids in [0, K)
    depth    (B, X, Y, Z) long in [0, D), the voxel's depth inside its structure, clipped
    edges    (G, bins - 1) per-group bin edges of the decoded level, normalised units
    table    (G, bins, quantiles) residual quantiles at levels (j + 0.5) / quantiles, normalised units
    grain    (3,) lag-1 correlation along x, y, z of the Gaussianised residuals, in [0, MAX_GRAIN]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

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
        self.register_buffer("grain", torch.zeros(3))

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
        u = self.uniform_field(tuple(groups.shape), generator, groups.device)
        return self.quantile(groups, self.bins_of(decoded, groups), u).unsqueeze(1).to(decoded.dtype)

    def uniform_field(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, X, Y, Z) probabilities, each uniform on [0, 1], neighbours correlated as ``grain`` says."""
        if not bool(self.grain.any()):  # white: the draws of a texture without grain, bitwise
            return torch.rand(shape, generator=generator, device=device)
        kernels = [grain_kernel(float(rho)) for rho in self.grain]
        z = correlated_normal(shape, kernels, generator, device)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))

    def cdf(self, groups: torch.Tensor, bins: torch.Tensor, residual: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Inverse of :meth:`quantile`: the probability in (0, 1) of ``residual`` in each voxel's table.

        Linear between the table's levels; a residual on a run of equal entries gets the run's
        middle; beyond the first and last entries it is clamped to 0.5 / Q and 1 - 0.5 / Q.
        Voxels are taken ``chunk`` at a time: each needs its table row (Q values) gathered, which
        for a whole 256³ volume would be gigabytes.
        """
        q = self.table.shape[-1]
        flat_rows = self.table.reshape(-1, q)
        row_ids = (groups * self.table.shape[1] + bins).reshape(-1)
        res = residual.reshape(-1).to(flat_rows.dtype)
        out = torch.empty_like(res)
        for start in range(0, res.numel(), chunk):
            rows = flat_rows[row_ids[start:start + chunk]]
            r = res[start:start + chunk, None]
            left = torch.searchsorted(rows, r, side="left")[:, 0]
            right = torch.searchsorted(rows, r, side="right")[:, 0]
            below = rows.gather(1, (left - 1).clamp(0, q - 1)[:, None])[:, 0]
            above = rows.gather(1, left.clamp(0, q - 1)[:, None])[:, 0]
            between = (left - 1) + (r[:, 0] - below) / (above - below).clamp_min(1e-12)
            pos = torch.where(right > left, (left + right - 1) / 2.0, between).clamp(0, q - 1)
            out[start:start + chunk] = (pos + 0.5) / q
        return out.reshape(groups.shape)


# Grain is capped: a lag-1 correlation of 0.95 already takes a kernel 19 voxels wide (sigma ~2.2),
# and more means the grid oversamples the texture by far (resample the data coarser instead).
MAX_GRAIN = 0.95


def kernel_lag1(kernel: torch.Tensor) -> float:
    """Lag-1 correlation of white noise filtered by the 1D ``kernel``: Σ w_i w_(i+1) / Σ w_i²."""
    w = kernel.double()
    return float((w[:-1] * w[1:]).sum() / (w * w).sum()) if w.numel() > 1 else 0.0


@functools.lru_cache(maxsize=64)
def grain_kernel(rho: float) -> torch.Tensor:
    """A symmetric 1D Gaussian kernel (unit sum of squares, so filtered unit-variance white noise
    keeps unit variance) whose filtered white noise has lag-1 correlation ``rho``.

    ``rho`` is clipped to [0, MAX_GRAIN] (a decoder's residual correlation below zero is ringing,
    not texture); 0 gives the identity kernel ``[1]``. The width σ is found by bisection: the
    lag-1 correlation rises monotonically from 0 (σ → 0) towards 1. Cached: every draw of a
    texture asks for the same three kernels (callers must not modify the returned tensor).
    """
    rho = min(max(rho, 0.0), MAX_GRAIN)
    if rho <= 1e-6:
        return torch.ones(1)

    def kernel(sigma: float) -> torch.Tensor:
        radius = max(1, math.ceil(4 * sigma))
        i = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * (i / sigma) ** 2)
        return w / w.square().sum().sqrt()

    lo, hi = 1e-3, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kernel_lag1(kernel(mid)) < rho else (lo, mid)
    return kernel(0.5 * (lo + hi)).float()


def correlated_normal(shape: tuple[int, ...], kernels: Sequence[torch.Tensor], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """A unit-variance normal field of ``shape`` (B, X, Y, Z), filtered along x, y, z by ``kernels``.

    White noise is drawn with each kernel's radius of margin on both sides of its axis and the
    filter keeps only the fully covered voxels, so the variance is 1 up to the edges.
    """
    radii = [(k.numel() - 1) // 2 for k in kernels]
    padded = (shape[0], *(n + 2 * r for n, r in zip(shape[1:], radii)))
    z = torch.randn(padded, generator=generator, device=device)
    for axis, (k, r) in enumerate(zip(kernels, radii), start=1):
        if r == 0:
            continue
        moved = z.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        out = torch.nn.functional.conv1d(flat, k.to(z)[None, None])
        z = out.reshape(*moved.shape[:-1], out.shape[-1]).movedim(-1, axis)
    return z.contiguous()


@torch.no_grad()
def measure_grain(texture: VoxelTexture, cases: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                  ignore: Sequence[int] = (0,)) -> torch.Tensor:
    """(3,) lag-1 correlation along x, y, z of the residuals of ``cases``, Gaussianised through ``texture``.

    ``cases`` as for :func:`fit_texture_tables`: (decoded, target, labels, depth), (X, Y, Z) each,
    normalised units. Each voxel's residual ``target − decoded`` is mapped to z = Φ⁻¹(u), u its
    probability in its own table (:meth:`VoxelTexture.cdf`), which takes out what the class, the
    depth and the decoded level already explain; the correlation of z is then pooled over pairs
    of neighbours of the same class, classes in ``ignore`` (the air around the body) left out.
    This is the correlation the copula in :meth:`VoxelTexture.sample` reproduces.
    """
    sums = torch.zeros(3, 6, dtype=torch.float64)  # per axis: n, Σa, Σb, Σa², Σb², Σab
    normal = torch.distributions.Normal(0.0, 1.0)
    for decoded, target, labels, depth in cases:
        dec = torch.as_tensor(np.asarray(decoded, np.float32))[None, None]
        lab = torch.as_tensor(np.asarray(labels).astype(np.int64))[None]
        groups = texture.groups_of(lab, torch.as_tensor(np.asarray(depth).astype(np.int64))[None])
        resid = torch.as_tensor(np.asarray(target, np.float32))[None] - dec[:, 0]
        z = normal.icdf(texture.cdf(groups, texture.bins_of(dec, groups), resid).double())[0]
        keep = torch.ones_like(lab[0], dtype=torch.bool)
        for k in ignore:
            keep &= lab[0] != k
        for axis in range(3):
            n = z.shape[axis]
            a, b = z.narrow(axis, 0, n - 1), z.narrow(axis, 1, n - 1)
            pair = keep.narrow(axis, 0, n - 1) & (lab[0].narrow(axis, 0, n - 1) == lab[0].narrow(axis, 1, n - 1))
            a, b = a[pair], b[pair]
            sums[axis] += torch.stack([torch.tensor(float(a.numel()), dtype=torch.float64), a.sum(), b.sum(),
                                       a.square().sum(), b.square().sum(), (a * b).sum()])
    n, sa, sb, saa, sbb, sab = sums.unbind(1)
    cov = sab / n.clamp_min(1) - sa * sb / n.clamp_min(1) ** 2
    var_a = saa / n.clamp_min(1) - (sa / n.clamp_min(1)) ** 2
    var_b = sbb / n.clamp_min(1) - (sb / n.clamp_min(1)) ** 2
    rho = cov / (var_a * var_b).sqrt().clamp_min(1e-12)
    return torch.where(n > 1, rho, torch.zeros_like(rho)).float()


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
