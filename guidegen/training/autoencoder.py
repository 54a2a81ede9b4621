"""Stage 2 training: the anatomy-aware HDR autoencoder step (generator + discriminator).

Each step: CT in HU → [-1, 1] (``autoencoder.hu_range``), reconstruct through a sampled
latent, step the autoencoder on the random-window L1/SSIM + full-range L1 + KL (+ adaptive
hinge GAN term once ``disc_start`` is reached), then step the two discriminators (held by the
``"disc"`` module, an :class:`~guidegen.training.ae_losses.AutoencoderLoss`) on their hinge
loss. Both optimisers are Adam(β = 0.5, 0.9) as in the authors' code. At export the latent
scale (1/std of the latents over the training set) is measured with the exported (EMA) weights
and stored in the checkpoint's ``latent_scale`` buffer and ``meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from guidegen.config import GuideGenConfig, TrainConfig
from guidegen.labels import LabelSet
from guidegen.models.autoencoder import AnatomyAwareAutoencoder, hu_to_norm, measure_latent_scale, norm_to_hu
from guidegen.training.ae_losses import AutoencoderLoss
from guidegen.training.common import class_weight_vector
from guidegen.training.trainer import StageTask, StepContext

# (name, center HU, width HU) of the rows of the sample montage.
PREVIEW_WINDOWS = (("lung", -600.0, 1500.0), ("soft tissue", 40.0, 400.0), ("bone", 400.0, 1500.0))
LATENT_SCALE_CASES = 64  # cases encoded at export to measure the latent scale


class AutoencoderTask(StageTask):
    """Two-optimiser GAN step for :class:`AnatomyAwareAutoencoder`.

    Args:
        cfg: the full config (``autoencoder`` section, ``data.grid``).
        label_set: gives the number of classes.
        previews: items (``ct`` (1, X, Y, Z) HU, ``labels`` (X, Y, Z)) reconstructed by
            :meth:`sample`; when None, the first training batch is kept for that.
    """

    ema_modules = ("model",)

    def __init__(self, cfg: GuideGenConfig, label_set: LabelSet, previews: list[dict] | None = None) -> None:
        self.cfg, self.label_set = cfg, label_set
        self.ae_cfg = cfg.autoencoder
        self.hu_range = tuple(self.ae_cfg.hu_range)
        self.previews = [{"ct": p["ct"], "labels": p["labels"]} for p in previews] if previews else None
        # classes a focused crop may centre on: organs and tumour (not background or body)
        self.focus_ids = tuple(label_set.organ_ids) + ((label_set.tumor_id,) if label_set.tumor_id is not None else ())

    def modules(self) -> dict[str, nn.Module]:
        grid = self.ae_cfg.train_crop or self.cfg.data.grid
        model = AnatomyAwareAutoencoder.from_config(self.ae_cfg, self.label_set.num_classes)
        if self.ae_cfg.freeze_encoder:
            model.freeze_encoder()
        weights = class_weight_vector(self.ae_cfg.class_l1_weights, self.label_set)
        return {"model": model, "disc": AutoencoderLoss.from_config(self.ae_cfg, grid, weights)}

    def optimizers(self, modules: Mapping[str, nn.Module], cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        return {name: torch.optim.AdamW([p for p in modules[name].parameters() if p.requires_grad], lr=cfg.lr,
                                        betas=(0.5, 0.9), weight_decay=cfg.weight_decay) for name in ("model", "disc")}

    def training_step(self, batch: dict[str, Any], step: int, ctx: StepContext) -> Mapping[str, torch.Tensor]:
        ct = hu_to_norm(batch["ct"].float(), self.hu_range)  # (B, 1, X, Y, Z) in [-1, 1]
        labels = batch["labels"].long()  # (B, X, Y, Z)
        if self.previews is None:  # whole volumes, before any crop
            self.previews = [{"ct": batch["ct"][0].detach().cpu(), "labels": labels[0].detach().cpu()}]
        if self.ae_cfg.train_crop is not None:
            ct, labels = random_crop(ct, labels, self.ae_cfg.train_crop, self.ae_cfg.focus_crop_prob,
                                     focus_ids=self.focus_ids)
        recon, posterior = ctx.modules["model"](ct, labels, sample=True)
        # The generator pass reads the discriminators through the plain module: they must not
        # take part in the autoencoder's backward (nor, under DDP, in its gradient sync).
        loss_fn: AutoencoderLoss = ctx.unwrap("disc")
        g = loss_fn.generator_loss(recon, ct, posterior, step, last_layer=ctx.unwrap("model").last_layer_weight,
                                   labels=labels)
        ctx.backward(g["loss"])
        ctx.step_optimizer("model")
        logs = {k: v for k, v in g.items() if k != "loss"}
        logs["loss"] = g["loss"].detach()
        if loss_fn.disc_active(step):
            d = ctx.modules["disc"](recon.detach(), ct)  # forward() = discriminator_loss (DDP-synced)
            ctx.backward(d["loss"])
            ctx.step_optimizer("disc")
            logs["d_loss"] = d["loss"].detach()
        else:
            logs["d_loss"] = torch.zeros((), device=ct.device)
        return logs

    @torch.no_grad()
    def sample(self, modules: Mapping[str, nn.Module], step: int, out_dir: Path) -> None:
        if not self.previews:
            return
        model = modules["model"]
        device = next(model.parameters()).device
        ct = torch.stack([p["ct"] for p in self.previews]).float().to(device)
        labels = torch.stack([p["labels"] for p in self.previews]).long().to(device)
        recon = norm_to_hu(model(hu_to_norm(ct, self.hu_range), labels, sample=False)[0], self.hu_range)
        for i in range(ct.shape[0]):
            save_reconstruction_montage(out_dir / f"step{step:07d}_case{i}.png", ct[i, 0].cpu().numpy(),
                                        recon[i, 0].float().cpu().numpy(), title=f"step {step}")

    def export_meta(self, trainer) -> dict:
        """Measure the latent scale, then the texture tables, with the exported (EMA) weights and
        store them in both copies.

        A decoder-only fine-tune (``freeze_encoder``) keeps the scale it started from instead:
        re-measuring would move the latent space its latent generators were trained in. The
        texture tables (``autoencoder.texture_bins`` > 0) describe this decoder's residuals, so
        they are measured at every export.
        """
        model = trainer.ema["model"].module if "model" in trainer.ema else trainer.modules["model"]
        copies = {id(model): model, id(trainer.modules["model"]): trainer.modules["model"]}.values()
        device = next(model.parameters()).device
        dataset = trainer.dataset
        n = min(len(dataset), LATENT_SCALE_CASES)

        def batches():
            for i in range(n):
                item = dataset[i]
                yield (hu_to_norm(item["ct"][None].float(), self.hu_range).to(device),
                       item["labels"][None].long().to(device))

        meta = {"hu_range": list(self.hu_range), "latent_channels": model.latent_channels,
                "latent_factor": model.downsample_factor}
        if self.ae_cfg.freeze_encoder:
            meta.update({"latent_scale": float(model.latent_scale), "latent_scale_kept": True})
        else:
            scale = measure_latent_scale(model, batches())
            for m in copies:
                m.latent_scale.fill_(scale)
            meta.update({"latent_scale": scale, "latent_scale_cases": n})
        if model.texture is not None:
            from guidegen.training.run import training_hu_reference

            measure_texture(model, batches(), self.ae_cfg.texture_grain)
            for m in copies:
                m.texture.load_state_dict(model.texture.state_dict())
            meta["texture_grain"] = [round(float(g), 4) for g in model.texture.grain]
            # A textured CT keeps each class's tissue mix (a rib's cortex and marrow modes), so
            # generate's QC checks its organ *medians* (issue 8's statistic) against these ranges.
            meta.update({"texture_cases": n, "hu_reference_median": training_hu_reference(dataset, self.label_set, n, "median")})
        return meta


# Voxels of the first reconstructions kept in memory to measure the texture's grain after its
# tables are fitted (about 40 demo cases; at least one case on any grid): the correlation of
# neighbours is a pooled statistic over millions of pairs, so more cases would only cost memory.
GRAIN_VOXELS = 6_000_000


@torch.no_grad()
def measure_texture(model: AnatomyAwareAutoencoder, batches, grain: bool = True) -> None:
    """Fit ``model.texture`` in place: its tables (:func:`guidegen.models.texture.fit_texture_tables`,
    at the texture's own bins, quantiles and depths) of ``model``'s reconstructions (posterior
    mode) of ``batches`` of (ct_norm (B, 1, X, Y, Z), labels (B, X, Y, Z)), then their grain
    (:func:`guidegen.models.texture.measure_grain`, on the first ``GRAIN_VOXELS`` voxels' worth
    of cases; zeros when ``grain`` is False)."""
    from guidegen.models.texture import fit_texture_tables, measure_grain

    texture = model.texture
    num_groups, bins, quantiles = texture.table.shape
    was_training = model.training
    model.eval()
    kept: list[tuple[np.ndarray, ...]] = []

    def cases():
        n_kept = 0
        for ct_norm, labels in batches:
            decoded = model(ct_norm, labels, sample=False)[0]
            depth = model.texture_depth(labels)
            for b in range(ct_norm.shape[0]):
                case = (decoded[b, 0].float().cpu().numpy(), ct_norm[b, 0].float().cpu().numpy(),
                        labels[b].cpu().numpy().astype(np.int16), depth[b].cpu().numpy().astype(np.uint8))
                if grain and (not kept or n_kept < GRAIN_VOXELS):
                    kept.append(case)
                    n_kept += case[0].size
                yield case

    try:
        edges, table = fit_texture_tables(cases(), model.num_classes, bins, quantiles, texture.depths)
    finally:
        model.train(was_training)
    texture.edges.copy_(edges)
    texture.table.copy_(table)
    texture.grain.copy_(measure_grain(texture, kept) if grain else torch.zeros(3))


def random_crop(ct: torch.Tensor, labels: torch.Tensor, size: tuple[int, int, int], focus_prob: float = 0.0,
                focus_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``size`` window of ``ct`` (B, 1, X, Y, Z) and ``labels`` (B, X, Y, Z), per sample.

    With probability ``focus_prob`` a sample's window is centred (then shifted inside the
    volume) on a random voxel of a class drawn uniformly among the ``focus_ids`` present in it,
    so that a 9-voxel tumour is seen as often as the liver; otherwise the corner is uniform.
    All draws come from torch's global RNG, which the trainer saves and restores, so a resumed
    run crops exactly as an uninterrupted one (MONAI's RandCropByLabelClasses keeps its own
    numpy RNG, which the trainer's checkpoints do not carry).
    """
    spatial = ct.shape[2:]
    if any(s > n for s, n in zip(size, spatial)):
        raise ValueError(f"autoencoder.train_crop {list(size)} is larger than the volume {list(spatial)}")
    cts, labs = [], []
    for b in range(ct.shape[0]):
        starts = None
        if focus_prob > 0 and float(torch.rand(())) < focus_prob:
            starts = _focus_starts(labels[b], size, focus_ids)
        if starts is None:
            starts = [int(torch.randint(0, n - s + 1, (1,))) for s, n in zip(size, spatial)]
        win = tuple(slice(a, a + s) for a, s in zip(starts, size))
        cts.append(ct[(b, slice(None), *win)])
        labs.append(labels[(b, *win)])
    return torch.stack(cts), torch.stack(labs)


def _focus_starts(labels: torch.Tensor, size: tuple[int, int, int], focus_ids: tuple[int, ...]) -> list[int] | None:
    """Window corner centring ``size`` on a random voxel of a random present focus class; None if none is present."""
    if not focus_ids:
        return None
    # one pass and one device->host copy (a comparison per class was a GPU sync per class)
    counts = torch.bincount(labels.flatten(), minlength=max(focus_ids) + 1).tolist()
    present = [k for k in focus_ids if counts[k] > 0]
    if not present:
        return None
    k = present[int(torch.randint(0, len(present), (1,)))]
    voxels = (labels == k).nonzero()
    centre = voxels[int(torch.randint(0, voxels.shape[0], (1,)))].tolist()
    return [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, labels.shape)]


