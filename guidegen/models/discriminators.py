"""Discriminators of the stage-2 autoencoder GAN loss (DESIGN §6, METHOD §4).

Two PatchGANs (MONAI's :class:`~monai.networks.nets.PatchDiscriminator` with GroupNorm: the
batch is often 1, and unlike InstanceNorm it also works where a small input leaves a 1×1 map): a 2D *slice* discriminator that judges random axial and coronal slices
(the paper's frame discriminator D_f, sharp in-plane texture) and a 3D *patch* discriminator on
the whole volume (D_v, through-plane consistency).

Both see the CT through fixed clinical windows stacked as channels (:func:`multi_window`) rather
than the single wide-range channel: in the [-1, 1] normalisation of -1024..2048 HU the whole
soft-tissue range spans ~0.3, so texture there would be nearly invisible to a discriminator
reading the raw normalised values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import PatchDiscriminator

_GROUP_NORM = ("GROUP", {"num_groups": 8})

# (center, width) in HU of the windows stacked as discriminator input channels.
DISC_WINDOWS_HU: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1500.0))


def multi_window(ct_norm: torch.Tensor, hu_range: tuple[float, float],
                 windows: tuple[tuple[float, float], ...] = DISC_WINDOWS_HU) -> torch.Tensor:
    """(B, 1, ...) normalised CT in [-1, 1] → (B, len(windows), ...) windowed copies in [-1, 1]."""
    lo, hi = hu_range
    scale = 2.0 / (hi - lo)
    chans = []
    for center, width in windows:
        # The window's edges expressed in normalised units (not clamped: a window may extend
        # beyond hu_range).
        w_lo = (center - width / 2 - lo) * scale - 1.0
        w_width = width * scale
        chans.append(((ct_norm - w_lo) / w_width).clamp(0.0, 1.0) * 2.0 - 1.0)
    return torch.cat(chans, dim=1)


def random_slices(volume: torch.Tensor, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Random axial (fixed Z) and coronal (fixed Y) slices of a (B, C, X, Y, Z) volume.

    Returns ``n`` tensors: axial ones (B, C, X, Y), coronal ones (B, C, X, Z); the plane of each
    slice is drawn at random, its index uniformly. The same generator state gives the same
    slices, so calling it with a cloned generator state picks matching real/fake slices.
    """
    out = []
    for _ in range(n):
        axial = bool(torch.randint(0, 2, (1,), generator=generator).item())
        dim = 4 if axial else 3
        idx = int(torch.randint(0, volume.shape[dim], (1,), generator=generator).item())
        out.append(volume.select(dim, idx))
    return out


class SliceDiscriminator(nn.Module):
    """2D PatchGAN over slices: (B, C, H, W) → logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = len(DISC_WINDOWS_HU), channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        self.net = PatchDiscriminator(spatial_dims=2, channels=channels, in_channels=in_channels,
                                      num_layers_d=num_layers, norm=_GROUP_NORM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]  # MONAI returns every layer's features; the last are the logits


class VolumeDiscriminator(nn.Module):
    """3D PatchGAN over the volume: (B, C, X, Y, Z) → logits (B, 1, x, y, z)."""

    def __init__(self, in_channels: int = len(DISC_WINDOWS_HU), channels: int = 16, num_layers: int = 3) -> None:
        super().__init__()
        self.net = PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=in_channels,
                                      num_layers_d=num_layers, norm=_GROUP_NORM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]
