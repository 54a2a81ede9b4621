"""Stage-2 losses: random HU windows (HDR adaptation), reconstruction, KL and hinge GAN terms.

The reconstruction is judged through a *random window* drawn per sample and per step from the
clinical families (lung, soft tissue, bone, plus occasional fully random windows): both the
input and the reconstruction are mapped to [0, 1] by the same window and compared with L1 and
3D SSIM. That forces the autoencoder to keep contrast at every HU level rather than only where
a single fixed window is steep (METHOD §4, "HDR adaptation"). A full-range L1 on the
[-1, 1]-normalised volume keeps values outside the drawn window in place (the clamp of a window
passes no gradient there). The paper's windowing module has a learnable output affine (k, b);
the authors' code fixes it, and so do we: a fixed [0, 1] output makes the loss scale comparable
across windows.

Anatomy-balanced L1: the plain L1 is a mean over voxels, so a 9-voxel tumour or the one-voxel
ribs of a coarse grid hardly move it (after 1000 demo steps the rib mean was 450 HU low). The
class-balanced term averages the full-range L1 *per label class* and then over the classes
present, so every structure counts equally however small it is: the label map is there anyway,
and matching each structure's intensity is what the anatomy-aware AE is for.

GAN: a 2D slice and a 3D patch discriminator (``guidegen.models.discriminators``), hinge loss,
the VQGAN adaptive generator weight (ratio of the reconstruction and GAN gradient norms at the
decoder's last layer) and a delayed start (``disc_start``).

Tensors: ``target``/``recon`` (B, 1, X, Y, Z) normalised CT in [-1, 1]; windows in HU as (B,).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import SSIMLoss

from guidegen.models.autoencoder import DEFAULT_HU_RANGE, DiagonalGaussian, norm_to_hu
from guidegen.models.discriminators import SliceDiscriminator, VolumeDiscriminator, multi_window, random_slices

if TYPE_CHECKING:
    from guidegen.config import AutoencoderConfig

# name → ((center_lo, center_hi), (width_lo, width_hi)) in HU; centre and width are drawn
# uniformly in these ranges (the usual presets ± jitter).
WINDOW_FAMILIES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "lung": ((-700.0, -500.0), (1200.0, 1800.0)),
    "soft_tissue": ((0.0, 80.0), (300.0, 500.0)),
    "bone": ((300.0, 500.0), (1200.0, 2000.0)),
}
# A "fully random" window: centre and width uniform over these ranges (HU).
RANDOM_CENTER_HU: tuple[float, float] = (-1000.0, 1500.0)
RANDOM_WIDTH_HU: tuple[float, float] = (100.0, 3000.0)


def random_window(generator: torch.Generator | None, batch: int, p_random: float = 0.25,
                  families: dict[str, tuple[tuple[float, float], tuple[float, float]]] = WINDOW_FAMILIES,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one window per sample: (center_hu (B,), width_hu (B,)), float32 on the CPU.

    With probability ``p_random`` the window is fully random (``RANDOM_CENTER_HU`` ×
    ``RANDOM_WIDTH_HU``); otherwise a family is picked uniformly and its centre and width are
    drawn uniformly in the family's ranges (``WINDOW_FAMILIES``).
    """
    ranges = list(families.values())
    center = torch.empty(batch)
    width = torch.empty(batch)
    u = torch.rand(batch, 3, generator=generator)
    fam = torch.randint(0, len(ranges), (batch,), generator=generator)
    for i in range(batch):
        if u[i, 0] < p_random:
            (c_lo, c_hi), (w_lo, w_hi) = RANDOM_CENTER_HU, RANDOM_WIDTH_HU
        else:
            (c_lo, c_hi), (w_lo, w_hi) = ranges[int(fam[i])]
        center[i] = c_lo + (c_hi - c_lo) * u[i, 1]
        width[i] = w_lo + (w_hi - w_lo) * u[i, 2]
    return center, width


CLASS_WINDOW_WIDTH_HU: tuple[float, float] = (100.0, 500.0)


