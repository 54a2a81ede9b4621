"""Stage 3 denoiser: a 3D diffusion UNet on AE latents, conditioned on the label map and on text.

Input of the UNet, on the latent grid (x, y, z) = (X, Y, Z) / f (f = 4 for the default AE)::

    z_t                         (B, latent_channels, x, y, z)   noisy scaled latent
    label fractions  [optional] (B, K, x, y, z)   f×f×f average-pooled one-hot: the exact share
                                                  of every class in each latent voxel
    label features   [optional] (B, E, x, y, z)   a small trainable conv encoder from the
                                                  full-resolution label map down ×f (strided convs)

concatenated on channels (the paper's "resampled mask concatenated to z_t"); the text enters
as context tokens through cross-attention (MONAI's ``DiffusionModelUNet`` spatial transformers).

Why two label branches, not nearest downsampling: a tumour or a thin organ smaller than f³
voxels vanishes under nearest resampling to the latent grid. The class fractions keep every
class's presence exactly, with no parameters, and give the network the anatomy from the first
step (useful on a short CPU budget). They cannot say *where* inside a latent voxel a boundary
runs; the learned encoder (the paper code's trainable mask encoder) sees the full-resolution map
and can. Either branch can be switched off (``ldm.label_fractions``, ``ldm.label_encoder_channels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from torch import Tensor, nn

from guidegen.config import unet_levels_problem
from guidegen.errors import GuideGenError
from guidegen.models.conditioned import ConditionedDenoiser
from guidegen.models.tcss_unet import _norm_groups
from guidegen.models.unet_checkpoint import check_context, unet_forward


class LabelToLatent(nn.Module):
    """Label map (B, X, Y, Z) long → (B, K·[fractions] + E, X/f, Y/f, Z/f) float on the latent grid.

    Args:
        num_classes: K.
        factor: f, a power of two (the AE's downsampling factor).
        encoder_channels: E, output channels of the trainable conv encoder (0: no encoder).
        fractions: include the K class-fraction channels (values in [0, 1], summing to 1).
        embed_dim: width of the per-voxel label embedding the encoder starts from.
    """

    def __init__(self, num_classes: int, factor: int = 4, encoder_channels: int = 8, fractions: bool = True,
                 embed_dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise GuideGenError(f"the latent downsampling factor must be a power of two, got {factor}")
        if not fractions and encoder_channels == 0:
            raise GuideGenError("ldm: the label map needs a path to the latent grid "
                                "(label_fractions true or label_encoder_channels > 0)")
        self.num_classes, self.factor, self.fractions = num_classes, factor, fractions
        self.out_channels = (num_classes if fractions else 0) + encoder_channels
        self.encoder: nn.Module | None = None
        if encoder_channels:
            # Embedding == 1×1 conv on the one-hot map, without materialising K full-res channels.
            layers: list[nn.Module] = []
            ch = embed_dim
            for i in range(factor.bit_length() - 1):  # log2(f) stride-2 convs
                out = hidden * 2**i
                layers += [nn.Conv3d(ch, out, 3, stride=2, padding=1), nn.SiLU()]
                ch = out
            layers.append(nn.Conv3d(ch, encoder_channels, 1))
            self.embed = nn.Embedding(num_classes, embed_dim)
            self.encoder = nn.Sequential(*layers)

    def forward(self, labels: Tensor) -> Tensor:
        parts = []
        if self.fractions:
            onehot = F.one_hot(labels.long(), self.num_classes).movedim(-1, 1).float()
            parts.append(F.avg_pool3d(onehot, self.factor))
        if self.encoder is not None:
            e = self.embed(labels.long()).movedim(-1, 1).contiguous()  # (B, E0, X, Y, Z)
            parts.append(self.encoder(e))
        return torch.cat(parts, dim=1)


class LatentUNet(nn.Module):
    """ε/v-predicting denoiser on latents: ``forward(z_t, t, labels, context) -> (B, C, x, y, z)``.

    Args:
        latent_channels: C of the AE latent.
        num_classes: K of the label set.
        context_dim: width D of the context tokens (B, Q, D).
        factor: AE downsampling factor f (label grid = f × latent grid).
        channels / attention_levels / num_res_blocks / num_head_channels: the MONAI UNet's.
        label_encoder_channels / label_fractions: see :class:`LabelToLatent`.
        gradient_checkpointing: recompute UNet blocks in backward (less memory).
    """

    def __init__(self, latent_channels: int, num_classes: int, context_dim: int, factor: int = 4,
                 channels: tuple[int, ...] = (64, 128, 128), attention_levels: tuple[bool, ...] = (False, True, True),
                 num_res_blocks: int = 1, num_head_channels: int = 32, label_encoder_channels: int = 8,
                 label_fractions: bool = True, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        channels, attention_levels = tuple(channels), tuple(attention_levels)
        problem = unet_levels_problem(channels, attention_levels, num_head_channels)
        if problem:
            raise GuideGenError(f"ldm.{problem}")
        self.latent_channels, self.context_dim, self.factor = latent_channels, context_dim, factor
        self.gradient_checkpointing = gradient_checkpointing
        self.latent_multiple = 2 ** (len(channels) - 1)  # every latent axis must divide by this
        self.label_encoder = LabelToLatent(num_classes, factor, label_encoder_channels, label_fractions)
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=latent_channels + self.label_encoder.out_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=_norm_groups(channels),
            num_head_channels=num_head_channels,
            with_conditioning=True,
            cross_attention_dim=context_dim,
            # torch's fused scaled_dot_product_attention (MONAI calls it flash attention): the same
            # math as the einsum-softmax-einsum path without the (L, L) matrix in memory; the shipped
            # TCSS samples ~20 % faster on 2 CPU threads (benchmarks/attention.py). Weights unchanged.
            use_flash_attention=True,
        )

    @classmethod
    def from_config(cls, cfg, num_classes: int, context_dim: int, latent_channels: int, factor: int) -> "LatentUNet":
        """Build from the ``ldm`` config section; latent channels and factor come from the AE."""
        return cls(latent_channels, num_classes, context_dim, factor, channels=cfg.channels,
                   attention_levels=cfg.attention_levels, num_res_blocks=cfg.num_res_blocks,
                   num_head_channels=cfg.num_head_channels, label_encoder_channels=cfg.label_encoder_channels,
                   label_fractions=cfg.label_fractions, gradient_checkpointing=cfg.train.gradient_checkpointing)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, z_t: Tensor, t: Tensor, labels: Tensor, context: Tensor) -> Tensor:
        """Predict ε or v.

        Args:
            z_t: (B, C, x, y, z) noisy scaled latent.
            t: (B,) long timesteps in [0, T).
            labels: (B, f·x, f·y, f·z) long label ids on the CT grid.
            context: (B, Q, D) context tokens (the learned null context for CFG's unconditional pass),
                or layer-wise (B, levels, Q, D).
        """
        b, c, *lat = z_t.shape
        if c != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels} latent channels, got {c}")
        if list(labels.shape) != [b, *(n * self.factor for n in lat)]:
            raise GuideGenError(f"label map shape {tuple(labels.shape)} does not match the latent grid {lat} "
                                f"(expected (B, {', '.join(str(n * self.factor) for n in lat)}))")
        if any(n % self.latent_multiple for n in lat):
            raise GuideGenError(f"latent grid {lat} must be divisible by {self.latent_multiple} on every axis for "
                                f"this LDM UNet ({len(self.unet.block_out_channels)} levels): data.grid must divide "
                                f"by {self.latent_multiple * self.factor}")
        check_context(context, b, self.context_dim, len(self.unet.block_out_channels))
        x = torch.cat([z_t, self.label_encoder(labels).to(z_t.dtype)], dim=1)
        t = t.to(device=x.device)
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return unet_forward(self.unet, x, t, context, gradient_checkpointing=ckpt)


class LatentDenoiser(ConditionedDenoiser):
    """Knowledge injection + :class:`LatentUNet`: one module (one state dict, EMA, DDP wrapper).

    ``forward(z_t, t, labels, tokens, mask, findings_vec, drop)``; rows with ``drop`` True get
    the learned null context (classifier-free guidance training).
    """

    net: LatentUNet

    def forward(self, z_t: Tensor, t: Tensor, labels: Tensor, tokens: Tensor, mask: Tensor,  # type: ignore[override]
                findings_vec: Tensor, drop: Tensor | None = None) -> Tensor:
        return self.net(z_t, t, labels, self.context(tokens, mask, findings_vec, drop))
