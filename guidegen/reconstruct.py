"""``guidegen reconstruct``: encode + decode a CT through the autoencoder and report its errors.

The errors are mean absolute HU differences after clipping both volumes to a display window
(lung −1350…150, soft tissue −160…240, bone −450…1050: what a reader would see), over the
whole volume and inside each labelled class, plus the mean-HU error per class (does a tumour
keep its density?).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from guidegen.errors import GuideGenError

# (low, high) HU of the reporting windows
WINDOWS_HU = {"lung": (-1350.0, 150.0), "soft_tissue": (-160.0, 240.0), "bone": (-450.0, 1050.0)}


def windowed_mae(a: np.ndarray, b: np.ndarray, window: tuple[float, float], mask: np.ndarray | None = None) -> float | None:
    """Mean |clip(a) − clip(b)| in HU over ``mask`` (all voxels when None); None for an empty mask."""
    lo, hi = window
    diff = np.abs(np.clip(a, lo, hi) - np.clip(b, lo, hi))
    if mask is not None:
        if not mask.any():
            return None
        diff = diff[mask]
    return float(diff.mean())


def reconstruction_errors(ct: np.ndarray, recon: np.ndarray, labels: np.ndarray, label_set) -> dict:
    """Per-window MAE (whole volume) and, per class present, windowed MAE and mean-HU error."""
    out = {"mae": {w: round(windowed_mae(ct, recon, win), 2) for w, win in WINDOWS_HU.items()}, "classes": {}}
    for c in label_set.classes[1:]:
        m = labels == c.id
        if m.sum() < 4:
            continue
        out["classes"][c.name] = {
            "voxels": int(m.sum()),
            "mae_soft_tissue": round(windowed_mae(ct, recon, WINDOWS_HU["soft_tissue"], m), 2),
            "mean_hu_true": round(float(ct[m].mean()), 1),
            "mean_hu_error": round(float(recon[m].mean() - ct[m].mean()), 1),
        }
    return out


@torch.no_grad()
def reconstruct_volume(ae, ct_hu: np.ndarray, labels: np.ndarray, hu_range: tuple[float, float], *, tile: int | None = None) -> np.ndarray:
    """AE(ct) in HU (X, Y, Z) float32 for an (X, Y, Z) CT whose axes are multiples of the AE factor."""
    from guidegen.models.autoencoder import hu_to_norm, norm_to_hu
    from guidegen.models.tiling import tiled_decode, tiled_encode

    device = next(ae.parameters()).device
    x = hu_to_norm(torch.from_numpy(np.asarray(ct_hu, np.float32))[None, None], hu_range).to(device)
    lab = torch.from_numpy(np.asarray(labels, np.int64))[None].to(device)
    if tile:
        z = tiled_encode(ae, x, lab, tile=tile).mode()
        y = tiled_decode(ae, z, lab, tile=tile)
    else:
        y = ae.decode(ae.encode(x, lab).mode(), lab)
    return norm_to_hu(y, hu_range)[0, 0].float().cpu().numpy()


def run_reconstruct(ct_path: Path, labels_path: Path, out: Path, checkpoint: Path | None, tile: int | None = None) -> dict:
    """The command: validate inputs, reconstruct (on the volume's own grid), write NIfTI + JSON + PNG."""
    from guidegen.checkpoints import shipped_root
    from guidegen.data.latents import load_autoencoder
    from guidegen.io import from_ras, load_nifti, save_nifti, spacing_from_affine, to_ras, write_json_atomic
    from guidegen.labels import load_label_set
    from guidegen.models.tiling import DEFAULT_OVERLAP
    from guidegen.viz import save_case_preview

    ckpt = Path(checkpoint) if checkpoint is not None else shipped_root() / "demo" / "autoencoder"
    if not (ckpt / "model.safetensors").is_file():
        raise GuideGenError(f"{ckpt}: autoencoder checkpoint not found (expected model.safetensors)")
    # read on their own axes (the output keeps them); the model sees RAS copies (to_ras)
    ct, ct_aff = load_nifti(ct_path, reorient_to_ras=False)
    lab, lab_aff = load_nifti(labels_path, reorient_to_ras=False)
    if ct.shape != lab.shape:
        raise GuideGenError(f"{labels_path}: shape {lab.shape} differs from the CT's {ct.shape} ({ct_path.name})")
    if not np.allclose(ct_aff, lab_aff, atol=1e-3):
        raise GuideGenError(f"{labels_path}: affine differs from the CT's ({ct_path.name})")
    if not np.issubdtype(lab.dtype, np.integer) and not np.allclose(lab, np.rint(lab)):
        raise GuideGenError(f"{labels_path}: label map must hold integer class ids (dtype {lab.dtype})")
    if not np.issubdtype(ct.dtype, np.number) or not np.all(np.isfinite(ct)):
        raise GuideGenError(f"{ct_path}: CT must be finite numbers in HU (dtype {ct.dtype})")
    ae, cfg, _ = load_autoencoder(ckpt)
    if tile is not None and (tile % ae.downsample_factor or tile <= DEFAULT_OVERLAP):
        raise GuideGenError(f"--tile must be a multiple of {ae.downsample_factor} larger than the tiles' {DEFAULT_OVERLAP}-voxel "
                            f"overlap, got {tile}")
    label_set = load_label_set(cfg.data.label_set)
    lab = np.rint(lab).astype(np.int64)
    if lab.min() < 0 or lab.max() >= label_set.num_classes:
        raise GuideGenError(f"{labels_path}: label ids outside label set {label_set.name} (0..{label_set.num_classes - 1})")
    ct_ras, ras_aff, back = to_ras(ct.astype(np.float32), ct_aff)
    lab_ras = to_ras(lab, lab_aff)[0]
    f = ae.downsample_factor
    pad = [(0, (-n) % f) for n in ct_ras.shape]  # the AE needs multiples of its factor: pad with air
    ct_p = np.pad(ct_ras, pad, constant_values=-1000.0)
    lab_p = np.pad(lab_ras, pad, constant_values=0)
    recon = reconstruct_volume(ae, ct_p, lab_p, tuple(cfg.autoencoder.hu_range), tile=tile)
    recon = recon[tuple(slice(0, n) for n in ct_ras.shape)]
    errors = reconstruction_errors(ct_ras, recon, lab_ras, label_set)
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(out / "reconstruction.nii.gz", from_ras(recon, back), ct_aff, np.int16)
    write_json_atomic(out / "errors.json", {"ct": ct_path.name, "labels": labels_path.name, "checkpoint": str(ckpt), **errors})
    save_case_preview(out / "reconstruction.png", lab_ras.astype(np.uint8), recon, label_set, title="reconstruction",
                      spacing=spacing_from_affine(ras_aff))
    return errors
