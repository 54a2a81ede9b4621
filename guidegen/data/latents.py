"""Stage 3 data: the training set encoded once by the autoencoder (the latent cache).

The LDM never runs the encoder while training: every case is encoded once (posterior mode,
times the AE's ``latent_scale``) and stored as ::

    DATASET/cache/latents-<ae>/<prep>/<case>.npz   latent (C, x, y, z) float32, labels (X, Y, Z) uint8,
                                                   spacing_mm (3,)
    DATASET/cache/latents-<ae>/<prep>/info.json    AE checkpoint, its hash, latent scale, grid

``<ae>`` is the first 16 hex digits of the AE's latent-space digest (:func:`latent_space_sha256`:
the encoder side of the weights and the latent scale), so a retrained AE gets a new cache while a
decoder-only fine-tune (``autoencoder.freeze_encoder``) shares its parent's; ``<prep>`` is the
grid preprocessing key of :class:`guidegen.data.cache.PreprocessConfig` (grid, margin, label set).
Files are written atomically, so an interrupted encoding leaves only complete cases.
Under torchrun the ranks share the encoding (:meth:`LatentDataset.build_cache`, one case in
``WORLD_SIZE`` each) and meet at a barrier before reading the cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from guidegen.errors import GuideGenError
from guidegen.io import atomic_write, write_json_atomic

LATENT_CACHE_VERSION = 1
# encode volumes larger than this many voxels tile by tile (guidegen.models.tiling)
TILED_ENCODE_VOXELS = 128**3


def checkpoint_sha256(ckpt_dir: str | Path) -> str:
    """sha256 (hex) of ``ckpt_dir/model.safetensors``, streamed."""
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise GuideGenError(f"{path}: autoencoder checkpoint weights not found")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def latent_space_sha256(ckpt_dir: str | Path) -> str:
    """sha256 (hex) over the tensors of ``ckpt_dir/model.safetensors`` that define the latent space.

    Those are the keys under :data:`~guidegen.models.autoencoder.LATENT_SPACE_KEYS` (encoder,
    shared label embedding, latent scale), hashed with their names, dtypes and shapes in sorted
    order. A latent generator trained on one checkpoint's latents is valid for every checkpoint
    with the same digest: the decoder may differ.
    """
    from safetensors.torch import load_file

    from guidegen.models.autoencoder import LATENT_SPACE_KEYS

    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise GuideGenError(f"{path}: autoencoder checkpoint weights not found")
    tensors = load_file(str(path))
    keys = sorted(k for k in tensors if k.startswith(LATENT_SPACE_KEYS))
    if not any(k.startswith("encoder.") for k in keys):
        raise GuideGenError(f"{path}: no encoder weights in this checkpoint (is it an autoencoder?)")
    h = hashlib.sha256()
    for k in keys:
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_autoencoder(ckpt_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild an exported autoencoder from its own ``config.yaml`` and load its weights.

    Returns ``(model in eval mode with requires_grad False, the checkpoint's GuideGenConfig, meta dict)``.
    """
    from guidegen.config import load_config
    from guidegen.labels import load_label_set
    from guidegen.models.autoencoder import AnatomyAwareAutoencoder
    from guidegen.training.trainer import load_model_weights

    ckpt = Path(ckpt_dir)
    if not (ckpt / "config.yaml").is_file():
        raise GuideGenError(f"{ckpt}: not an exported checkpoint directory (no config.yaml)")
    cfg = load_config(ckpt / "config.yaml")
    meta_path = ckpt / "meta.json"
    stage = json.loads(meta_path.read_text()).get("stage") if meta_path.is_file() else None
    if stage not in (None, "autoencoder"):
        raise GuideGenError(f"{ckpt}: this is a {stage!r} checkpoint, not an autoencoder")
    num_classes = load_label_set(cfg.data.label_set).num_classes
    model = AnatomyAwareAutoencoder.from_config(cfg.autoencoder, num_classes)
    meta = load_model_weights(model, ckpt)
    model.eval().requires_grad_(False)
    return model.to(device), cfg, meta


@torch.no_grad()
def encode_case(ae, ct_hu: torch.Tensor, labels: torch.Tensor, hu_range: tuple[float, float]) -> torch.Tensor:
    """Scaled latent (B, C, X/f, Y/f, Z/f) of CT ``ct_hu`` (B, 1, X, Y, Z) HU with ``labels`` (B, X, Y, Z).

    The posterior mode (no sampling noise): the cache is a deterministic function of the data.
    """
    from guidegen.models.autoencoder import hu_to_norm
    from guidegen.models.tiling import tiled_encode

    device = next(ae.parameters()).device
    x = hu_to_norm(ct_hu.float(), hu_range).to(device)
    lab = labels.long().to(device)
    if x[0, 0].numel() > TILED_ENCODE_VOXELS:
        return (tiled_encode(ae, x, lab).mode() * ae.latent_scale).cpu()
    return ae.encode_latent(x, lab, sample=False).cpu()


