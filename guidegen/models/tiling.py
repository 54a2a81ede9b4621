"""Tiled, overlapping, blended encode/decode for volumes larger than memory allows (DESIGN §6).

The volume is cut into overlapping tiles on the image grid (tile starts and sizes are multiples
of the autoencoder's downsampling factor ``f``, so image and latent tiles align exactly); each
tile is encoded/decoded on its own and the outputs are blended (:func:`ramp_weight`): on every
side that borders another tile a tile's weight is ~0 near the cut and ramps linearly to 1 in the
middle of the overlap (not on the volume's own borders, where a tile sees exactly what the
untiled network sees). A tile's output is wrong only within one receptive-field radius of an
interior cut, so when the dead margin (3/8 of the overlap) covers that radius tiled equals
untiled up to float rounding; measured numbers are in ``tests/test_autoencoder.py`` and
``benchmarks/ae_memory.py``.

This is exact only because the autoencoder normalises per voxel (``ChannelNorm``): with
GroupNorm every tile would be normalised with its own statistics. MONAI's
``sliding_window_inference`` was not used because the decoder needs two inputs on grids of
different scale (latent and label map).

Memory: one tile's activations plus the blended output (and a weight volume) at full size.
Call under ``torch.no_grad()`` / ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product

import torch

from guidegen.errors import GuideGenError
from guidegen.models.autoencoder import AnatomyAwareAutoencoder, DiagonalGaussian


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise GuideGenError(f"{name} must be one integer or three (X, Y, Z), got {v!r}")
    return t  # type: ignore[return-value]


DEFAULT_OVERLAP = 48  # image voxels shared by neighbouring tiles (see tiled_decode)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start indices of tiles of length ``tile`` covering ``[0, size)`` with at least ``overlap`` shared."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # the last tile ends exactly at the volume's edge
    return starts


def ramp_weight(length: int, overlap: int, ramp_lo: bool, ramp_hi: bool, ramp_fraction: float = 0.25) -> torch.Tensor:
    """1D blending profile (length,) of a tile along one axis (positions in output voxels).

    On each flagged end (a side shared with another tile) the weight is ~0 over the outer
    ``(1 - ramp_fraction) / 2`` of the overlap, then rises linearly to 1 over the middle
    ``ramp_fraction`` of it. So every voxel is blended only from tiles in which it lies at least
    ``3/8 · overlap`` (default fraction) from a cut: tiled equals untiled exactly once that
    margin covers the receptive-field radius (:func:`receptive_radius`), while the short ramp
    still hides any residual seam. Strictly positive (1e-6 floor): a voxel that only one tile
    covers keeps that tile's value.
    """
    pos = torch.arange(length, dtype=torch.float32) + 0.5
    w = torch.ones(length)
    if overlap > 0:
        margin = overlap * (1.0 - ramp_fraction) / 2
        ramp = max(overlap * ramp_fraction, 1.0)
        if ramp_lo:
            w = torch.minimum(w, (pos - margin) / ramp)
        if ramp_hi:
            w = torch.minimum(w, (length - pos - margin) / ramp)
    return w.clamp(min=1e-6)


def receptive_radius(model: AnatomyAwareAutoencoder, part: str = "decoder") -> int:
    """Receptive-field radius in image voxels of the ``"decoder"`` (or ``"encoder"``), measured.

    Back-propagates from one central output voxel and reads how far the non-zero gradient
    reaches along X (all layers are isotropic). An overlap of ``8/3`` of this makes tiling exact.
    """
    f = model.downsample_factor
    n = 32  # latent voxels per axis: large enough for any sensible depth
    z = torch.zeros(1, model.latent_channels, n, 1, 1, requires_grad=True)
    lab = torch.zeros(1, n * f, f, f, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            if part == "decoder":
                out = model.decode(z + 0.1, lab if model.inject_labels else None)
                out[0, 0, n * f // 2, 0, 0].backward()
                touched = (z.grad.abs().sum((0, 1, 3, 4)) > 0).nonzero().flatten()
                radius = int(max(n // 2 - touched.min().item(), touched.max().item() - n // 2 + 1) * f)
                # The label map reaches no farther than z (it joins the same blocks, z one conv
                # earlier), except through the readout's depths, which look R voxels around.
                readout = model.decoder.readout
                return radius + (readout.max_depth if readout is not None else 0)
            if part == "encoder":
                x = torch.full((1, 1, n * f, f, f), 0.1, requires_grad=True)
                post = model.encode(x, lab if model.inject_labels else None)
                post.mean[0, 0, n // 2, 0, 0].backward()
                touched = (x.grad.abs().sum((0, 1, 3, 4)) > 0).nonzero().flatten()
                centre = n * f // 2
                return int(max(centre - touched.min().item(), touched.max().item() - centre))
    finally:
        model.train(was_training)
    raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")


def _check(model: AnatomyAwareAutoencoder, grid: tuple[int, ...], tile: tuple[int, ...],
           overlap: tuple[int, ...]) -> None:
    f = model.downsample_factor
    if any(n % f for n in grid):
        raise GuideGenError(f"volume grid {list(grid)} must be divisible by {f} on every axis")
    for name, vals in (("tile", tile), ("overlap", overlap)):
        if any(v < 0 or v % f for v in vals):
            raise GuideGenError(f"{name} {list(vals)} must be non-negative multiples of {f} (image voxels)")
    if any(t < f for t in tile):
        raise GuideGenError(f"tile {list(tile)} must be at least {f} voxels on every axis")
    if any(o >= t for o, t in zip(overlap, tile)):
        raise GuideGenError(f"overlap {list(overlap)} must be smaller than tile {list(tile)}")


def _tiled_apply(fn: Callable[[tuple[slice, ...], tuple[slice, ...]], torch.Tensor], grid: tuple[int, ...],
                 tile: tuple[int, ...], overlap: tuple[int, ...], f: int, out_scale: float,
                 out_prefix: tuple[int, int], out_device: torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """Run ``fn(image_slices, latent_slices)`` per tile and blend into (B, C, out grid).

    ``grid``/``tile``/``overlap`` are in image voxels; the output grid is ``grid * out_scale``
    (1 for decode, 1/f for encode).
    """
    tile = tuple(min(t, n) for t, n in zip(tile, grid))
    starts = [tile_starts(n, t, o) for n, t, o in zip(grid, tile, overlap)]
    out_grid = tuple(int(n * out_scale) for n in grid)
    out = torch.zeros(*out_prefix, *out_grid, device=out_device, dtype=out_dtype)
    wsum = torch.zeros(*out_grid, device=out_device, dtype=out_dtype)
    for corner in product(*starts):
        img = tuple(slice(s, s + t) for s, t in zip(corner, tile))
        lat = tuple(slice(s // f, (s + t) // f) for s, t in zip(corner, tile))
        dst = tuple(slice(int(s * out_scale), int((s + t) * out_scale)) for s, t in zip(corner, tile))
        y = fn(img, lat).to(out_device, out_dtype)
        profiles = [ramp_weight(int(t * out_scale), int(o * out_scale), s > 0, s + t < n)
                    for s, t, o, n in zip(corner, tile, overlap, grid)]
        w = (profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]).to(out_device, out_dtype)
        out[(..., *dst)] += y * w
        wsum[dst] += w
    return out / wsum


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def tiled_encode(model: AnatomyAwareAutoencoder, ct_norm: torch.Tensor, labels: torch.Tensor | None,
                 tile: int | Sequence[int] = 128, overlap: int | Sequence[int] = DEFAULT_OVERLAP,
                 device: torch.device | str | None = None) -> DiagonalGaussian:
    """Tiled :meth:`~AnatomyAwareAutoencoder.encode`: (B, 1, X, Y, Z) + (B, X, Y, Z) → posterior on (X/f, Y/f, Z/f).

    ``tile``/``overlap`` are in image voxels (multiples of ``f``). Tiles run on ``device``
    (default: the model's); the blended moments stay on ``ct_norm``'s device.
    """
    grid = tuple(ct_norm.shape[2:])
    tile3, overlap3 = _triple(tile, "tile"), _triple(overlap, "overlap")
    _check(model, grid, tile3, overlap3)
    dev = torch.device(device) if device is not None else _model_device(model)
    f = model.downsample_factor

    def encode_tile(img: tuple[slice, ...], lat: tuple[slice, ...]) -> torch.Tensor:
        lab = labels[(slice(None), *img)].to(dev) if labels is not None else None
        post = model.encode(ct_norm[(slice(None), slice(None), *img)].to(dev), lab)
        return torch.cat([post.mean, post.logvar], dim=1)

    moments = _tiled_apply(encode_tile, grid, tile3, overlap3, f, 1.0 / f,
                           (ct_norm.shape[0], 2 * model.latent_channels), ct_norm.device, ct_norm.dtype)
    return DiagonalGaussian(moments)


def tiled_decode(model: AnatomyAwareAutoencoder, z: torch.Tensor, labels: torch.Tensor | None,
                 tile: int | Sequence[int] = 128, overlap: int | Sequence[int] = DEFAULT_OVERLAP,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Tiled :meth:`~AnatomyAwareAutoencoder.decode`: (B, C, x, y, z) + (B, f·x, f·y, f·z) labels → (B, 1, f·x, f·y, f·z).

    ``tile``/``overlap`` are in image voxels (multiples of ``f``). With the default 48-voxel
    overlap the blended margin (18 voxels) about covers the default decoder's receptive radius
    (19), so tiled and untiled agree to well under 1 HU (exactly with ``overlap >= 8/3·radius``).
    """
    f = model.downsample_factor
    grid = tuple(n * f for n in z.shape[2:])
    tile3, overlap3 = _triple(tile, "tile"), _triple(overlap, "overlap")
    _check(model, grid, tile3, overlap3)
    if labels is not None and tuple(labels.shape[1:]) != grid:
        raise GuideGenError(f"label map shape {tuple(labels.shape)} does not match the decoded grid {list(grid)}")
    dev = torch.device(device) if device is not None else _model_device(model)

    def decode_tile(img: tuple[slice, ...], lat: tuple[slice, ...]) -> torch.Tensor:
        lab = labels[(slice(None), *img)].to(dev) if labels is not None else None
        return model.decode(z[(slice(None), slice(None), *lat)].to(dev), lab)

    return _tiled_apply(decode_tile, grid, tile3, overlap3, f, 1.0, (z.shape[0], 1), z.device, z.dtype)
