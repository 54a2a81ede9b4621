"""Stage 2: the anatomy-aware HDR KL autoencoder (DESIGN §6, METHOD §4).

A 3D convolutional KL autoencoder that compresses a CT volume by ``2**(levels-1)`` per axis
(×4 with the default three levels) into a diagonal-Gaussian latent with ``latent_channels``
channels. The label map is injected at every encoder and decoder level (the paper's pyramid):
it is embedded once at full resolution, area-downsampled to each level's grid and concatenated
to the input of the first convolution of every residual block.

Shapes and value ranges:
    ct_norm  (B, 1, X, Y, Z) float, CT mapped from HU to [-1, 1] by :func:`hu_to_norm`
    labels   (B, X, Y, Z) long, label-set ids in [0, num_classes)
    z        (B, latent_channels, X/f, Y/f, Z/f) float, f = ``model.downsample_factor``

Two choices differ from the paper and its code, on purpose:

* Normalisation is a per-voxel channel LayerNorm (:class:`ChannelNorm`, as DC-AE / ConvNeXt
  use), not GroupNorm. GroupNorm's statistics span the whole volume, so a tile would be
  normalised with other statistics than the full volume and tiled decoding would not equal
  untiled decoding. A per-voxel norm is exactly local: tiling differs only where a tile border
  cuts the receptive field, which the blended overlap removes. ``norm="group"`` is kept for
  comparison (see ``benchmarks/ae_memory.py``); do not tile such a model.
* Labels are resampled to the coarser levels by *area* averaging of their embedding (which
  equals embedding the per-block class fractions), not nearest neighbour: a structure thinner
  than the downsampling step (a small tumour, a rib) still leaves a trace at every level,
  which is the point of the pyramid. The full-resolution level sees the exact labels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from guidegen.errors import GuideGenError
from guidegen.models.texture import VoxelTexture

if TYPE_CHECKING:
    from guidegen.config import AutoencoderConfig

ArrayT = TypeVar("ArrayT")  # torch.Tensor or numpy.ndarray

DEFAULT_HU_RANGE: tuple[float, float] = (-1024.0, 2048.0)


# ------------------------------------------------------------------------ HU normalisation
def hu_to_norm(hu: ArrayT, hu_range: tuple[float, float] = DEFAULT_HU_RANGE) -> ArrayT:
    """Map HU linearly to [-1, 1]: ``hu_range[0] → -1``, ``hu_range[1] → +1``, clamped outside.

    Works on torch tensors and numpy arrays (anything with ``.clip``). The default range is
    wide (-1024..2048 HU) so that air, lung, soft tissue and cortical bone all keep their
    contrast: the *HDR* part of the method is to train on random windows of this range rather
    than on one clipped window.
    """
    lo, hi = float(hu_range[0]), float(hu_range[1])
    return (hu.clip(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0


def norm_to_hu(x: ArrayT, hu_range: tuple[float, float] = DEFAULT_HU_RANGE) -> ArrayT:
    """Inverse of :func:`hu_to_norm` (input clamped to [-1, 1] first, so the output is in ``hu_range``)."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    return (x.clip(-1.0, 1.0) + 1.0) * ((hi - lo) / 2.0) + lo


# ------------------------------------------------------------------------- latent posterior
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x) with ``mean`` and ``logvar`` of shape (B, C, x, y, z)."""

    def __init__(self, moments: torch.Tensor) -> None:
        """``moments``: (B, 2C, x, y, z), mean in the first C channels, log-variance in the rest."""
        self.mean, logvar = moments.chunk(2, dim=1)
        # The clamp keeps exp() finite early in training; std ∈ [e^-15, e^10].
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample ``mean + std * eps`` (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) summed over latent channels and voxels: shape (B,), 0 for q = N(0, I)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


# ------------------------------------------------------------------------------ layers
class ChannelNorm(nn.Module):
    """LayerNorm over channels at each voxel of a (B, C, X, Y, Z) tensor (no spatial statistics)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.layer_norm on a channels-last view: ~3× faster on CPU.
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


