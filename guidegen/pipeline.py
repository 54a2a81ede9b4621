"""GuideGenPipeline: prompt → findings → condition → TCSS label map → latent → CT (DESIGN §6).

```python
from guidegen.pipeline import GuideGenPipeline

pipe = GuideGenPipeline.from_pretrained()            # shipped demo checkpoints, CPU
sample = pipe("62-year-old man, 4 cm mass in the left kidney", seed=0)
sample.labels  # (X, Y, Z) uint8 label ids        sample.ct  # (X, Y, Z) int16 HU, same grid
sample.affine  # (4, 4) RAS, spacing learned from the training data
```
A checkpoint root holds one exported checkpoint directory per stage: ``tcss/``,
``autoencoder/`` and ``ldm/`` (each ``model.safetensors`` + ``config.yaml`` + ``meta.json``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from guidegen.config import GuideGenConfig, load_config
from guidegen.errors import GuideGenError
from guidegen.labels import LabelSet, load_label_set
from guidegen.postprocess import clean_label_map
from guidegen.text.findings import Findings, parse_findings

STAGE_DIRS = ("tcss", "autoencoder", "ldm")


def default_checkpoint_root() -> Path:
    from guidegen.checkpoints import shipped_root

    return shipped_root() / "demo"


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → cuda when available else cpu; otherwise validated.

    A CUDA device without an index under torchrun (``LOCAL_RANK`` set) is this process's own
    GPU, ``cuda:LOCAL_RANK``: every rank on ``cuda:0`` would queue on (or exhaust) one GPU of
    the node while the others idle. An explicit ``cuda:N`` is kept as given.
    """
    import os

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GuideGenError(f"--device: unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GuideGenError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise GuideGenError(f"--device: unsupported device type {dev.type!r} (use cpu or cuda)")
    local_rank = os.environ.get("LOCAL_RANK")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        index = int(local_rank)
        if index >= torch.cuda.device_count():
            raise GuideGenError(f"LOCAL_RANK {index}: this node has only {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


def load_stage_config(ckpt_dir: Path, stage: str) -> tuple[GuideGenConfig, dict]:
    """Config and meta of an exported checkpoint directory, checked to be of ``stage``."""
    if not ckpt_dir.is_dir():
        raise GuideGenError(f"{ckpt_dir}: checkpoint directory not found")
    for name in ("model.safetensors", "config.yaml", "meta.json"):
        if not (ckpt_dir / name).is_file():
            raise GuideGenError(f"{ckpt_dir}: not a guidegen checkpoint (missing {name})")
    cfg = load_config(ckpt_dir / "config.yaml")
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    if meta.get("stage") != stage:
        raise GuideGenError(f"{ckpt_dir}: holds a {meta.get('stage')!r} checkpoint, expected {stage!r}")
    return cfg, meta


def check_sampler_options(*, seed: object = 0, steps: object = None, guidance: object = None, ct_steps: object = None,
                          ct_guidance: object = None) -> None:
    """Raise one line for a sampler option of the wrong type or range (``None``: the checkpoint's
    default): seeds are ints in [0, 2**63), step counts ints >= 1, guidance scales finite >= 0."""
    import math
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**63:
        raise GuideGenError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    for name, value in (("steps", steps), ("ct_steps", ct_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise GuideGenError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    for name, value in (("guidance", guidance), ("ct_guidance", ct_guidance)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0):
            raise GuideGenError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")


def check_label_array(labels: object, label_set: LabelSet, source: str = "labels") -> np.ndarray:
    """A user's label map as (X, Y, Z) uint8 ids of ``label_set``; raises one line naming
    ``source`` for anything else (not 3D, non-integer values, ids outside the set, all background)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise GuideGenError(f"{source}: label map must be 3D (X, Y, Z), got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        # a boolean mask is one structure, not a map of the label set's classes
        raise GuideGenError(f"{source}: label map must hold integer class ids, got dtype {labels.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.allclose(labels, np.rint(labels)):
            raise GuideGenError(f"{source}: label map must hold integer class ids, found non-integer values")
    ids = np.rint(labels).astype(np.int64)
    k = label_set.num_classes
    if ids.min() < 0 or ids.max() >= k:
        bad = sorted(set(np.unique(ids[(ids < 0) | (ids >= k)]).tolist()))[:5]
        raise GuideGenError(f"{source}: label ids {bad} are outside label set {label_set.name} (0..{k - 1}); "
                            "convert a TotalSegmentator or other map with `guidegen prepare` and pass its labels/<case>.nii.gz")
    if not ids.any():
        raise GuideGenError(f"{source}: the label map is all background (0): nothing to render")
    return ids.astype(np.uint8)


def prompt_findings(prompt: str) -> Findings:
    if not prompt or not prompt.strip():
        raise GuideGenError("the prompt is empty; describe the patient, e.g. '60-year-old woman, 3 cm liver mass'")
    return parse_findings(prompt)


@dataclass
class Sample:
    """One generated pair. ``ct`` is None for label-only generation."""

    prompt: str
    findings: Findings
    labels: np.ndarray  # (X, Y, Z) uint8
    affine: np.ndarray  # (4, 4)
    ct: np.ndarray | None = None  # (X, Y, Z) int16 HU
    seed: int = 0
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    # (labels uint8, CT int16 HU) on the model grid when the CT was generated on a resampled copy
    # of ``labels`` (a user's map on another grid); QC checks the HU calibration there
    model_grid: tuple[np.ndarray, np.ndarray] | None = None
    # a user's map is rendered on RAS axes (``labels``, ``ct`` and ``affine`` are on them);
    # ``guidegen.io.from_ras(array, native_axes)`` puts an array back on the map's own axes
    native_axes: np.ndarray | None = None


class LabelMapGenerator:
    """Stage 1 at inference: prompt → label map with the TCSS checkpoint."""

    def __init__(self, ckpt_dir: Path, device: torch.device):
        from guidegen.diffusion.categorical import cosine_schedule
        from guidegen.text.knowledge import TextConditioner
        from guidegen.training.tcss import build_tcss_model
        from guidegen.training.trainer import load_model_weights

        self.cfg, self.meta = load_stage_config(ckpt_dir, "tcss")
        self.label_set: LabelSet = load_label_set(self.meta.get("label_set", self.cfg.data.label_set))
        self.conditioner = TextConditioner(self.cfg.text, device=device)
        self.model = build_tcss_model(self.cfg, self.label_set, self.conditioner.text_dim)
        load_model_weights(self.model, ckpt_dir)
        self.model.to(device).eval()
        self.device = device
        self.alphas_bar = cosine_schedule(self.cfg.tcss.timesteps).to(device)
        self.grid = tuple(self.meta.get("grid", self.cfg.data.grid))
        self.spacing = tuple(self.meta.get("spacing_mm", (1.0, 1.0, 1.0)))
        # strengths of the findings' tumour constraints (site gate, volume matching) and the
        # sampling temperature; may be overridden
        self.site_gate = self.cfg.tcss.site_gate
        self.size_guidance = self.cfg.tcss.size_guidance
        self.site_gate_lesion_scale = self.cfg.tcss.site_gate_lesion_scale
        self.host_refill = self.cfg.tcss.size_guidance_host_refill
        self.temperature = self.cfg.tcss.temperature
        self.temper_prior_only = self.cfg.tcss.temper_prior_only
        self.churn = self.cfg.tcss.sample_churn
        self.window_t, self.window_share = self.cfg.tcss.sample_window_t, self.cfg.tcss.sample_window_share

    @torch.no_grad()
    def __call__(self, prompts: list[str], findings: list[Findings], seed: int, steps: int, guidance: float, progress: bool = False) -> np.ndarray:
        """(B, X, Y, Z) uint8 label maps for a batch of prompts."""
        from guidegen.training.tcss import TumorRequests, sample_label_maps

        cond = {k: v.to(self.device) for k, v in self.conditioner.prepare(prompts, findings).items()}
        requests = TumorRequests.from_findings(findings, self.label_set, self.spacing)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        maps = sample_label_maps(self.model, cond, self.grid, self.alphas_bar, self.label_set, steps=steps,
                                 guidance=guidance, generator=gen, site_gate=self.site_gate,
                                 size_guidance=self.size_guidance, size_guidance_pool=self.cfg.tcss.size_guidance_pool,
                                 site_gate_lesion_scale=self.site_gate_lesion_scale, host_refill=self.host_refill,
                                 requests=requests,
                                 temperature=self.temperature, temper_prior_only=self.temper_prior_only,
                                 churn=self.churn, window_t=self.window_t, window_share=self.window_share,
                                 progress=progress)
        return maps.cpu().numpy().astype(np.uint8)

    def affine(self) -> np.ndarray:
        from guidegen.io import ras_affine

        return ras_affine(self.spacing)


class CTGenerator:
    """Stages 3 + 2 at inference: (label map, prompt) → latent (LDM) → CT in HU (AE decoder)."""

    def __init__(self, ae_dir: Path, ldm_dir: Path, device: torch.device, label_set: LabelSet, conditioner=None):
        from guidegen.data.latents import checkpoint_sha256, latent_space_sha256, load_autoencoder
        from guidegen.text.knowledge import TextConditioner
        from guidegen.training.ldm import build_ldm_model
        from guidegen.training.trainer import load_model_weights

        self.cfg, self.meta = load_stage_config(ldm_dir, "ldm")
        if not (ae_dir / "model.safetensors").is_file():
            raise GuideGenError(f"{ae_dir}: autoencoder checkpoint not found (expected model.safetensors)")
        self.ae, self.ae_cfg, self.ae_meta = load_autoencoder(ae_dir, device)
        # The LDM needs the latent space it was trained in: the same encoder side and latent scale
        # (any decoder will do). Older metas only know the whole file's hash.
        want_space, want_file = self.meta.get("autoencoder_latent_sha256"), self.meta.get("autoencoder_sha256")
        if want_space and latent_space_sha256(ae_dir) != want_space:
            raise GuideGenError(f"{ae_dir}: this autoencoder's latent space (encoder, latent scale) is not the one the "
                                f"latent generator in {ldm_dir} was trained in")
        if not want_space and want_file and checkpoint_sha256(ae_dir) != want_file:
            raise GuideGenError(f"{ae_dir}: this autoencoder is not the one the latent generator in {ldm_dir} was trained with")
        self.label_set = label_set
        self.conditioner = conditioner if conditioner is not None else TextConditioner(self.cfg.text, device=device)
        self.model = build_ldm_model(self.cfg, label_set, self.conditioner.text_dim, self.ae.latent_channels, self.ae.downsample_factor)
        load_model_weights(self.model, ldm_dir)
        self.model.to(device).eval()
        self.device = device
        self.grid = tuple(self.meta.get("grid", self.cfg.data.grid))
        self.hu_range = tuple(self.ae_cfg.autoencoder.hu_range)
        # draw each voxel's residual from the autoencoder's texture tables (models/texture.py)
        # when it has them; False gives the decoder's deterministic output
        self.texture = self.ae.has_texture

    def versions(self) -> dict:
        return {
            "autoencoder": {k: self.ae_meta.get(k) for k in ("train_steps", "total_train_steps", "created", "weights")},
            "ldm": {**{k: self.meta.get(k) for k in ("train_steps", "total_train_steps", "created", "weights")}, "autoencoder_sha256": self.meta.get("autoencoder_sha256"),
                    "autoencoder_latent_sha256": self.meta.get("autoencoder_latent_sha256")},
        }

    @torch.no_grad()
    def on_grid(self, labels: np.ndarray, prompt: str, findings: Findings, seed: int, steps: int, guidance: float, progress: bool = False) -> np.ndarray:
        """CT (X, Y, Z) float32 HU for a label map already on the model grid."""
        from guidegen.models.autoencoder import norm_to_hu
        from guidegen.training.ldm import sample_latents

        lab = torch.from_numpy(labels.astype(np.int64))[None].to(self.device)
        cond = {k: v.to(self.device) for k, v in self.conditioner.prepare([prompt], [findings]).items()}
        latent_shape = (self.ae.latent_channels, *(n // self.ae.downsample_factor for n in self.grid))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        z = sample_latents(self.model, cond, lab, latent_shape, timesteps=self.cfg.ldm.timesteps, prediction=self.cfg.ldm.prediction,
                           sampler=self.cfg.ldm.sampler if steps < self.cfg.ldm.timesteps else "ddpm", steps=steps,
                           guidance=guidance, generator=gen, progress=progress)
        ct_norm = self.ae.decode_latent(z, lab)
        if self.texture:
            ct_norm = self.ae.add_texture(ct_norm, lab, gen)
        return norm_to_hu(ct_norm, self.hu_range)[0, 0].float().cpu().numpy()

    def __call__(self, labels: np.ndarray, prompt: str, findings: Findings, *, seed: int, steps: int | None = None,
                 guidance: float | None = None, progress: bool = False) -> tuple[np.ndarray, dict]:
        """CT int16 HU on the grid of ``labels`` (any grid: resampled to the model grid and back)."""
        ct, settings, _ = self.render(labels, prompt, findings, seed=seed, steps=steps, guidance=guidance, progress=progress)
        return ct, settings

    def render(self, labels: np.ndarray, prompt: str, findings: Findings, *, seed: int, steps: int | None = None,
               guidance: float | None = None, progress: bool = False) -> tuple[np.ndarray, dict, tuple[np.ndarray, np.ndarray] | None]:
        """As :meth:`__call__`, plus the (labels, CT int16 HU) pair on the model grid when ``labels``
        is on another grid (None when it is on the model grid: the CT itself is that pair's).

        Why keep it: the CT returned on the user's grid is resampled from the model grid (by class,
        :func:`upsample_ct_by_class`), so its organ levels say less about whether the generator
        is calibrated than the model-grid pair does."""
        from guidegen.data.cache import PreprocessConfig, resize_labels, torso_bbox

        steps = steps or self.cfg.ldm.sample_steps
        guidance = self.cfg.ldm.guidance if guidance is None else guidance
        settings = {"ct_sampler": self.cfg.ldm.sampler if steps < self.cfg.ldm.timesteps else "ddpm", "ct_steps": steps, "ct_guidance": guidance,
                    "ct_texture": bool(self.texture)}
        if tuple(labels.shape) == self.grid:
            return as_hu_int16(self.on_grid(labels, prompt, findings, seed, steps, guidance, progress)), settings, None
        # a user's label map: crop to the torso, resize to the model grid, paste the CT back
        box = torso_bbox(labels, self.label_set, PreprocessConfig(grid=self.grid).margin_voxels)
        crop = labels[box]
        small = resize_labels(crop, self.grid)
        ct_small = self.on_grid(small, prompt, findings, seed, steps, guidance, progress)
        ct = np.full(labels.shape, -1000.0, dtype=np.float32)
        ct[box] = upsample_ct_by_class(ct_small, small, crop)
        outside = fill_outside_box(ct, labels, box, self.label_set.body_id)
        settings["resampled_from_grid"] = list(self.grid)
        settings["labelled_outside_box"] = {"voxels": outside, "share": round(outside / max(int((labels > 0).sum()), 1), 4)}
        return as_hu_int16(ct), settings, (small.astype(np.uint8), as_hu_int16(ct_small))


def upsample_ct_by_class(ct_small: np.ndarray, labels_small: np.ndarray, labels: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """The model-grid CT (X', Y', Z') float HU on the grid of ``labels`` (X, Y, Z), each voxel
    interpolated from the model-grid CT of its own class only: (X, Y, Z) float32 HU.

    Why: plain trilinear resampling blends a structure with its neighbours over a whole model
    voxel (~8 mm on the demo grid), so on a finer map a rib voxel got lung and muscle mixed in
    (on three 2×-finer phantom maps the written rib median was ~270 HU against ~860 in the truth,
    docs/measurements.md) and the CT's edges did not follow the map the user trains on. Here, for class c, every model voxel takes the HU of its
    nearest class-c voxel (a Euclidean distance transform), and the map's class-c voxels are
    read from that volume with trilinear weights at the same coordinates ``resize_ct`` uses
    (half-voxel centres, edges clamped): a convex mix of class-c values only. A class the model
    grid lost (thinner than its voxels) is read from the plain CT.
    """
    from scipy import ndimage

    scale = np.asarray(ct_small.shape, np.float64) / np.asarray(labels.shape, np.float64)
    out = np.empty(labels.shape, np.float32)
    for c in np.unique(labels):
        own = labels_small == c
        source = np.asarray(ct_small, np.float32)
        if own.any() and not own.all():
            nearest = ndimage.distance_transform_edt(~own, return_distances=False, return_indices=True)
            source = source[tuple(nearest)]
        where = np.nonzero(labels == c)
        for start in range(0, where[0].size, chunk):  # bounded memory on large maps
            part = tuple(w[start:start + chunk] for w in where)
            coords = [(part[a] + 0.5) * scale[a] - 0.5 for a in range(3)]
            out[part] = ndimage.map_coordinates(source, coords, order=1, mode="nearest")
    return out


def fill_outside_box(ct: np.ndarray, labels: np.ndarray, box: tuple[slice, ...], body_id: int | None) -> int:
    """Give the labelled voxels of a user's map that lie outside the rendered torso ``box`` (legs,
    head or arms beyond the organs' z-range: the model is trained on torso crops, so squeezing
    them into its grid would distort the torso) their class's median HU inside the box, else
    the body envelope's; in place on ``ct`` (X, Y, Z) float HU. Returns how many voxels.

    Left at air they read as holes in the patient; filled, they are plain tissue, not generated.
    """
    inside = np.zeros(labels.shape, bool)
    inside[box] = True
    todo = (labels > 0) & ~inside
    if not todo.any():
        return 0
    crop_ct, crop_lab = ct[box], labels[box]

    def median_of(cid: int) -> float | None:
        vox = crop_ct[crop_lab == cid]
        return float(np.median(vox)) if vox.size else None

    fallback = median_of(body_id) if body_id is not None else None
    for cid in np.unique(labels[todo]):
        level = median_of(int(cid))
        level = level if level is not None else fallback
        ct[todo & (labels == cid)] = level if level is not None else 0.0
    return int(todo.sum())


def as_hu_int16(ct: np.ndarray) -> np.ndarray:
    """Float HU → int16 HU (rounded, clipped to the int16 range)."""
    return np.clip(np.rint(ct), -32768, 32767).astype(np.int16)


# ------------------------------------------------------------------------------ prompts


@dataclass
class PromptItem:
    """One prompt of a run. ``seed_offset``: added to ``--seed`` for its samples (0 for a
    one-prompt run; from the id for a prompts file, :func:`id_seed_offset`)."""

    id: str
    prompt: str
    seed_offset: int = 0


MAX_SEED = 2**62  # a --seed; the seeds derived from it stay below torch's 2**63


def id_seed_offset(prompt_id: str) -> int:
    """A prompt's seed offset from its id (SHA-256, < 2**28): a sample's seed depends on its own
    prompt id only, so inserting, removing or reordering lines of a prompts file leaves every
    other prompt's samples as they were (a re-run skips them instead of refusing them)."""
    import hashlib

    return int(hashlib.sha256(prompt_id.encode()).hexdigest()[:7], 16)


PROMPT_ID_KEYS = ("id", "case", "case_id")  # the id column / key (`case` as in reports.jsonl and prepare)
PROMPT_TEXT_KEYS = ("prompt", "text", "report")


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts from a file: plain text (``.txt`` or no suffix: one per line), CSV / TSV (an id
    column ``id``, ``case`` or ``case_id`` and a ``prompt``, ``text`` or ``report`` column) or
    JSONL (one object per line with the same keys).

    Ids default to ``p0000``, ``p0001``, ... in file order when a file has no id column (or a
    row leaves it empty); they name the output cases. A byte-order mark (Excel's UTF-8 CSV) is
    ignored; every problem names the file and, where it has one, the line.
    """
    import csv
    import io

    from guidegen.data.layout import check_case_id

    path = Path(path)
    if path.is_dir():
        raise GuideGenError(f"{path}: is a directory; expected a prompts file (.txt, .csv, .tsv or .jsonl)")
    if not path.is_file():
        raise GuideGenError(f"{path}: prompts file not found")
    suffix = path.suffix.lower()
    if suffix not in ("", ".txt", ".csv", ".tsv", ".jsonl"):
        raise GuideGenError(f"{path}: unknown prompts file type {suffix!r}; use .txt (one prompt per line), .csv, .tsv or .jsonl")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    rows: list[tuple[str, object, object]] = []  # (where, id or None, prompt)
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GuideGenError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise GuideGenError(f"{path}:{n}: each line must be a JSON object with a 'prompt' (or 'text') string")
            rows.append((f"{path}:{n}", _first_key(obj, PROMPT_ID_KEYS), _first_key(obj, PROMPT_TEXT_KEYS)))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        if not set(PROMPT_TEXT_KEYS) & set(columns):
            raise GuideGenError(f"{path}: needs a 'prompt' or 'text' column (has {', '.join(columns) or 'none'})")
        for row in reader:
            rows.append((f"{path}:{reader.line_num}", _first_key(row, PROMPT_ID_KEYS), _first_key(row, PROMPT_TEXT_KEYS)))
    else:
        rows = [(f"{path}:{n}", None, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not rows:
        raise GuideGenError(f"{path}: no prompts found")
    items: list[PromptItem] = []
    # ids name files: two that differ only in case are one file on macOS and Windows
    seen: dict[str, tuple[str, str]] = {}  # casefolded id -> (id, where)
    for i, (where, pid, prompt) in enumerate(rows):
        pid = f"p{i:04d}" if pid is None or str(pid).strip() == "" else str(pid).strip()
        try:
            check_case_id(pid)
        except GuideGenError as err:
            raise GuideGenError(f"{where}: {err}") from None
        if pid.casefold() in seen:
            first, first_where = seen[pid.casefold()]
            problem = (f"duplicate prompt id {pid!r} (first at {first_where})" if first == pid else
                       f"prompt id {pid!r} differs from {first!r} ({first_where}) only in case: one file name on "
                       "case-insensitive file systems")
            raise GuideGenError(f"{where}: {problem}")
        seen[pid.casefold()] = (pid, where)
        if not isinstance(prompt, str) or not prompt.strip():
            raise GuideGenError(f"{where}: prompt {pid!r} is empty or missing")
        items.append(PromptItem(pid, prompt, seed_offset=id_seed_offset(pid)))
    return items


def _first_key(row: dict, keys: tuple[str, ...]) -> object:
    """The value of the first of ``keys`` that ``row`` holds with a value (None when none does)."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


# ----------------------------------------------------------------------------- pipeline


def checkpoint_root(root: str | Path | None) -> Path:
    """The checkpoint root ``root`` (default: the shipped demo checkpoints), checked to exist."""
    root = Path(root) if root is not None else default_checkpoint_root()
    if not root.is_dir():
        raise GuideGenError(f"{root}: checkpoint directory not found")
    return root


def checkpoint_label_set(root: str | Path | None) -> LabelSet:
    """The label set of the checkpoints under ``root``, read from the TCSS stage's config and
    meta without loading any weights."""
    cfg, meta = load_stage_config(checkpoint_root(root) / "tcss", "tcss")
    return load_label_set(meta.get("label_set", cfg.data.label_set))


class GuideGenPipeline:
    """Prompt → (label map, CT). Stage 1 always; stages 2+3 unless ``labels_only``."""

    def __init__(self, labels: LabelMapGenerator, ct: "CTGenerator | None", checkpoint_root: Path, *, clean_labels: bool = True):
        self.labels = labels
        self.ct = ct
        self.checkpoint_root = checkpoint_root
        self.label_set = labels.label_set
        # sampled label maps get the stray-lesion, organ-part and isolated-voxel cleanup
        # (guidegen.postprocess); False keeps the raw output
        self.clean_labels = clean_labels

    @classmethod
    def from_pretrained(cls, root: str | Path | None = None, *, device: str | None = "auto", labels_only: bool = False,
                        clean_labels: bool = True, texture: bool = True) -> "GuideGenPipeline":
        """Load the stage checkpoints under ``root`` (default: the shipped demo checkpoints) on
        ``device`` (``"auto"``: a GPU when there is one, as the CLI's ``--device``; ``"cpu"`` for
        bitwise-reproducible samples).

        ``texture`` False renders the decoder's deterministic CT even when the autoencoder has
        texture tables (models/texture.py); ``settings.ct_texture`` in each meta says which.
        """
        dev = resolve_device(device)
        root = checkpoint_root(root)
        labels = LabelMapGenerator(root / "tcss", dev)
        ct = None
        if not labels_only:
            ldm_cfg, _ = load_stage_config(root / "ldm", "ldm")
            shared = labels.conditioner if ldm_cfg.text == labels.cfg.text else None  # one text encoder in memory
            ct = CTGenerator(root / "autoencoder", root / "ldm", dev, labels.label_set, conditioner=shared)
            ct.texture = ct.texture and texture
        return cls(labels, ct, root, clean_labels=clean_labels)

    def check_steps(self, steps: int | None, ct_steps: int | None) -> None:
        """Raise when a step count exceeds its checkpoint's diffusion timesteps (more network
        calls than timesteps is no sampler: the full ancestral chain is the most there is)."""
        for option, value, limit in (("--steps", steps, self.labels.cfg.tcss.timesteps),
                                     ("--ct-steps", ct_steps, self.ct.cfg.ldm.timesteps if self.ct is not None else None)):
            if value is not None and limit is not None and value > limit:
                raise GuideGenError(f"{option} must be at most the checkpoint's {limit} diffusion timesteps, got {value}")

    def versions(self) -> dict:
        """Identity of the loaded checkpoints (for the meta of each sample)."""
        out = {"tcss": {k: self.labels.meta.get(k) for k in ("train_steps", "total_train_steps", "created", "weights")}}
        if self.ct is not None:
            out.update(self.ct.versions())
        return out

    def generate(self, prompt: str, *, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 ct_steps: int | None = None, ct_guidance: float | None = None, labels: np.ndarray | None = None,
                 labels_affine: np.ndarray | None = None, progress: bool = False) -> Sample:
        """One sample. ``labels`` (X, Y, Z) on the user's grid skips stage 1 (mask → CT).

        ``None`` options take the checkpoints' defaults; every option is checked first (one
        :class:`GuideGenError` line naming it)."""
        check_sampler_options(seed=seed, steps=steps, guidance=guidance, ct_steps=ct_steps, ct_guidance=ct_guidance)
        seed = int(seed)  # a numpy integer is fine, but torch's generator wants a Python int
        self.check_steps(steps, ct_steps)
        if labels is not None:
            labels = check_label_array(labels, self.label_set)
            if self.ct is None:
                raise GuideGenError("labels: a pipeline loaded with labels_only=True cannot render a CT for a label map")
            if steps is not None or guidance is not None:
                raise GuideGenError("steps, guidance: not used with labels (the label map is given, not sampled; ct_steps and "
                                    "ct_guidance apply)")
            prompt = "" if prompt is None else prompt  # a mask alone is a valid request
        native_axes = None
        if labels is not None and labels_affine is not None:
            from guidegen.io import to_ras

            if (np.shape(labels_affine) != (4, 4) or not np.all(np.isfinite(labels_affine))
                    or abs(np.linalg.det(np.asarray(labels_affine, np.float64)[:3, :3])) < 1e-9):
                raise GuideGenError(f"labels_affine: must be a finite, invertible 4 x 4 matrix, got {np.asarray(labels_affine).tolist()}")
            # the models (and QC's anatomical order) read RAS axes: an LPS or permuted map is
            # flipped / permuted, never resampled, and Sample.native_axes turns results back
            labels, labels_affine, native_axes = to_ras(labels, labels_affine)
        if not isinstance(prompt, str):
            raise GuideGenError(f"the prompt must be a string, got {type(prompt).__name__}")
        findings = prompt_findings(prompt) if labels is None or prompt.strip() else Findings()
        tcfg = self.labels.cfg.tcss
        steps = steps or tcfg.sample_steps
        guidance = tcfg.guidance if guidance is None else guidance
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cleaned = {"isolated_voxels": None, "stray_tumor_voxels": None, "organ_part_voxels": None}  # voxels changed (None: not applied)
        if labels is None:
            label_map = self.labels([prompt], [findings], seed, steps, guidance, progress)[0]
            affine = self.labels.affine()
            if self.clean_labels:
                label_map, cleaned = clean_label_map(label_map, affine, self.label_set, findings.to_dict()["tumors"])
            timings["labels_s"] = round(time.perf_counter() - t0, 3)
        else:
            label_map, affine = labels, labels_affine if labels_affine is not None else np.eye(4)
        settings = {"tcss_steps": steps if labels is None else None, "tcss_guidance": guidance if labels is None else None,
                    "tcss_site_gate": self.labels.site_gate if labels is None else None,
                    "tcss_size_guidance": self.labels.size_guidance if labels is None else None,
                    "tcss_size_guidance_pool": self.labels.cfg.tcss.size_guidance_pool if labels is None else None,
                    "tcss_site_gate_lesion_scale": self.labels.site_gate_lesion_scale if labels is None else None,
                    "tcss_host_refill": self.labels.host_refill if labels is None else None,
                    "tcss_temperature": self.labels.temperature if labels is None else None,
                    "tcss_temper_prior_only": self.labels.temper_prior_only if labels is None else None,
                    "tcss_churn": self.labels.churn if labels is None else None,
                    "tcss_window_t": self.labels.window_t if labels is None else None,
                    "tcss_window_share": self.labels.window_share if labels is None else None,
                    "label_cleanup_voxels": cleaned["isolated_voxels"], "stray_tumor_voxels": cleaned["stray_tumor_voxels"],
                    "organ_part_voxels": cleaned["organ_part_voxels"]}
        ct = model_grid = None
        if self.ct is not None:
            t1 = time.perf_counter()
            ct, ct_settings, model_grid = self.ct.render(label_map, prompt, findings, seed=seed, steps=ct_steps,
                                                         guidance=ct_guidance, progress=progress)
            settings.update(ct_settings)
            timings["ct_s"] = round(time.perf_counter() - t1, 3)
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        return Sample(prompt=prompt, findings=findings, labels=label_map, affine=affine, ct=ct, seed=seed, timings=timings,
                      settings=settings, model_grid=model_grid, native_axes=native_axes)

    __call__ = generate


# ------------------------------------------------------------------------ batch writing


def sample_ids(items: list[PromptItem], n: int) -> list[tuple[str, PromptItem, int]]:
    """``(case id, prompt item, sample index)`` for every requested sample, in a fixed order."""
    return [(f"{it.id}_s{k}" if n > 1 else it.id, it, k) for it in items for k in range(n)]


def sample_seed(base_seed: int, item: PromptItem, k: int, attempt: int = 0) -> int:
    """Seed of sample ``k`` of ``item`` (``attempt`` > 0: a QC retry): independent of how the
    samples are sharded across ranks and of the other prompts of the run."""
    return base_seed + item.seed_offset + k + 1_000_003 * attempt


def sample_request(pipe: GuideGenPipeline, prompt: str, seed: int, *, steps: int | None = None, guidance: float | None = None,
                   ct_steps: int | None = None, ct_guidance: float | None = None, labels_file: str | None = None,
                   labels_digest: str | None = None) -> dict:
    """What decides one sample's content: its prompt, first seed, sampler options and models.

    Stored in ``meta/<id>.json`` (``request``) so that a re-run into the same ``--out`` can tell
    a finished sample of *this* request (skipped) from one made with other settings, another
    checkpoint or an edited prompt (refused: keeping it would mix two requests in one dataset
    under ids that no longer say what they hold). ``None`` options mean the checkpoint's
    defaults, which the models' identity pins; an option spelled out at its default value is
    recorded as ``None`` too (:func:`request_defaults`), so ``--steps 50`` and no ``--steps``
    are one request when 50 is the default.
    """
    request = {"prompt": prompt, "seed": seed, "labels_file": labels_file, "labels_digest": labels_digest, "tcss_steps": steps,
               "tcss_guidance": guidance, "tcss_temperature": pipe.labels.temperature, "ct_steps": ct_steps, "ct_guidance": ct_guidance,
               "labels_only": pipe.ct is None, "clean_labels": pipe.clean_labels,
               "ct_texture": pipe.ct.texture if pipe.ct is not None else None, "models": pipe.versions()}
    return without_defaults(request, request_defaults(pipe))


def request_defaults(pipe: GuideGenPipeline) -> dict:
    """The sampler options a request records as ``None``: the loaded checkpoints' defaults."""
    tcfg = pipe.labels.cfg.tcss
    defaults = {"tcss_steps": tcfg.sample_steps, "tcss_guidance": tcfg.guidance}
    if pipe.ct is not None:
        defaults.update(ct_steps=pipe.ct.cfg.ldm.sample_steps, ct_guidance=pipe.ct.cfg.ldm.guidance)
    return defaults


def without_defaults(request: dict, defaults: dict) -> dict:
    """``request`` with every option equal to its default replaced by ``None`` (its spelling for
    "the checkpoint's default")."""
    return {k: None if k in defaults and v is not None and v == defaults[k] else v for k, v in request.items()}


def _without_stage1(request: dict) -> dict:
    """A request without what only stage 1 (the label-map sampler) depends on."""
    models = {k: v for k, v in (request.get("models") or {}).items() if k != "tcss"}
    return {**{k: v for k, v in request.items() if k != "tcss_temperature"}, "models": models}


def check_finished_request(out: Path, case: str, request: dict, defaults: dict | None = None) -> None:
    """Raise when the finished ``case`` in ``out`` was generated for another ``request``.

    Samples written before requests were recorded (no ``request`` in their meta) are accepted.
    ``defaults`` (:func:`request_defaults`) also reads a stored option spelled out at its
    default (metas written before :func:`sample_request` normalised them) as ``None``.
    """
    meta_path = out / "meta" / f"{case}.json"
    try:
        done = json.loads(meta_path.read_text()).get("request")
    except (OSError, ValueError) as err:
        raise GuideGenError(f"{meta_path}: unreadable meta of a finished sample ({err})") from None
    if done is None:
        return
    defaults = defaults or {}
    done = without_defaults(done, defaults)
    wanted = json.loads(json.dumps(request))  # as the stored one reads back (tuples as lists, int keys as str)
    if wanted.get("labels_file") is not None:
        # mask -> CT samples no label map: the TCSS checkpoint (and its temperature) cannot change
        # the CT, so a new TCSS checkpoint leaves these samples valid
        done, wanted = (_without_stage1(r) for r in (done, wanted))
    differ = [k for k in wanted if done.get(k) != wanted[k]]

    def spelled(key: str, value):
        return f"the default ({defaults[key]!r})" if value is None and key in defaults else repr(value)

    if differ:
        shown = ", ".join(f"{k}: {spelled(k, done.get(k))} -> {spelled(k, wanted[k])}" if k != "models" else "models: other checkpoints"
                          for k in differ)
        raise GuideGenError(f"{meta_path}: this sample was generated with other settings ({shown}); "
                            f"write to another --out, or delete the sample to redo it")


def generate_dataset(pipe: GuideGenPipeline, items: list[PromptItem], out: str | Path, *, n: int = 1, seed: int = 0,
                     steps: int | None = None, guidance: float | None = None, ct_steps: int | None = None,
                     ct_guidance: float | None = None, qc_retries: int = 0, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> list[str]:
    """Generate every (prompt, k) sample into the dataset ``out``; returns the case ids written here.

    Finished samples (complete cases in ``out``) are skipped, so a killed run finishes on
    re-run. Under torchrun, rank r takes every world_size-th sample; the ranks share ``out``
    (rank 0 creates it, the others wait for its ``dataset.json``), and whichever rank finds
    every requested case complete after its own share finalizes the dataset (sorted,
    deduplicated ``reports.jsonl``, status complete). No rank waits for another: if one dies,
    the dataset stays "incomplete" and a re-run finishes and finalizes it.
    """
    from tqdm import tqdm

    from guidegen.data.layout import CaseRecord
    from guidegen.qc import quality_check

    if not 0 <= rank < world_size:
        raise GuideGenError(f"rank {rank} is outside world size {world_size} (check RANK / WORLD_SIZE)")
    if n < 1:
        raise GuideGenError(f"--n must be at least 1, got {n}")
    out = Path(out)
    writer = _open_dataset_writer(out, pipe, rank)
    samples = sample_ids(items, n)
    mine = [(cid, it, k) for i, (cid, it, k) in enumerate(samples) if i % world_size == rank]
    requests = {cid: sample_request(pipe, it.prompt, sample_seed(seed, it, k), steps=steps, guidance=guidance, ct_steps=ct_steps,
                                    ct_guidance=ct_guidance) for cid, it, k in samples}
    # every finished sample (of every rank's share) is checked before any new one is drawn: a
    # conflict found half-way, or by another rank only, would leave a dataset that mixes requests
    defaults = request_defaults(pipe)
    for cid, _, _ in samples:
        if writer.has_case(cid):
            check_finished_request(out, cid, requests[cid], defaults)
    todo = [(cid, it, k) for cid, it, k in mine if not writer.has_case(cid)]
    if todo:
        writer.mark_incomplete()
    written = []
    for cid, it, k in tqdm(todo, desc=f"generate (rank {rank})" if world_size > 1 else "generate", disable=not progress, unit="sample"):
        request = requests[cid]
        attempts = []
        for attempt in range(qc_retries + 1):
            s = sample_seed(seed, it, k, attempt)
            sample = pipe.generate(it.prompt, seed=s, steps=steps, guidance=guidance, ct_steps=ct_steps, ct_guidance=ct_guidance)
            qc = quality_check(sample, pipe)
            attempts.append({"seed": s, "passed": qc["passed"], "failures": qc["failures"]})
            if qc["passed"]:
                break
        meta = {
            "source": "guidegen generate",
            "prompt_id": it.id,
            "sample_index": k,
            "seed": sample.seed,
            "settings": sample.settings,
            "timings": sample.timings,
            "models": pipe.versions(),
            "request": request,
            "qc": {**qc, "attempts": attempts, "retried": len(attempts) > 1},
        }
        writer.write_case(CaseRecord(case=cid, labels=sample.labels, affine=sample.affine, ct=sample.ct, text=it.prompt,
                                     findings=sample.findings.to_dict(), meta=meta))
        warn_qc(cid, meta["qc"])
        written.append(cid)
    # The last rank to finish sees every case and finalizes; two ranks finishing together both
    # do, one after the other (finalize is idempotent and locked against report appends).
    if all(writer.has_case(cid) for cid, _, _ in samples):
        writer.finalize()
    return written


GENERATE_SOURCES = ("guidegen generate", "guidegen generate --labels")  # dataset.json "source" of what generate writes


def check_generate_out(out: Path) -> None:
    """Refuse an ``--out`` that is not a new or empty directory or a dataset ``generate`` wrote:
    adding synthetic cases to a training set (a phantom or ``prepare`` output) would mix them in
    and rewrite its ``dataset.json``."""
    from guidegen.data.layout import DatasetReader, check_output_root

    if check_output_root(out, overwrite_option=False) == "resume":
        source = DatasetReader(out).info.get("source")
        if source not in GENERATE_SOURCES:
            raise GuideGenError(f"{out}: holds a dataset written by {source or 'another tool'!s}, not by guidegen generate; "
                                "choose a new or empty --out (synthetic cases would mix into it)")


def _open_dataset_writer(out: Path, pipe: GuideGenPipeline, rank: int, wait_s: float = 600.0, source: str = "guidegen generate"):
    """The dataset writer of one rank: rank 0 creates (or resumes) ``out``, the others resume it.

    Two ranks creating one directory would race (the second sees a non-empty directory), so
    ranks > 0 wait up to ``wait_s`` for rank 0's ``dataset.json`` (torchrun stops the job if
    rank 0 fails first).
    """
    from guidegen.data.layout import DatasetWriter

    marker = out / "dataset.json"
    if rank > 0:
        deadline = time.monotonic() + wait_s
        while not marker.is_file():
            if time.monotonic() > deadline:
                raise GuideGenError(f"{out}: rank 0 did not create the dataset within {wait_s:.0f} s")
            time.sleep(0.2)
    if rank == 0:
        check_generate_out(out)
    mode = "resume" if marker.is_file() else "new"
    return DatasetWriter(out, name="guidegen-synthetic", label_set=pipe.label_set.name, mode=mode,
                         info={"source": source, "checkpoints": str(pipe.checkpoint_root.name)})


def single_prompt_id(prompt: str, seed: int) -> str:
    """Case id of a one-prompt run: stable for (prompt, seed), distinct across prompts and seeds."""
    import hashlib

    return f"gen_{hashlib.sha256(prompt.strip().encode()).hexdigest()[:8]}_seed{seed}"


def run_generate_command(*, prompt: str | None, out: Path, prompts_file: Path | None, n: int, seed: int, steps: int | None,
                         guidance: float | None, ct_steps: int | None, ct_guidance: float | None, checkpoint: Path | None,
                         device: str, labels_only: bool, labels_path: Path | None, qc_retries: int,
                         raw_labels: bool = False, temperature: float | None = None, texture: bool = True) -> list[str]:
    """The ``guidegen generate`` command: validate options, load, generate, write.

    ``temperature`` overrides the checkpoint's TCSS sampling temperature (``tcss.temperature``,
    applied by its ``tcss.temper_prior_only`` rule); the meta of each sample records it.
    ``texture`` False renders the decoder's deterministic CT even when the autoencoder has texture
    tables (``settings.ct_texture`` in the meta says which).
    """
    if n < 1:
        raise GuideGenError(f"--n must be at least 1, got {n}")
    if qc_retries < 0:
        raise GuideGenError(f"--qc-retries must be >= 0, got {qc_retries}")
    if not 0 <= seed < MAX_SEED:  # below 2**63 with every offset a sample's seed gets (k, prompt id, retries)
        raise GuideGenError(f"--seed must be >= 0 and < 2**62, got {seed}")
    check_sampler_options(seed=seed, steps=steps, guidance=guidance, ct_steps=ct_steps, ct_guidance=ct_guidance)
    if temperature is not None and not 0 < temperature < float("inf"):
        raise GuideGenError(f"--temperature must be a finite number > 0, got {temperature}")
    if labels_path is not None and labels_only:
        raise GuideGenError("--labels and --labels-only exclude each other")
    if (prompt is None) == (prompts_file is None) and labels_path is None:
        raise GuideGenError("give one PROMPT argument or --prompts FILE")
    if prompts_file is not None and prompt is not None:
        raise GuideGenError("give either a PROMPT argument or --prompts FILE, not both")
    resolve_device(device)
    if labels_path is not None:
        # the mask -> CT path samples no label map: options of stage 1 (and of a batch) would
        # be silently ignored, so they are refused
        ignored = [name for name, given in (("--prompts", prompts_file is not None), ("--steps", steps is not None),
                                            ("--guidance", guidance is not None), ("--temperature", temperature is not None),
                                            ("--raw-labels", raw_labels), ("--qc-retries", qc_retries > 0)) if given]
        if ignored:
            raise GuideGenError(f"{', '.join(ignored)}: not used with --labels (the label map is given, not sampled; "
                                "--n, --ct-steps, --ct-guidance, --seed and --no-texture apply)")
        from guidegen.data.layout import check_out_apart_from_inputs

        check_out_apart_from_inputs(out, {"--labels": labels_path})  # new CTs among the maps they are made from
        return generate_for_label_maps(label_map_jobs(labels_path, prompt), out, checkpoint, device, seed=seed, n=n,
                                       ct_steps=ct_steps, ct_guidance=ct_guidance, texture=texture)
    items = read_prompts(prompts_file) if prompts_file is not None else [PromptItem(single_prompt_id(prompt or "", seed), prompt or "")]
    # fail on an empty prompt before loading any model; say which prompts give no findings
    blank = [it.id for it in items if prompt_findings(it.prompt) == Findings()]
    if blank:
        shown = ", ".join(blank[:3]) + (f" and {len(blank) - 3} more" if len(blank) > 3 else "")
        print(f"warning: no findings (sex, age, tumour, stage, phase) read from prompt {shown}: only the sentence "
              "conditions the label map (prompts are read in English; `guidegen parse \"...\"` shows what is read)", file=sys.stderr)
    from guidegen.training.common import launch_rank

    rank, world = launch_rank()
    if rank == 0:  # a foreign --out fails now, not after the models load (the other ranks wait for rank 0's dataset)
        check_generate_out(out)
    pipe = GuideGenPipeline.from_pretrained(checkpoint, device=device, labels_only=labels_only, clean_labels=not raw_labels,
                                            texture=texture)
    pipe.check_steps(steps, ct_steps)  # before anything is written
    if temperature is not None:
        pipe.labels.temperature = temperature
    written = generate_dataset(pipe, items, out, n=n, seed=seed, steps=steps, guidance=guidance, ct_steps=ct_steps,
                               ct_guidance=ct_guidance, qc_retries=qc_retries, rank=rank, world_size=world)
    print(f"{len(written)} sample(s) written to {out}" + (f" by rank {rank}" if world > 1 else ""))
    return written


def labels_stem(labels_path: Path) -> str:
    """The case-id stem of a user's label map file: its name without the NIfTI suffix, characters
    a case id cannot hold replaced by ``_`` (``my case.nii.gz`` → ``my_case``)."""
    import re

    from guidegen.io import strip_nifti_suffix

    return re.sub(r"[^A-Za-z0-9._-]+", "_", strip_nifti_suffix(labels_path.name)).strip("._-") or "labels"


def labels_digest(labels: np.ndarray, affine: np.ndarray) -> str:
    """SHA-256 (16 hex digits) of a label map's shape, voxels (uint8) and affine: what tells two
    maps of the same file name apart (TotalSegmentator names every patient's map
    ``segmentations.nii.gz``)."""
    import hashlib

    h = hashlib.sha256()
    h.update(str(tuple(labels.shape)).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    h.update(np.asarray(affine, dtype=np.float64).round(6).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class LabelMapJob:
    """One user label map of a mask → CT run: its file, the case-id stem and the prompt."""

    path: Path
    stem: str
    prompt: str


def label_map_jobs(labels_path: Path, prompt: str | None) -> list[LabelMapJob]:
    """The label maps ``--labels`` names: one NIfTI file; every case of a guidegen dataset (a
    ``prepare`` output or another generated set: each case's report text is its prompt unless
    ``prompt`` is given, and its case id the stem); or every ``.nii`` / ``.nii.gz`` file of a
    directory (the stem from the file name). ``prompt`` None means no PROMPT argument."""
    if labels_path.is_file():
        return [LabelMapJob(labels_path, labels_stem(labels_path), prompt or "")]
    if not labels_path.is_dir():
        raise GuideGenError(f"{labels_path}: label map not found")
    if (labels_path / "dataset.json").is_file():
        from guidegen.evaluation.sets import open_dataset

        reader = open_dataset(labels_path, "--labels")
        return [LabelMapJob(reader.labels_path(c), c, prompt if prompt is not None else reader.report(c).get("text") or "")
                for c in reader.case_ids()]
    from guidegen.io import is_nifti

    files = sorted(f for f in labels_path.iterdir() if f.is_file() and is_nifti(f) and not f.name.startswith("."))
    if not files:
        raise GuideGenError(f"{labels_path}: directory holds no label maps (.nii / .nii.gz files) and no guidegen dataset")
    jobs, seen = [], {}
    for f in files:
        stem = labels_stem(f)
        if stem.casefold() in seen:  # case ids name files: one name on case-insensitive file systems
            raise GuideGenError(f"{f}: gives case id {stem!r} as {seen[stem.casefold()].name} does; rename one of them")
        seen[stem.casefold()] = f
        jobs.append(LabelMapJob(f, stem, prompt or ""))
    return jobs


def read_user_label_map(path: Path, label_set: LabelSet) -> tuple[np.ndarray, np.ndarray]:
    """A user's label map as stored (X, Y, Z) uint8 ids and its affine (axes not reoriented),
    checked to hold integer ids of ``label_set`` and not only background."""
    from guidegen.io import load_nifti

    native, affine = load_nifti(path, reorient_to_ras=False)
    return check_label_array(native, label_set, str(path)), affine


def generate_for_label_maps(jobs: list[LabelMapJob], out: Path, checkpoint: Path | None, device: str, *, seed: int, n: int = 1,
                            ct_steps: int | None = None, ct_guidance: float | None = None, texture: bool = True,
                            progress: bool = True) -> list[str]:
    """Mask → CT: ``n`` CTs (seeds ``seed`` … ``seed + n - 1``, case ids ``<stem>_seed<S>``) for
    each user label map, each returned on the map's own grid, axes and affine (an LPS or
    permuted map is turned to RAS for the model and the CT turned back). Returns this rank's
    case ids (written now or found finished).

    Every map this rank renders is read and checked (ids outside the label set, all background)
    and a foreign ``--out`` refused before any model loads; finished samples are checked against
    the request before a new one is drawn; under torchrun ranks share the samples as
    :func:`generate_dataset` does.
    """
    from tqdm import tqdm

    from guidegen.data.layout import CaseRecord
    from guidegen.io import from_ras
    from guidegen.qc import quality_check
    from guidegen.training.common import launch_rank

    label_set = checkpoint_label_set(checkpoint)
    rank, world = launch_rank()
    samples = [(f"{job.stem}_seed{seed + k}", job, seed + k) for job in jobs for k in range(n)]
    mine = [sample for i, sample in enumerate(samples) if i % world == rank]
    digests: dict[Path, str] = {}

    def digest(job: LabelMapJob) -> str:
        if job.path not in digests:
            digests[job.path] = labels_digest(*read_user_label_map(job.path, label_set))
        return digests[job.path]

    for _, job, _ in mine:  # read here so a bad map fails before the models load
        digest(job)
    if rank == 0:
        check_generate_out(out)
        if not any(job.prompt.strip() for job in jobs):
            print("warning: no prompt: the CT is conditioned on the label map alone (no sex, age, phase or tumour findings; "
                  "give a PROMPT, or a guidegen dataset whose reports are the prompts)", file=sys.stderr)
    pipe = GuideGenPipeline.from_pretrained(checkpoint, device=device, texture=texture)
    pipe.check_steps(None, ct_steps)  # before anything is written
    writer = _open_dataset_writer(out, pipe, rank, source="guidegen generate --labels")

    def request(job: LabelMapJob, s: int) -> dict:
        return sample_request(pipe, job.prompt, s, ct_steps=ct_steps, ct_guidance=ct_guidance, labels_file=job.path.name,
                              labels_digest=digest(job))

    # every finished sample, of every rank's share, is checked before any new one is drawn (as
    # generate_dataset does): a conflict seen by one rank only would leave a mixed dataset
    defaults = request_defaults(pipe)
    for case, job, s in samples:
        if writer.has_case(case):
            check_finished_request(out, case, request(job, s), defaults)
    todo = [(case, job, s) for case, job, s in mine if not writer.has_case(case)]
    if len(todo) < len(mine):
        print(f"{len(mine) - len(todo)} sample(s) already generated in {out}, skipped" + (f" by rank {rank}" if world > 1 else ""))
    if todo:
        writer.mark_incomplete()
    desc = f"mask to CT (rank {rank})" if world > 1 else "mask to CT"
    for case, job, s in tqdm(todo, desc=desc, unit="sample", disable=not progress or len(todo) < 2):
        native, native_affine = read_user_label_map(job.path, label_set)
        sample = pipe.generate(job.prompt, seed=s, ct_steps=ct_steps, ct_guidance=ct_guidance, labels=native, labels_affine=native_affine)
        qc = quality_check(sample, pipe)
        meta = {"source": "guidegen generate --labels", "labels_file": job.path.name, "seed": s, "settings": sample.settings,
                "timings": sample.timings, "models": pipe.versions(), "request": request(job, s), "qc": qc}
        ct = from_ras(sample.ct, sample.native_axes)  # on the map's own axes, as the map is written
        writer.write_case(CaseRecord(case=case, labels=native, affine=native_affine, ct=ct, text=job.prompt,
                                     findings=sample.findings.to_dict(), meta=meta))
        warn_qc(case, qc)
    if all(writer.has_case(case) for case, _, _ in samples):
        writer.finalize()
    if todo:
        print(f"{len(todo)} sample(s) written to {out}" + (f" by rank {rank}" if world > 1 else ""))
    return [case for case, _, _ in mine]


def warn_qc(case: str, qc: dict) -> None:
    """One ``warning:`` line on stderr for a sample that failed QC (the details are in its meta)."""
    if not qc.get("passed", True):
        shown = "; ".join(qc["failures"][:3]) + (f"; and {len(qc['failures']) - 3} more" if len(qc["failures"]) > 3 else "")
        print(f"warning: {case}: QC failed ({shown}); see meta/{case}.json", file=sys.stderr)