def save_reconstruction_montage(path: str | Path, ct_hu: np.ndarray, recon_hu: np.ndarray, title: str = "") -> None:
    """PNG: rows = clinical windows, columns = input/reconstruction axial and coronal mid slices.

    ``ct_hu``/``recon_hu``: (X, Y, Z) HU in RAS; axial = middle Z slice, coronal = middle Y slice.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guidegen.io import atomic_write

    z, y = ct_hu.shape[2] // 2, ct_hu.shape[1] // 2
    views = {"input axial": ct_hu[:, :, z], "recon axial": recon_hu[:, :, z],
             "input coronal": ct_hu[:, y, :], "recon coronal": recon_hu[:, y, :]}
    fig, axes = plt.subplots(len(PREVIEW_WINDOWS), len(views), figsize=(2.2 * len(views), 2.2 * len(PREVIEW_WINDOWS)))
    for r, (wname, center, width) in enumerate(PREVIEW_WINDOWS):
        for c, (vname, img) in enumerate(views.items()):
            ax = axes[r, c]
            # Transposed and flipped: rows = Y (anterior up) or Z (superior up), columns = X.
            ax.imshow(np.flipud(img.T), cmap="gray", vmin=center - width / 2, vmax=center + width / 2,
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(vname, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{wname}\nC{center:.0f} W{width:.0f}", fontsize=8)
    mae = float(np.abs(recon_hu - ct_hu).mean())
    fig.suptitle(f"{title}  MAE {mae:.1f} HU", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