NormKind = Literal["channel", "group"]


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "channel":
        return ChannelNorm(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block; label features (if any) join the first convolution's input.

    ``x`` (B, C_in, ...) and ``lab`` (B, E, ...) on the same grid → (B, C_out, ...).
    """

    def __init__(self, in_ch: int, out_ch: int, label_dim: int, norm: NormKind) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, in_ch)
        self.conv1 = nn.Conv3d(in_ch + label_dim, out_ch, 3, padding=1)
        self.norm2 = make_norm(norm, out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.label_dim = label_dim

    def forward(self, x: torch.Tensor, lab: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.label_dim:
            h = torch.cat([h, lab], dim=1)
        h = self.conv1(h)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class LabelPyramid(nn.Module):
    """Label map (B, X, Y, Z) long → list of (B, E, X/2^l, Y/2^l, Z/2^l) embeddings, l = 0..levels-1."""

    def __init__(self, num_classes: int, embed_dim: int, levels: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.levels = levels

    def forward(self, labels: torch.Tensor) -> list[torch.Tensor]:
        e = self.embed(labels).movedim(-1, 1).contiguous()  # (B, E, X, Y, Z)
        pyramid = [e]
        for _ in range(self.levels - 1):
            e = F.avg_pool3d(e, 2)  # area resampling: embedding of the class fractions
            pyramid.append(e)
        return pyramid


class Encoder(nn.Module):
    """ct_norm (B, 1, X, Y, Z) + label pyramid → moments (B, 2·latent, X/f, Y/f, Z/f)."""

    def __init__(self, channels: tuple[int, ...], latent_channels: int, num_res_blocks: int,
                 label_dim: int, norm: NormKind) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(1, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = channels[0]
        for level, ch in enumerate(channels):
            self.blocks.append(nn.ModuleList(ResBlock(prev if i == 0 else ch, ch, label_dim, norm)
                                             for i in range(num_res_blocks)))
            prev = ch
            if level < len(channels) - 1:
                self.downs.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
        self.norm_out = make_norm(norm, prev)
        self.conv_out = nn.Conv3d(prev, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, pyramid: list[torch.Tensor | None]) -> torch.Tensor:
        h = self.conv_in(x)
        for level, blocks in enumerate(self.blocks):
            for block in blocks:
                h = block(h, pyramid[level])
            if level < len(self.downs):
                h = self.downs[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))


def structure_depth(labels: torch.Tensor, max_depth: int) -> torch.Tensor:
    """How deep each voxel lies inside its own structure: (B, X, Y, Z) ids → (B, X, Y, Z) long in [0, R].

    Depth d means the (2d+1)³ cube around the voxel holds only its label and the next larger
    cube does not (a Chebyshev erosion count, clipped at ``max_depth`` R): 0 on a structure's
    border, diagonal neighbours included. The volume's own border is not a structure border.
    Local (reach R voxels), so tiles that overlap by more than that agree.
    """
    hi = labels.unsqueeze(1).float()
    lo = hi
    depth = torch.zeros_like(hi)
    for _ in range(max_depth):
        # max and min of the ids over a growing cube are equal exactly when the cube is uniform
        hi = F.max_pool3d(hi, 3, stride=1, padding=1)
        lo = -F.max_pool3d(-lo, 3, stride=1, padding=1)
        depth += (hi == lo).float()
    return depth.squeeze(1).long()


class LabelReadout(nn.Module):
    """Per-class 1×1 readout: features (B, C, X, Y, Z) + labels (B, X, Y, Z) → (B, 1, X, Y, Z).

    Voxel v of class k gets ``w_k · h(v) + b_k``: one linear map per class, applied where the
    class is. The decoder's features are smooth across a class border (they come from a coarse
    latent through 3×3 convolutions), so a single output projection blurs the border's contrast
    into its voxels — a 10 mm lesion beside a rib at ~7 mm voxels is all border (demo AE before
    the readout, three lesions: border voxels 34-71 HU off on average, interior ones 8-27 HU). With a readout per class the
    features can carry one smooth field per tissue and the label picks which one a voxel shows,
    so borders are as sharp as the label map. Zero-initialised: adding it to a trained decoder
    leaves the output unchanged until it is fine-tuned. Exactly local, so tiling is unaffected.

    With ``max_depth`` R > 0 a voxel at depth d ≥ 1 inside its structure (:func:`structure_depth`)
    adds ``u_{k,d} · h(v) + c_{k,d}``: one more linear map per class and depth, also
    zero-initialised. Why: the phantom's layered structures are layered by depth — contrast-filled
    heart chambers inside the myocardium (in a contrast-phase case the shipped decoder drew the
    heart's border voxels 25 HU too bright and the layers inside ~30 HU too dark), the kidney's
    medulla inside its cortex, vertebral marrow inside cortex — while the label map gives one id
    for the whole structure. The same features read by a map per depth give a sharp step where
    the layers meet; how bright each layer is (the contrast phase) still comes from the latent.
    """

    def __init__(self, channels: int, num_classes: int, max_depth: int = 0) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, num_classes, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.max_depth = max_depth
        if max_depth:
            # row k·R + d - 1: the map of class k at depth d (1..R)
            self.depth_weight = nn.Parameter(torch.zeros(num_classes * max_depth, channels))
            self.depth_bias = nn.Parameter(torch.zeros(num_classes * max_depth))

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        out = torch.gather(self.proj(h), 1, labels.unsqueeze(1))
        if self.max_depth:
            depth = structure_depth(labels, self.max_depth)
            row = (labels * self.max_depth + depth - 1).clamp_min(0)  # depth 0 reads no row
            w = F.embedding(row, self.depth_weight)  # (B, X, Y, Z, C)
            extra = (w * h.movedim(1, -1)).sum(-1) + F.embedding(row, self.depth_bias.unsqueeze(1)).squeeze(-1)
            out = out + (extra * (depth > 0)).unsqueeze(1)
        return out


class Decoder(nn.Module):
    """z (B, latent, X/f, Y/f, Z/f) + label pyramid → ct_norm (B, 1, X, Y, Z) (unbounded, ≈ [-1, 1]).

    With ``readout_classes`` K > 0 a :class:`LabelReadout` over K classes (and ``max_depth``
    R depths) is added to the output (``forward`` then needs the full-resolution label map).
    """

    def __init__(self, channels: tuple[int, ...], latent_channels: int, num_res_blocks: int,
                 label_dim: int, norm: NormKind, readout_classes: int = 0, max_depth: int = 0) -> None:
        super().__init__()
        top = channels[-1]
        self.conv_in = nn.Conv3d(latent_channels, top, 3, padding=1)
        self.blocks = nn.ModuleList()  # coarsest level first
        self.ups = nn.ModuleList()
        prev = top
        for level in reversed(range(len(channels))):
            ch = channels[level]
            self.blocks.append(nn.ModuleList(ResBlock(prev if i == 0 else ch, ch, label_dim, norm)
                                             for i in range(num_res_blocks)))
            prev = ch
            if level > 0:
                # Narrow to the finer level's width *before* the ×2 nearest upsampling (a 1×1
                # convolution on the coarse grid): a wide 3×3 convolution on the fine grid would
                # cost ~8× more, and the fine level's residual blocks smooth the result anyway.
                prev = channels[level - 1]
                self.ups.append(nn.Conv3d(ch, prev, 1))
        self.norm_out = make_norm(norm, prev)
        self.conv_out = nn.Conv3d(prev, 1, 3, padding=1)
        self.readout = LabelReadout(prev, readout_classes, max_depth) if readout_classes else None

    def forward(self, z: torch.Tensor, pyramid: list[torch.Tensor | None],
                labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv_in(z)
        levels = len(self.blocks)
        for i, blocks in enumerate(self.blocks):
            level = levels - 1 - i
            for block in blocks:
                h = block(h, pyramid[level])
            if level > 0:
                h = F.interpolate(self.ups[i](h), scale_factor=2.0, mode="nearest")
        h = F.silu(self.norm_out(h))
        out = self.conv_out(h)
        if self.readout is not None:
            if labels is None:
                raise ValueError("this decoder has a per-class readout: pass the label map (B, X, Y, Z)")
            out = out + self.readout(h, labels)
        return out


# --------------------------------------------------------------------------- the model
# State-dict keys (prefixes) that fix the map CT → scaled latent: the encoder, the label embedding
# it shares with the decoder, and the latent scale. Two checkpoints equal on these tensors encode
# every volume to the same latent, whatever their decoders.
LATENT_SPACE_KEYS = ("encoder.", "labels.", "latent_scale")


class AnatomyAwareAutoencoder(nn.Module):
    """3D KL autoencoder for CT with label-map pyramid injection.

    Args:
        num_classes: number of label-set classes K (labels are ids in [0, K)).
        channels: feature channels per level; ``len(channels) - 1`` stride-2 downsamplings.
        latent_channels: channels of the latent z.
        num_res_blocks: residual blocks per level, in the encoder and in the decoder. There is
            no mid block: the decoder's receptive field stays small (radius 19 image voxels with
            the defaults), which keeps CPU steps cheap and tiled decoding exact (``tiling.py``).
        label_embed_dim: width E of the label embedding injected at every level.
        inject_labels: False drops the pyramid (the "w/o anatomy preservation" ablation); the
            model then ignores ``labels``.
        label_readout: add the decoder's per-class output readout (:class:`LabelReadout`;
            needs ``inject_labels``).
        label_depth: R > 0 gives the readout one more map per class and depth inside the
            structure, 1..R voxels (:class:`LabelReadout`; needs ``label_readout``).
        norm: ``"channel"`` (tiling-exact, default) or ``"group"`` (for comparison only).
        texture_bins: B > 0 adds :class:`~guidegen.models.texture.VoxelTexture` tables (B ranges
            of the decoded level per class, ``texture_quantiles`` residual quantiles each) that
            :meth:`add_texture` samples from; measured at export, not trained (needs ``inject_labels``).
        texture_depths: D > 1 splits each class's texture tables by the voxel's depth inside its
            structure, 0 … D - 1 (:func:`structure_depth`).
    """

    # output-neutral additions a checkpoint of an earlier design may lack (``--init-from``)
    INIT_MAY_LACK = ("decoder.readout.", "texture.")
    # measured again at every export, so tables of another layout (texture_depths) may be dropped
    INIT_MAY_DIFFER = ("texture.",)
    # what any load may find missing: the texture's grain came after the first textured exports,
    # and its absence means white draws, exactly what those checkpoints were measured with
    LOAD_MAY_LACK = ("texture.grain",)

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 4,
                 num_res_blocks: int = 1, label_embed_dim: int = 8, inject_labels: bool = True,
                 norm: NormKind = "channel", label_readout: bool = False, label_depth: int = 0,
                 texture_bins: int = 0, texture_quantiles: int = 32, texture_depths: int = 1) -> None:
        super().__init__()
        if len(channels) < 1:
            raise ValueError("channels must name at least one level")
        if label_readout and not inject_labels:
            raise ValueError("label_readout needs inject_labels (the readout reads the label map)")
        if label_depth and not label_readout:
            raise ValueError("label_depth needs label_readout (the depth maps are part of the readout)")
        if texture_bins and not inject_labels:
            raise ValueError("texture_bins needs inject_labels (the texture tables are per class)")
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.inject_labels = inject_labels
        self.downsample_factor = 2 ** (len(channels) - 1)
        label_dim = label_embed_dim if inject_labels else 0
        self.labels = LabelPyramid(num_classes, label_embed_dim, len(channels)) if inject_labels else None
        self.encoder = Encoder(tuple(channels), latent_channels, num_res_blocks, label_dim, norm)
        self.decoder = Decoder(tuple(channels), latent_channels, num_res_blocks, label_dim, norm,
                               readout_classes=num_classes if label_readout else 0, max_depth=label_depth)
        # z_scaled = z * latent_scale has about unit variance over the data (the LDM's input);
        # stored with the weights so a checkpoint carries it (see measure_latent_scale).
        self.register_buffer("latent_scale", torch.tensor(1.0))
        self.texture = VoxelTexture(num_classes, texture_bins, texture_quantiles, texture_depths) if texture_bins else None

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig, num_classes: int) -> AnatomyAwareAutoencoder:
        return cls(num_classes=num_classes, channels=tuple(cfg.channels), latent_channels=cfg.latent_channels,
                   num_res_blocks=cfg.num_res_blocks, label_embed_dim=cfg.label_embed_dim,
                   inject_labels=cfg.inject_labels, norm=cfg.norm, label_readout=cfg.label_readout,
                   label_depth=cfg.label_depth, texture_bins=cfg.texture_bins, texture_quantiles=cfg.texture_quantiles,
                   texture_depths=cfg.texture_depths)

    # -- helpers
    def _pyramid(self, labels: torch.Tensor | None, spatial: tuple[int, ...]) -> list[torch.Tensor | None]:
        """Label embeddings for each level; ``spatial`` is the full-resolution (X, Y, Z)."""
        levels = len(self.encoder.blocks)
        if self.labels is None:
            return [None] * levels
        if labels is None:
            raise ValueError("this autoencoder injects labels: pass the label map (B, X, Y, Z)")
        if labels.dim() != 4 or tuple(labels.shape[1:]) != tuple(spatial):
            raise GuideGenError(f"label map shape {tuple(labels.shape)} does not match the CT grid "
                                f"(B, {', '.join(map(str, spatial))})")
        return self.labels(labels.long())

    def _check_grid(self, spatial: tuple[int, ...]) -> None:
        f = self.downsample_factor
        if any(n % f for n in spatial):
            raise GuideGenError(f"volume grid {list(spatial)} must be divisible by {f} on every axis "
                                "(the autoencoder's downsampling factor)")

    def freeze_encoder(self) -> None:
        """Stop gradients to everything that defines the latent space (see :data:`LATENT_SPACE_KEYS`)."""
        for name, param in self.named_parameters():
            if name.startswith(LATENT_SPACE_KEYS):
                param.requires_grad_(False)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's output convolution (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    # -- API
    def encode(self, ct_norm: torch.Tensor, labels: torch.Tensor | None) -> DiagonalGaussian:
        """(B, 1, X, Y, Z) in [-1, 1] + (B, X, Y, Z) labels → q(z|x) on the (X/f, Y/f, Z/f) grid."""
        spatial = tuple(ct_norm.shape[2:])
        self._check_grid(spatial)
        return DiagonalGaussian(self.encoder(ct_norm, self._pyramid(labels, spatial)))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(B, latent, x, y, z) + (B, f·x, f·y, f·z) labels → ct_norm (B, 1, f·x, f·y, f·z)."""
        spatial = tuple(n * self.downsample_factor for n in z.shape[2:])
        return self.decoder(z, self._pyramid(labels, spatial), labels)

    def forward(self, ct_norm: torch.Tensor, labels: torch.Tensor | None, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct: returns (recon (B, 1, X, Y, Z), posterior)."""
        posterior = self.encode(ct_norm, labels)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z, labels), posterior

    def encode_latent(self, ct_norm: torch.Tensor, labels: torch.Tensor | None, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent ``z * latent_scale`` (unit variance over data), the LDM's working space."""
        posterior = self.encode(ct_norm, labels)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.latent_scale

    def decode_latent(self, z_scaled: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`encode_latent`'s scaling, then :meth:`decode`."""
        return self.decode(z_scaled / self.latent_scale, labels)

    @property
    def has_texture(self) -> bool:
        """Whether :meth:`add_texture` draws anything (the model has texture tables and they are measured)."""
        return self.texture is not None and self.texture.fitted

    def add_texture(self, decoded: torch.Tensor, labels: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """``decoded`` (B, 1, X, Y, Z) normalised + one residual draw per voxel from the texture
        tables (:mod:`guidegen.models.texture`); ``decoded`` itself when there are none."""
        if not self.has_texture:
            return decoded
        return decoded + self.texture.sample(decoded, labels, self.texture_depth(labels), generator)

    def texture_depth(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, X, Y, Z) ids → (B, X, Y, Z) long depth inside the structure in [0, D), D = the
        texture's depths (zeros when D = 1 or there is no texture)."""
        depths = self.texture.depths if self.texture is not None else 1
        return structure_depth(labels.long(), depths - 1) if depths > 1 else torch.zeros_like(labels, dtype=torch.long)


@torch.no_grad()
def measure_latent_scale(model: AnatomyAwareAutoencoder,
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]) -> float:
    """1 / std of the posterior means over ``batches`` of (ct_norm (B,1,X,Y,Z), labels (B,X,Y,Z)).

    Set it with ``model.latent_scale.fill_(measure_latent_scale(model, loader))`` before the
    LDM stage encodes its training data. Streams (no latent is kept): a running sum and sum of
    squares in float64.
    """
    was_training = model.training
    model.eval()
    n, s, s2 = 0, 0.0, 0.0
    try:
        for ct_norm, labels in batches:
            z = model.encode(ct_norm, labels).mode().double()
            n += z.numel()
            s += z.sum().item()
            s2 += z.pow(2).sum().item()
    finally:
        model.train(was_training)
    if n < 2:
        raise GuideGenError("measure_latent_scale: no data (the batch iterable was empty)")
    var = max(s2 / n - (s / n) ** 2, 0.0) * n / (n - 1)
    if var <= 1e-12:
        raise GuideGenError("measure_latent_scale: latents have zero variance over the data")
    return float(var ** -0.5)