def class_window(target_hu: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                 width_hu: tuple[float, float] = CLASS_WINDOW_WIDTH_HU) -> tuple[torch.Tensor, torch.Tensor]:
    """One narrow window per sample centred on the mean HU of a label class present in it.

    The class is drawn uniformly among the classes present (so a tumour counts like the liver
    around it); the width uniformly in ``width_hu``. A 50 HU tumour-vs-host difference is a
    quarter of a 200 HU window but 3 % of the full range: these windows are where that contrast
    gets its gradient. ``target_hu`` (B, 1, X, Y, Z) in HU, ``labels`` (B, X, Y, Z); returns
    (center_hu (B,), width_hu (B,)) float32 on the CPU.
    """
    batch = labels.shape[0]
    u = torch.rand(batch, 2, generator=generator)
    # per (sample, class) voxel counts and HU sums in one pass, moved to the CPU once (a loop of
    # unique() and masked means cost two device syncs per sample)
    flat = labels.reshape(batch, -1).long()
    num = int(flat.max()) + 1
    keys = (flat + num * torch.arange(batch, device=flat.device)[:, None]).flatten()
    counts = torch.bincount(keys, minlength=batch * num).view(batch, num).cpu()
    sums = torch.zeros(batch * num, dtype=torch.float64, device=flat.device)
    sums = sums.index_add_(0, keys, target_hu.reshape(-1).double()).view(batch, num).cpu()
    center = torch.empty(batch)
    for i in range(batch):
        ids = counts[i].nonzero().flatten()  # present classes, ascending
        cls = ids[min(int(u[i, 0] * len(ids)), len(ids) - 1)]
        center[i] = float(sums[i, cls] / counts[i, cls])
    width = width_hu[0] + (width_hu[1] - width_hu[0]) * u[:, 1]
    return center, width