class LatentDataset(Dataset):
    """Cached AE latents + label maps + report text of a dataset's cases on ``grid``.

    Items: ``latent`` (C, x, y, z) float32 scaled latent, ``labels`` (X, Y, Z) int64,
    ``text`` str, ``findings_json`` str, ``case`` str, ``spacing`` (3,) float32 mm.

    Construction encodes the cases missing from the cache (loading the AE only then) unless
    ``build=False``; afterwards items are read from the cache alone.
    """

    def __init__(self, root: str | Path, grid: tuple[int, int, int], ae_checkpoint_dir: str | Path, *,
                 cases: list[str] | None = None, build: bool = True, device: str | torch.device = "cpu",
                 progress: bool = True) -> None:
        from guidegen.data.datasets import CTLabelDataset

        self.source = CTLabelDataset(root, grid, cases=cases)
        self.reader, self.cases, self.grid = self.source.reader, self.source.cases, self.source.grid
        self.ae_checkpoint = Path(ae_checkpoint_dir)
        self.ae_sha256 = checkpoint_sha256(self.ae_checkpoint)
        self.latent_sha256 = latent_space_sha256(self.ae_checkpoint)
        self.dir = self.reader.root / "cache" / f"latents-{self.latent_sha256[:16]}" / self.source.cache.cfg.key()
        self.device = device
        if build:
            self.build_cache(progress=progress)

    def path(self, case: str) -> Path:
        return self.dir / f"{case}.npz"

    def missing(self) -> list[str]:
        return [c for c in self.cases if not self.path(c).is_file()]

    @property
    def info(self) -> dict:
        """The cache's ``info.json`` (AE checkpoint, hash, latent scale, latent shape); {} before encoding."""
        p = self.dir / "info.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def build_cache(self, progress: bool = True, *, rank: int = 0, world_size: int = 1, barrier=None) -> None:
        """Encode every case not cached yet with the AE (loaded here, on ``device``).

        Sharded over ``world_size`` processes: this one (``rank``) encodes the missing cases at
        positions ``i`` of :attr:`cases` with ``i % world_size == rank``, then calls ``barrier``
        (a collective every process reaches) so that all of them see the complete cache. Cases
        still missing afterwards (a dataset directory that the processes do not share) are
        encoded here. Files are written atomically, so processes never see half a case.
        """
        if world_size > 1:
            mine = [c for i, c in enumerate(self.cases) if i % world_size == rank and not self.path(c).is_file()]
            self._encode(mine, progress, preprocess_all=False)
            if barrier is not None:
                barrier()
        self._encode(self.missing(), progress, preprocess_all=world_size == 1)

    def _encode(self, todo: list[str], progress: bool, preprocess_all: bool = True) -> None:
        """Encode ``todo`` (cases) into the cache and (re)write ``info.json``; nothing if empty."""
        if not todo:
            return
        if preprocess_all:  # (single process) the grid cache of every case, as before sharding
            self.source.build_cache(progress=progress)
        ae, ae_cfg, _ = load_autoencoder(self.ae_checkpoint, self.device)
        if ae.num_classes != self.reader.label_set.num_classes:
            raise GuideGenError(f"{self.ae_checkpoint}: autoencoder has {ae.num_classes} label classes, the dataset's "
                                f"label set {self.reader.label_set.name!r} has {self.reader.label_set.num_classes}")
        hu_range = tuple(ae_cfg.autoencoder.hu_range)
        shape = None
        for case in tqdm(todo, desc=f"encoding latents {self.grid}", disable=not progress):
            item = self.source._item(case)
            ct = torch.from_numpy(np.asarray(item["ct"], dtype=np.float32))[None, None]
            labels = torch.from_numpy(item["labels"].astype(np.int64))[None]
            z = encode_case(ae, ct, labels, hu_range)[0].numpy().astype(np.float32)
            shape = list(z.shape)
            with atomic_write(self.path(case)) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, latent=z, labels=item["labels"].astype(np.uint8),
                             spacing_mm=np.asarray(item["spacing_mm"], dtype=np.float32))
        write_json_atomic(self.dir / "info.json", {
            "version": LATENT_CACHE_VERSION, "autoencoder_checkpoint": str(self.ae_checkpoint),
            "autoencoder_sha256": self.ae_sha256, "autoencoder_latent_sha256": self.latent_sha256, "latent_scale": float(ae.latent_scale),
            "latent_shape": shape, "grid": list(self.grid), "hu_range": list(hu_range)})
        del ae
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()  # the LDM trains on this GPU next

    def _item(self, case: str) -> dict:
        p = self.path(case)
        if not p.is_file():
            raise GuideGenError(f"{p}: latent not cached; build the latent cache first (LatentDataset(..., build=True))")
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def spacing_of(self, case: str) -> np.ndarray:
        """(3,) voxel spacing in mm of ``case`` on the grid, read alone from its cache entry."""
        p = self.path(case)
        if not p.is_file():
            raise GuideGenError(f"{p}: latent not cached; build the latent cache first (LatentDataset(..., build=True))")
        with np.load(p) as z:
            return np.asarray(z["spacing_mm"], dtype=np.float64)

    def latent_stats(self) -> tuple[float, float]:
        """(mean, std) of the cached latents over all cases (≈ (0, 1) when the AE's scale is right)."""
        zs = np.concatenate([self._item(c)["latent"].ravel() for c in self.cases])
        return float(zs.mean()), float(zs.std())

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        item = self._item(case)
        rep = self.reader.report(case)
        return {
            "case": case,
            "text": rep.get("text") or "",
            "findings_json": json.dumps(rep.get("findings")),
            "latent": torch.from_numpy(item["latent"].astype(np.float32)),
            "labels": torch.from_numpy(item["labels"].astype(np.int64)),
            "spacing": torch.from_numpy(np.asarray(item["spacing_mm"], dtype=np.float32)),
        }