def _per_sample(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A scalar stays a scalar; a (B,) tensor becomes (B, 1, 1, ...) to broadcast over ``like``."""
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return v.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return v


def apply_window(x: torch.Tensor, center: torch.Tensor | float, width: torch.Tensor | float) -> torch.Tensor:
    """Window ``x`` to [0, 1]: ``center - width/2 → 0``, ``center + width/2 → 1``, clamped.

    ``x`` and the window must share units (both HU, or both normalised, see
    :func:`window_to_norm`); ``center``/``width`` are scalars or per-sample (B,) tensors.
    """
    c, w = _per_sample(center, x), _per_sample(width, x)
    return ((x - (c - w / 2)) / w).clamp(0.0, 1.0)


def window_to_norm(center_hu: torch.Tensor | float, width_hu: torch.Tensor | float,
                   hu_range: tuple[float, float] = DEFAULT_HU_RANGE) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """A window in HU → the same window in [-1, 1] units of :func:`~guidegen.models.autoencoder.hu_to_norm`.

    Not clamped, so a window reaching beyond ``hu_range`` keeps its slope.
    """
    lo, hi = hu_range
    scale = 2.0 / (hi - lo)
    return (center_hu - lo) * scale - 1.0, width_hu * scale


def _class_weighted_mean(per_voxel: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None,
                         outer: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted mean over (sample, present class) of ``outer(mean of per_voxel inside the class)``.

    ``per_voxel`` (B, 1, X, Y, Z), ``labels`` (B, X, Y, Z) integer ids, ``class_weights`` (K,)
    (None: all 1), ``outer`` applied to each class mean (None: identity); returns a scalar.
    """
    batch = labels.shape[0]
    ids = labels.reshape(batch, -1).long()
    v = per_voxel.reshape(batch, -1)
    k = int(ids.max()) + 1
    sums = v.new_zeros(batch, k).scatter_add(1, ids, v)
    counts = v.new_zeros(batch, k).scatter_add(1, ids, torch.ones_like(v))
    present = counts > 0
    means = sums[present] / counts[present]
    if outer is not None:
        means = outer(means)
    if class_weights is None:
        return means.mean()
    w = class_weights.to(v.dtype)[:k].expand(batch, k)[present]
    return (w * means).sum() / w.sum()


def class_balanced_l1(recon: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over (sample, present class) of the mean |recon - target| inside that class.

    ``recon``/``target`` (B, 1, X, Y, Z), ``labels`` (B, X, Y, Z) integer ids, ``class_weights``
    (K,) (None: all 1); returns a scalar. Equals the plain L1 when one class fills the volume.
    """
    return _class_weighted_mean((recon - target).abs(), labels, class_weights)


def class_mean_l1(recon: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over (sample, present class) of |mean(recon) - mean(target)| inside that class.

    The per-class *bias*: a voxel-wise L1 is minimised by the class's conditional median, which
    for a skewed class (thin ribs: bone cortex plus partial-volume voxels far below it) sits
    far from its mean; this term asks for the right mean HU of every structure, which is what
    HU calibration and radiomics read. Same shapes as :func:`class_balanced_l1`.
    """
    return _class_weighted_mean(recon - target, labels, class_weights, outer=torch.abs)


def class_distribution_l1(recon: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                          class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over (sample, present class) of the 1-D Wasserstein-1 distance between the
    recon and target values inside that class (mean |sorted recon - sorted target|).

    Voxel-wise L1 under uncertainty lands between the modes of a two-tissue class (rib cortex
    ~920 HU and marrow ~290 HU; the heart's wall and contrast-filled blood): the reconstructed
    median falls between them. This term asks for the class's whole HU *distribution* - its
    median and every other quantile - without asking which voxel holds which value; it bounds
    :func:`class_mean_l1` from above. One sort per sample: keys ``label·span + value`` group the
    voxels by class and order them inside it, and both volumes share the labels, so sorted
    positions pair class by class. Same shapes as :func:`class_balanced_l1`.
    """
    batch = labels.shape[0]
    ids = labels.reshape(batch, -1).long()
    r, t = recon.reshape(batch, -1), target.reshape(batch, -1)
    # A class offset larger than any value range keeps the classes apart in the sort.
    span = 2.0 * float(torch.maximum(r.detach().abs().max(), t.abs().max())) + 1.0
    offset = ids.to(r.dtype) * span
    r_sorted = torch.gather(r, 1, torch.argsort(offset + r.detach(), dim=1))
    t_sorted = torch.gather(t, 1, torch.argsort(offset + t, dim=1))
    ids_sorted = torch.sort(ids, dim=1).values
    return _class_weighted_mean((r_sorted - t_sorted).abs(), ids_sorted, class_weights)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ``½(mean relu(1 - D(real)) + mean relu(1 + D(fake)))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss ``-mean D(fake)``."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance ``‖∇_w L_rec‖ / (‖∇_w L_G‖ + 1e-4)`` at the decoder's last weight ``w`` (detached)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the modules' parameters (restored on exit)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def disc_layers_for(grid: tuple[int, ...], max_layers: int = 3) -> int:
    """Most stride-2 PatchGAN layers (≤ ``max_layers``, ≥ 1) that leave ≥ 4 voxels on the shortest axis."""
    layers = max_layers
    while layers > 1 and min(grid) // 2**layers < 4:
        layers -= 1
    return layers


class AutoencoderLoss(nn.Module):
    """All stage-2 loss terms; owns the two discriminators (optimise ``self.parameters()`` with D's optimiser).

    Use: ``g = loss.generator_loss(recon, target, posterior, step, model.last_layer_weight)``,
    step the autoencoder on ``g["loss"]``; then, if ``loss.disc_active(step)``,
    ``d = loss.discriminator_loss(recon.detach(), target)`` and step the discriminators on
    ``d["loss"]``. Every returned dict holds ``loss`` plus detached terms for logging.
    """

    def __init__(self, hu_range: tuple[float, float] = DEFAULT_HU_RANGE, window_weight: float = 1.0,
                 ssim_weight: float = 0.2, full_range_weight: float = 1.0, class_l1_weight: float = 0.0,
                 class_mean_weight: float = 0.0, class_distribution_weight: float = 0.0,
                 window_class_balanced: bool = False, class_window_prob: float = 0.0,
                 class_l1_class_weights: torch.Tensor | None = None, kl_weight: float = 1e-6,
                 adv_weight: float = 0.05, disc_start: int = 1000, num_slices: int = 2, p_random_window: float = 0.25,
                 disc_channels: int = 16, disc_layers: int = 3, ssim_win_size: int = 7) -> None:
        super().__init__()
        self.hu_range = (float(hu_range[0]), float(hu_range[1]))
        self.window_weight, self.ssim_weight = window_weight, ssim_weight
        self.full_range_weight, self.kl_weight = full_range_weight, kl_weight
        self.class_l1_weight, self.window_class_balanced = class_l1_weight, window_class_balanced
        self.class_mean_weight, self.class_distribution_weight = class_mean_weight, class_distribution_weight
        self.class_window_prob = class_window_prob
        # (K,) weights inside the class-balanced L1; not saved with the module (the config has them)
        self.register_buffer("class_l1_class_weights", class_l1_class_weights, persistent=False)
        self.adv_weight, self.disc_start = adv_weight, disc_start
        self.num_slices, self.p_random_window = num_slices, p_random_window
        self.ssim = SSIMLoss(spatial_dims=3, data_range=1.0, win_size=ssim_win_size)
        self.slice_disc = SliceDiscriminator(channels=2 * disc_channels, num_layers=disc_layers)
        self.volume_disc = VolumeDiscriminator(channels=disc_channels, num_layers=disc_layers)

    @classmethod
    def from_config(cls, cfg: AutoencoderConfig, grid: tuple[int, ...] | None = None,
                    class_l1_class_weights: torch.Tensor | None = None) -> AutoencoderLoss:
        """Loss from the config; ``grid`` (X, Y, Z) of the training crops caps the discriminator depth;
        ``class_l1_class_weights`` (K,) from ``cfg.class_l1_weights`` (see training.common)."""
        return cls(disc_layers=disc_layers_for(grid) if grid else 3, hu_range=tuple(cfg.hu_range),
                   window_weight=cfg.window_weight, ssim_weight=cfg.ssim_weight,
                   full_range_weight=cfg.full_range_weight, class_l1_weight=cfg.class_l1_weight,
                   class_mean_weight=cfg.class_mean_weight, class_distribution_weight=cfg.class_distribution_weight,
                   window_class_balanced=cfg.window_class_balanced, class_window_prob=cfg.class_window_prob,
                   class_l1_class_weights=class_l1_class_weights,
                   kl_weight=cfg.kl_weight, adv_weight=cfg.adv_weight,
                   disc_start=cfg.disc_start, p_random_window=cfg.p_random_window)

    def disc_active(self, step: int) -> bool:
        return self.adv_weight > 0 and step >= self.disc_start

    def _adversarial(self, x_norm: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of both discriminators; returns (slice logits (N·B·h·w,), volume logits (B, 1, x, y, z))."""
        x = multi_window(x_norm, self.hu_range)
        s = torch.cat([self.slice_disc(sl).flatten() for sl in random_slices(x, self.num_slices, generator)])
        return s, self.volume_disc(x)

    def reconstruction_terms(self, recon: torch.Tensor, target: torch.Tensor,
                             generator: torch.Generator | None = None,
                             labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Random-window L1 and 1-SSIM (window drawn per sample), full-range L1 and, when
        ``labels`` (B, X, Y, Z) are given, the class-balanced full-range L1; each a scalar.
        With ``window_class_balanced`` and ``labels`` the window L1 is class-balanced too; with
        ``class_window_prob`` and ``labels`` that share of the windows is a :func:`class_window`."""
        center_hu, width_hu = random_window(generator, target.shape[0], self.p_random_window)
        if self.class_window_prob > 0 and labels is not None:
            use = torch.rand(target.shape[0], generator=generator) < self.class_window_prob
            if bool(use.any()):
                c_cls, w_cls = class_window(norm_to_hu(target.detach(), self.hu_range), labels, generator)
                center_hu, width_hu = torch.where(use, c_cls, center_hu), torch.where(use, w_cls, width_hu)
        c, w = window_to_norm(center_hu, width_hu, self.hu_range)
        win_t, win_r = apply_window(target, c, w), apply_window(recon, c, w)
        balanced = self.window_class_balanced and labels is not None
        terms = {"l1_window": class_balanced_l1(win_r, win_t, labels, self.class_l1_class_weights) if balanced
                 else (win_r - win_t).abs().mean(),
                 "ssim_window": self.ssim(win_r, win_t),
                 "l1_full": (recon - target).abs().mean()}
        if labels is not None:
            terms["l1_class"] = class_balanced_l1(recon, target, labels, self.class_l1_class_weights)
            terms["l1_class_mean"] = class_mean_l1(recon, target, labels, self.class_l1_class_weights)
            if self.class_distribution_weight > 0:
                terms["w1_class"] = class_distribution_l1(recon, target, labels, self.class_l1_class_weights)
        return terms

    def generator_loss(self, recon: torch.Tensor, target: torch.Tensor, posterior: DiagonalGaussian, step: int,
                       last_layer: torch.Tensor | None = None,
                       generator: torch.Generator | None = None,
                       labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Autoencoder objective; ``last_layer`` (the decoder's output weight) enables the adaptive
        weight; ``labels`` (B, X, Y, Z) enable the class-balanced L1 (``class_l1_weight``)."""
        needs_labels = (self.class_l1_weight > 0 or self.class_mean_weight > 0 or self.class_distribution_weight > 0
                        or self.window_class_balanced
                        or self.class_window_prob > 0)
        terms = self.reconstruction_terms(recon, target, generator, labels if needs_labels else None)
        rec = (self.window_weight * terms["l1_window"] + self.ssim_weight * terms["ssim_window"]
               + self.full_range_weight * terms["l1_full"])
        if "l1_class" in terms and self.class_l1_weight > 0:
            rec = rec + self.class_l1_weight * terms["l1_class"]
        if "l1_class_mean" in terms and self.class_mean_weight > 0:
            rec = rec + self.class_mean_weight * terms["l1_class_mean"]
        if "w1_class" in terms:
            rec = rec + self.class_distribution_weight * terms["w1_class"]
        kl = posterior.kl().mean()
        loss = rec + self.kl_weight * kl
        terms["kl"] = kl
        zero = recon.new_zeros(())
        terms["g_adv"], terms["adv_scale"] = zero, zero
        if self.disc_active(step):
            # The discriminators are only read here: freeze them so backward skips their
            # weight gradients (a real saving on CPU) and leaves their .grad untouched.
            with _frozen(self.slice_disc, self.volume_disc):
                s, v = self._adversarial(recon, generator)
            g_adv = 0.5 * (hinge_g_loss(s) + hinge_g_loss(v))
            if last_layer is not None and torch.is_grad_enabled() and g_adv.requires_grad:
                scale = adaptive_weight(rec, g_adv, last_layer)
            else:
                scale = recon.new_ones(())
            loss = loss + self.adv_weight * scale * g_adv
            terms["g_adv"], terms["adv_scale"] = g_adv, scale
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = loss
        return terms

    def forward(self, recon: torch.Tensor, target: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """= :meth:`discriminator_loss`, so that a DDP wrapper syncs the discriminators' gradients."""
        return self.discriminator_loss(recon, target, generator)

    def discriminator_loss(self, recon: torch.Tensor, target: torch.Tensor,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Hinge loss of both discriminators (averaged) on real ``target`` vs ``recon`` (detached here)."""
        s_real, v_real = self._adversarial(target, generator)
        s_fake, v_fake = self._adversarial(recon.detach(), generator)
        d_slice, d_volume = hinge_d_loss(s_real, s_fake), hinge_d_loss(v_real, v_fake)
        return {"loss": 0.5 * (d_slice + d_volume), "d_slice": d_slice.detach(), "d_volume": d_volume.detach(),
                "logits_real": 0.5 * (s_real.mean() + v_real.mean()).detach(),
                "logits_fake": 0.5 * (s_fake.mean() + v_fake.mean()).detach()}
