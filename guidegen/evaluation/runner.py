"""``guidegen evaluate``: compare a synthetic set with a real one (DESIGN §8).

Sections, each a group of keys in ``metrics.json``:

- distribution — Fréchet distance and k-NN precision/recall in the feature space of a CT encoder
  trained here on the real set (``features.py``); optional slice-wise FID/LPIPS through
  torchmetrics with user-supplied local weights;
- label maps — per-organ volume W1 (relative), connected components, anatomical order, tumour
  placement and size against the synthetic set's findings;
- alignment — a MONAI UNet trained on real pairs segments the synthetic CT; Dice per class
  against the synthetic label map;
- text fidelity — attribute classifier (trained on real) accuracy on the synthetic pairs;
- usefulness — the same UNet trained on N synthetic vs N real pairs, Dice on held-out real.

The real set is split once, by a seeded random permutation (``EvalConfig.split_seed``,
``held_out_fraction``; :func:`split_real`): the feature net, segmenter and attribute classifier
train on the training part only, and every real reference figure (real features for the
distribution metrics, the alignment reference, attribute accuracy on real, the downstream test
set) is computed on the held-out part; ``metrics.json`` ``real_split`` records the seed, the
held-out case ids and which part each figure used. Sets under 4 cases are not split (in-sample,
flagged). Label-map statistics use every real case, resampled to the synthetic grid.

The networks are cached under ``REAL/cache/eval/`` (or ``OUT/cache/`` when the real set is
read-only), keyed by the real set's content hash and the settings, so a second evaluation
against the same real set skips their training.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from guidegen.errors import GuideGenError
from guidegen.evaluation.attributes import AttributeConfig, attribute_accuracy, train_attribute_classifier
from guidegen.evaluation.features import FeatureNetConfig, _cfg_dict, cached_model, extract_features, train_feature_net
from guidegen.evaluation.metrics import CaseStats, case_stats, frechet_distance, knn_precision_recall, match_tumors, mean_dice_per_class, relative_w1
from guidegen.evaluation.sets import EvalSet, ct_to_unit, dataset_digest, load_eval_set, open_dataset
from guidegen.io import write_json_atomic
from guidegen.models.segmenter import SegmenterConfig, build_segmenter, segment, train_segmenter


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation. ``grid`` must be divisible by 4 (the UNet halves it twice)."""

    grid: tuple[int, int, int] = (48, 48, 64)
    segmenter: SegmenterConfig = SegmenterConfig(steps=600)
    features: FeatureNetConfig = FeatureNetConfig(steps=300)
    attributes: AttributeConfig = AttributeConfig(steps=300)
    downstream: bool = True
    downstream_n: int | None = None  # None: as many as both sets allow
    downstream_steps: int | None = None  # None: the segmenter's steps
    held_out_fraction: float = 0.25
    split_seed: int = 0  # seed of the random train / held-out split of the real set (recorded in metrics.json)
    knn_k: int = 3
    montage_cases: int = 3
    quick: bool = False

    @classmethod
    def preset(cls, quick: bool, grid: tuple[int, int, int] | None = None, **overrides) -> "EvalConfig":
        """``quick``: small grid and few training steps (minutes on a CPU); else the full run."""
        if quick:
            cfg = cls(grid=(32, 32, 40), segmenter=SegmenterConfig(steps=150), features=FeatureNetConfig(steps=100),
                      attributes=AttributeConfig(steps=100), quick=True)
        else:
            cfg = cls()
        if grid is not None:
            cfg = replace(cfg, grid=tuple(grid))
        return replace(cfg, **overrides)

    def check(self) -> None:
        if any(g % 4 for g in self.grid):
            raise GuideGenError(f"--grid: every size must be divisible by 4, got {','.join(map(str, self.grid))}")


# ------------------------------------------------------------------------------ helpers
MIN_REFERENCE_CASES = 10  # real reference cases below which the distribution figures get a note


def pick_threads(requested: int | None = None) -> int:
    """Torch CPU threads for the evaluation nets: ``requested``, else the cores left idle.

    The nets are tiny, so extra threads help little, while threads competing with other busy
    processes for the same cores make every step many times slower (measured on 2 shared
    cores: 0.15 s/step with 1 thread vs 5.5 s with 2). Default: the cores not already busy
    (1-minute load average), at least 1 and at most torch's default.
    """
    if requested is not None:
        if requested < 1:
            raise GuideGenError(f"--threads must be at least 1, got {requested}")
        return int(requested)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = int((os.cpu_count() or 1) - busy)
    return max(1, min(free, torch.get_num_threads()))


def _round(x, nd: int = 4):
    if x is None:
        return None
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return round(float(x), nd)


def _per_class(values: np.ndarray, names: list[str], skip: tuple[int, ...] = (0,)) -> dict[str, float]:
    return {names[i]: _round(float(v)) for i, v in enumerate(values) if i not in skip and not np.isnan(v)}


def _mean(d: dict[str, float | None]) -> float | None:
    vals = [v for v in d.values() if v is not None]
    return _round(float(np.mean(vals))) if vals else None


def resolve_cache_dir(real_root: Path, out: Path) -> Path:
    """``REAL/cache/eval`` when writable (so evaluations of any synthetic set share it), else ``OUT/cache``."""
    target = real_root / "cache" / "eval"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / ".write_probe"
        probe.write_text("")
        probe.unlink()
        return target
    except OSError:
        return out / "cache"


MIN_SPLIT_CASES = 4  # below this the real set is not split (too few cases to train on and to hold out)


def split_real(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) case indices, each sorted: one seeded random split of ``range(n)``.

    ``round(n * fraction)`` cases are held out, at least 2 (the fewest a covariance or k-NN
    radius needs) and at most n - 2 (the fewest left to train on); the held-out ones are drawn
    by a permutation seeded with ``seed``, not taken from the end of the sorted case ids (which
    can follow acquisition date or scanner). With fewer than :data:`MIN_SPLIT_CASES` cases
    nothing is held out: ``(list(range(n)), [])``.
    """
    if n < MIN_SPLIT_CASES:
        return list(range(n)), []
    held = min(max(2, int(round(n * fraction))), n - 2)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[held:]), sorted(int(i) for i in perm[:held])


def shared_label_maps(real: EvalSet, synth: EvalSet) -> dict[int, int]:
    """``{synthetic index: real index}`` for every synthetic case whose label map (on the
    evaluation grid) is a real case's: a mask → CT set made from the real set's own maps
    (``generate --labels``). Such cases leak: their anatomy is the real case's."""
    import hashlib

    def key(labels: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()

    real_keys = {key(real.labels[j]): j for j in range(len(real))}
    return {i: real_keys[k] for i in range(len(synth)) if (k := key(synth.labels[i])) in real_keys}


def _with_digest(ds: EvalSet, index: list[int]) -> EvalSet:
    sub = ds.subset(index)
    sub.digest = dataset_digest(sub.reader, sub.cases)
    return sub


def trained_segmenter(train_set: EvalSet, cfg: SegmenterConfig, cache_dir: Path | None, name: str, progress: bool = False):
    """A UNet trained on ``train_set`` (cached by its content hash + ``cfg``); ``progress``: a bar while it trains."""
    n_cls = train_set.label_set.num_classes
    key = {"kind": "segmenter", "version": 1, "data": train_set.digest, "grid": list(train_set.labels.shape[1:]), **_cfg_dict(cfg)}

    def train(net):
        losses = train_segmenter(net, ct_to_unit(train_set.ct), train_set.labels, cfg, progress=f"train {name}" if progress else None)
        return {"final_loss": float(np.mean(losses[-10:])) if losses else None, "steps": cfg.steps, "cases": len(train_set)}

    return cached_model(cache_dir, name, key, lambda: build_segmenter(n_cls, cfg), train)


# ---------------------------------------------------------------------------- sections
def to_label_grid(labels: np.ndarray, affine: np.ndarray, grid: tuple[int, int, int], label_set) -> tuple[np.ndarray, np.ndarray]:
    """A label map brought to ``grid`` as the model's training data was: torso crop, then a
    nearest-neighbour resize (:func:`guidegen.data.cache.preprocess_case`, the evaluation grid's
    preprocessing too); returns (labels, diagonal RAS affine of the resized crop's spacing)."""
    from guidegen.data.cache import PreprocessConfig, preprocess_case
    from guidegen.io import ras_affine

    cfg = PreprocessConfig(grid=tuple(int(g) for g in grid), margin_voxels=2, label_set=label_set.name, with_ct=False)
    item = preprocess_case(np.asarray(labels), None, affine, cfg, label_set)
    return item["labels"], ras_affine(tuple(float(v) for v in item["spacing_mm"]))


def dataset_label_stats(root: Path, option: str, label_set, progress: bool = False,
                        grid: tuple[int, int, int] | None = None) -> list[tuple[str, CaseStats, dict | None]]:
    """``(case, CaseStats, findings dict or None)`` for every case of the dataset at ``root``, from
    its label maps (volumes in ml by each file's affine). ``grid``: a map of another shape is first
    brought to it with :func:`to_label_grid` (volumes then by the resized crop's spacing); None:
    native resolution. ``option`` names the CLI option in errors (e.g. ``--real``)."""
    return [(case, stats, f) for case, stats, f, _ in _label_stats_rows(root, option, label_set, progress, grid)]


def _label_stats_rows(root: Path, option: str, label_set, progress: bool, grid) -> list[tuple[str, CaseStats, dict | None, tuple]]:
    """As :func:`dataset_label_stats`, each row with the shape of the map as it was read."""
    from tqdm import tqdm

    reader = open_dataset(root, option)
    rows = []
    for case in tqdm(reader.case_ids(), desc=f"label stats ({option.lstrip('-')})", disable=not progress, unit="case"):
        rec = reader.load_case(case, with_ct=False)
        labels, affine = rec.labels, rec.affine
        shape = tuple(int(v) for v in labels.shape)
        if grid is not None and shape != tuple(grid):
            labels, affine = to_label_grid(labels, affine, grid, label_set)
        f = reader.report(case).get("findings")
        rows.append((case, case_stats(labels, affine, label_set), f if isinstance(f, dict) else None, shape))
    return rows


def label_map_metrics(real_root: Path, synth_root: Path, label_set, progress: bool = False) -> tuple[dict, dict]:
    """Label-map metrics; returns (metrics, plot data).

    Resolution-dependent statistics (connected components above all) must compare maps on one
    grid: when every synthetic map has the same shape (a ``generate`` set: the model grid), each
    real map of another shape is brought to that grid the way the model's training data was
    (:func:`to_label_grid`: torso crop + nearest-neighbour resize) before its statistics. Synthetic
    maps of mixed shapes (e.g. ``reconstruct`` outputs on users' grids): both sets stay native.
    """
    syn_rows = _label_stats_rows(synth_root, "--synthetic", label_set, progress, None)
    shapes = {r[3] for r in syn_rows}
    grid = next(iter(shapes)) if len(shapes) == 1 else None
    real_rows = _label_stats_rows(real_root, "--real", label_set, progress, grid)
    resampled = sum(r[3] != grid for r in real_rows) if grid is not None else 0
    sets = {"real": [r[:3] for r in real_rows], "synthetic": [r[:3] for r in syn_rows]}
    names = label_set.names
    organs = label_set.organ_ids
    vol = {role: np.stack([s.volumes_ml for _, s, _ in rows]) for role, rows in sets.items()}
    comp = {role: np.stack([s.components for _, s, _ in rows]) for role, rows in sets.items()}

    w1 = {names[c]: _round(relative_w1(vol["real"][:, c], vol["synthetic"][:, c])) for c in organs if vol["real"][:, c].mean() > 0}
    tid = label_set.tumor_id
    tumor_w1 = _round(relative_w1(vol["real"][:, tid], vol["synthetic"][:, tid])) if tid is not None and vol["real"][:, tid].mean() > 0 else None
    comp_real = {names[c]: _round(comp["real"][:, c].mean(), 3) for c in organs}
    comp_syn = {names[c]: _round(comp["synthetic"][:, c].mean(), 3) for c in organs}

    order_rates: dict[str, dict] = {}
    for role, rows in sets.items():
        checks: dict[str, list[bool]] = {}
        for _, s, _ in rows:
            for k, v in s.order.items():
                if v is not None:
                    checks.setdefault(k, []).append(v)
        order_rates[role] = {k: _round(np.mean(v)) for k, v in checks.items()}

    placements = []
    for case, s, f in sets["synthetic"]:
        requested = [t for t in (f or {}).get("tumors") or [] if isinstance(t, dict)]
        for r in match_tumors(requested, s, label_set):
            placements.append({"case": case, **r})
    placed = [p["placed"] for p in placements]
    sized = [p["size_ok"] for p in placements if p["size_ok"] is not None]
    # tumour regions beyond the number requested (a prompt without tumours should give none)
    unrequested = sum(max(len(s.tumors) - len((f or {}).get("tumors") or []), 0) for _, s, f in sets["synthetic"])
    metrics = {
        "organ_volume_w1": _mean(w1),
        "organ_volume_w1_per_class": w1,
        "tumor_volume_w1": tumor_w1,
        "components_mean_real": comp_real,
        "components_mean_synthetic": comp_syn,
        "components_excess": _round(float(np.mean([comp_syn[k] - comp_real[k] for k in comp_real]))),
        "anatomy_order_real": order_rates["real"],
        "anatomy_order_synthetic": order_rates["synthetic"],
        "anatomy_order_pass_rate": _mean(order_rates["synthetic"]),
        "tumor_requests": len(placements),
        "tumor_placement_rate": _round(np.mean(placed)) if placed else None,
        "tumor_size_rate": _round(np.mean(sized)) if sized else None,
        "tumor_regions_unrequested": int(unrequested),
        "tumor_placement_cases": placements,
        "label_map_grid": {
            "grid": list(grid) if grid is not None else None,
            "real_cases_resampled": int(resampled),
            "method": ("real maps of another shape: torso crop + nearest-neighbour resize to the synthetic grid" if grid is not None
                       else "native resolution (synthetic maps differ in shape)"),
        },
    }
    plots = {"volumes": vol, "names": names, "organs": organs}
    return metrics, plots


def slice_metrics(real: EvalSet, synth: EvalSet, inception_weights: Path | None, lpips_weights: Path | None, max_slices: int = 256) -> tuple[dict, list[str]]:
    """Optional 2D slice-wise FID / LPIPS (torchmetrics) from local weight files; (metrics, notes).

    Axial slices of CT, mapped from [-1000, 1000] HU to [0, 1] and replicated to 3 channels,
    as the paper's slice-wise metrics do. Anything missing (torchmetrics, a weight file) turns
    into a note, never an error: these metrics are optional.
    """
    out: dict = {"slice_fid": None, "slice_lpips": None}
    notes: list[str] = []
    if inception_weights is None and lpips_weights is None:
        notes.append("Slice-wise FID/LPIPS skipped: no --inception-weights / --lpips-weights given (no weights are downloaded).")
        return out, notes
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        notes.append("Slice-wise FID/LPIPS skipped: torchmetrics is not installed (pip install torchmetrics torch-fidelity).")
        return out, notes

    def slices(ds: EvalSet) -> torch.Tensor:
        x = (ct_to_unit(ds.ct) + 1.0) / 2.0  # (N, X, Y, Z) in [0, 1]
        s = torch.from_numpy(x).permute(0, 3, 2, 1).reshape(-1, 1, x.shape[2], x.shape[1])  # axial (Y, X) images
        idx = torch.linspace(0, len(s) - 1, min(max_slices, len(s))).long()
        return s[idx].repeat(1, 3, 1, 1)

    r, s = slices(real), slices(synth)
    if inception_weights is not None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(inception_weights))
            for i in range(0, len(r), 32):
                fid.update(r[i:i + 32], real=True)
            for i in range(0, len(s), 32):
                fid.update(s[i:i + 32], real=False)
            out["slice_fid"] = _round(float(fid.compute()))
        except Exception as exc:  # optional metric: report, do not fail the evaluation
            notes.append(f"Slice-wise FID failed with {inception_weights}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if lpips_weights is not None:
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            # torchvision looks for VGG16 weights in $TORCH_HOME/hub/checkpoints: point it at the user's file
            with tempfile.TemporaryDirectory() as home:
                ckpt = Path(home) / "hub" / "checkpoints"
                ckpt.mkdir(parents=True)
                os.symlink(Path(lpips_weights).resolve(), ckpt / "vgg16-397923af.pth")
                old = os.environ.get("TORCH_HOME")
                os.environ["TORCH_HOME"] = home
                try:
                    lp = LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True)
                finally:
                    if old is None:
                        os.environ.pop("TORCH_HOME", None)
                    else:
                        os.environ["TORCH_HOME"] = old
            n = min(len(r), len(s))
            for i in range(0, n, 32):  # unpaired sets: slice i of one vs slice i of the other (same relative height)
                lp.update(s[i:min(i + 32, n)], r[i:min(i + 32, n)])
            out["slice_lpips"] = _round(float(lp.compute()))
        except Exception as exc:
            notes.append(f"Slice-wise LPIPS failed with {lpips_weights}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return out, notes


# ------------------------------------------------------------------------------- driver
@dataclass
class EvalResult:
    metrics: dict
    metrics_path: Path
    report_path: Path
    seconds: float
    notes: list[str] = field(default_factory=list)


def evaluate(
    real: str | Path,
    synthetic: str | Path,
    out: str | Path,
    config: EvalConfig | None = None,
    *,
    inception_weights: str | Path | None = None,
    lpips_weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run every metric, write ``OUT/metrics.json`` and ``OUT/report.html``; return them.

    ``cache_dir``: where the trained networks are cached (default: ``REAL/cache/eval``);
    ``threads``: torch CPU threads while evaluating (default :func:`pick_threads`).
    """
    n_threads = pick_threads(threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return _evaluate(real, synthetic, out, config, inception_weights, lpips_weights, cache_dir, progress)
    finally:
        torch.set_num_threads(saved)


def _evaluate(real, synthetic, out, config, inception_weights, lpips_weights, cache_dir, progress) -> EvalResult:
    from guidegen.evaluation.report import write_report

    cfg = config or EvalConfig()
    cfg.check()
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GuideGenError(f"--out {out}: exists and is not a directory")
    for opt, p in (("--inception-weights", inception_weights), ("--lpips-weights", lpips_weights)):
        if p is not None and not Path(p).is_file():
            raise GuideGenError(f"{opt} {p}: file not found")
    real_set = load_eval_set(real, cfg.grid, option="--real", progress=progress)
    synth_set = load_eval_set(synthetic, cfg.grid, option="--synthetic", progress=progress)
    if real_set.label_set.name != synth_set.label_set.name:
        raise GuideGenError(f"--synthetic {synthetic}: label set {synth_set.label_set.name!r} differs from the real set's {real_set.label_set.name!r}")
    if len(real_set) < 2:
        raise GuideGenError(f"--real {real}: needs at least 2 cases (found {len(real_set)}) to fit the evaluation networks")
    if len(synth_set) < 2:
        raise GuideGenError(f"--synthetic {synthetic}: needs at least 2 cases (found {len(synth_set)}) for distribution metrics")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else resolve_cache_dir(real_set.root, out)
    ls = real_set.label_set
    names = ls.names
    notes: list[str] = []
    timings: dict[str, float] = {}
    metrics: dict = {}

    # real-set split ----------------------------------------------------------------
    # The evaluation networks (feature net, segmenter, attribute classifier) are trained on the
    # training part only and every real-set reference figure is computed on the held-out part,
    # so the real reference is out-of-sample for the networks, as the synthetic set is.
    train_idx, held_idx = split_real(len(real_set), cfg.held_out_fraction, cfg.split_seed)
    in_sample = not held_idx
    if in_sample:  # too few cases to split: train on all, reference figures in-sample (optimistic)
        real_train, real_ref = real_set, real_set
        notes.append(f"The real set has {len(real_set)} cases (fewer than {MIN_SPLIT_CASES}), too few to hold some out: the evaluation "
                     "networks are trained on all of them and the real reference figures (real features, attribute accuracy on real) "
                     "are in-sample, so they are optimistic; no held-out alignment reference or usefulness.")
    else:
        real_train, real_ref = _with_digest(real_set, train_idx), real_set.subset(held_idx)
    ref_part = "all" if in_sample else "held_out"
    train_part = "all" if in_sample else "train"
    for option, ds in (("--real", real_set), ("--synthetic", synth_set)):
        if ds.reader.incomplete:
            notes.append(f"{option} {ds.root}: dataset.json says status 'incomplete' (an interrupted run?): its {len(ds)} complete "
                         "case(s) are evaluated.")
    if len(real_ref) < MIN_REFERENCE_CASES:
        notes.append(f"The real reference has {len(real_ref)} case(s): Fréchet distance, precision and recall against so few are "
                     f"unstable (their k-nearest-neighbour radii above all); read them with at least {MIN_REFERENCE_CASES} held-out cases.")
    # synthetic cases that carry a real case's label map (mask -> CT from the real set)
    shared = shared_label_maps(real_set, synth_set)
    from_held_out = sorted(i for i, j in shared.items() if j in held_idx)
    if shared:
        notes.append(f"{len(shared)} of {len(synth_set)} synthetic cases have a real case's label map (a mask → CT set made from "
                     f"the real set): the label-map statistics compare those maps with themselves, and their alignment Dice uses "
                     f"maps the segmenter was trained on when the source is a training case; {len(from_held_out)} come from held-out "
                     "cases and are left out of the usefulness arm (they would train on the test anatomy).")
    metrics["synthetic_label_maps_from_real"] = {
        "cases": len(shared), "of": len(synth_set), "from_held_out": len(from_held_out),
        "real_cases": sorted({real_set.cases[j] for j in shared.values()}),
    }

    # distribution ------------------------------------------------------------------
    t = time.perf_counter()
    fnet, fmeta = train_feature_net(real_train, cfg.features, cache)
    f_real, f_syn = extract_features(fnet, real_ref), extract_features(fnet, synth_set)
    precision, recall = knn_precision_recall(f_real, f_syn, k=cfg.knn_k)
    metrics["frechet_distance"] = _round(frechet_distance(f_real, f_syn))
    metrics["precision"] = _round(precision)
    metrics["recall"] = _round(recall)
    metrics["feature_space"] = {
        "encoder": "3D conv encoder trained by guidegen on the real set (CT -> class volume fractions, sex, phase)",
        "dim": int(f_real.shape[1]), "cached": fmeta["cached"], "train_seconds": fmeta.get("seconds"), "k": cfg.knn_k,
        "train_cases": len(real_train), "real_reference_cases": len(real_ref), "real_reference_part": ref_part,
    }
    slice_out, slice_notes = slice_metrics(real_set, synth_set, Path(inception_weights) if inception_weights else None,
                                           Path(lpips_weights) if lpips_weights else None)
    metrics.update(slice_out)
    notes += slice_notes
    timings["distribution"] = time.perf_counter() - t

    # label maps --------------------------------------------------------------------
    t = time.perf_counter()
    lm, lm_plots = label_map_metrics(real_set.root, synth_set.root, ls, progress=progress)
    metrics.update(lm)
    timings["label_maps"] = time.perf_counter() - t

    # alignment ---------------------------------------------------------------------
    t = time.perf_counter()
    seg, smeta = trained_segmenter(real_train, cfg.segmenter, cache, "segmenter_real", progress=progress)
    pred = segment(seg, ct_to_unit(synth_set.ct))
    align = mean_dice_per_class(pred, synth_set.labels, ls.num_classes)
    metrics["alignment_dice"] = _per_class(align, names)
    metrics["alignment_dice_mean"] = _mean(metrics["alignment_dice"])
    ref = {}
    if not in_sample:  # the same net on held-out real cases: the ceiling synthetic alignment can reach
        ref_pred = segment(seg, ct_to_unit(real_ref.ct))
        ref = _per_class(mean_dice_per_class(ref_pred, real_ref.labels, ls.num_classes), names)
    metrics["alignment_dice_real_reference"] = ref
    # the ceiling over the classes the synthetic mean has (a class absent from every synthetic
    # map has no Dice there): both means then average the same classes
    scored = {k: v for k, v in ref.items() if metrics["alignment_dice"].get(k) is not None}
    metrics["alignment_dice_real_reference_mean"] = _mean(scored) if ref else None
    metrics["alignment_dice_classes"] = sum(v is not None for v in metrics["alignment_dice"].values())
    metrics["segmenter"] = {"train_cases": len(real_train), "steps": cfg.segmenter.steps, "cached": smeta["cached"], "train_seconds": smeta.get("seconds")}
    timings["alignment"] = time.perf_counter() - t

    # text fidelity -----------------------------------------------------------------
    t = time.perf_counter()
    anet, ameta, vocab = train_attribute_classifier(real_train, cfg.attributes, cache)
    acc = attribute_accuracy(anet, vocab, synth_set)
    metrics["attribute_accuracy_per_attribute"] = acc
    accs = [v["accuracy"] for v in acc.values() if v["accuracy"] is not None]
    metrics["attribute_accuracy"] = _round(float(np.mean(accs))) if accs else None
    # on the held-out real cases: a site the training part never shows counts as a miss, as for synthetic
    metrics["attribute_accuracy_real"] = {k: v["accuracy"] for k, v in attribute_accuracy(anet, vocab, real_ref).items()}
    metrics["attribute_classifier"] = {"train_cases": len(real_train), "real_accuracy_cases": len(real_ref), "real_accuracy_part": ref_part,
                                       "cached": ameta["cached"], "train_seconds": ameta.get("seconds")}
    timings["text_fidelity"] = time.perf_counter() - t

    # usefulness --------------------------------------------------------------------
    t = time.perf_counter()
    metrics["downstream_dice_synthetic"] = metrics["downstream_dice_real"] = None
    if not cfg.downstream:
        notes.append("Usefulness (downstream segmentation) skipped by configuration.")
    elif in_sample:
        notes.append(f"Usefulness skipped: the real set has {len(real_set)} cases; at least {MIN_SPLIT_CASES} are needed to hold some out.")
    elif len(from_held_out) == len(synth_set):
        notes.append("Usefulness skipped: every synthetic case carries a held-out real case's label map.")
    else:
        # synthetic cases drawn like the real split (seeded), never one made from a held-out map
        eligible = [i for i in range(len(synth_set)) if i not in from_held_out]
        n = min(len(eligible), len(train_idx), cfg.downstream_n or 10**9)
        synth_idx = sorted(int(i) for i in np.random.default_rng(cfg.split_seed).permutation(eligible)[:n])
        steps = cfg.downstream_steps or cfg.segmenter.steps
        dcfg = replace(cfg.segmenter, steps=steps)
        results = {}
        for arm, src, idx in (("synthetic", synth_set, synth_idx), ("real", real_set, train_idx[:n])):
            if arm == "real" and idx == train_idx and dcfg == cfg.segmenter:
                net = seg  # the alignment net was trained on exactly these cases with this recipe
            else:
                sub = _with_digest(src, idx)
                cdir = cache if arm == "real" else None  # synthetic sets change every run; do not cache them
                net, _ = trained_segmenter(sub, dcfg, cdir, f"segmenter_{arm}_n{n}", progress=progress)
            d = _per_class(mean_dice_per_class(segment(net, ct_to_unit(real_ref.ct)), real_ref.labels, ls.num_classes), names)
            results[arm] = d
        metrics["downstream_dice_synthetic"] = _mean(results["synthetic"])
        metrics["downstream_dice_real"] = _mean(results["real"])
        metrics["downstream_dice_synthetic_per_class"] = results["synthetic"]
        metrics["downstream_dice_real_per_class"] = results["real"]
        metrics["downstream"] = {"n_train": n, "n_test_real": len(held_idx), "steps": steps,
                                 "synthetic_cases": [synth_set.cases[i] for i in synth_idx]}
    timings["usefulness"] = time.perf_counter() - t

    ds_info = metrics.get("downstream")
    metrics["real_split"] = {
        "method": "seeded random permutation of the real set's sorted case ids" if not in_sample
        else f"none: fewer than {MIN_SPLIT_CASES} real cases, everything in-sample",
        "seed": cfg.split_seed, "held_out_fraction": cfg.held_out_fraction, "in_sample": in_sample,
        "train_cases": len(real_train), "held_out_cases": len(held_idx),
        "held_out_ids": [real_set.cases[i] for i in held_idx],
        # which part of the real set each network was trained on / each real figure was computed on
        "figures": {
            "feature_net": {"part": train_part, "cases": len(real_train)},
            "frechet_precision_recall_real_features": {"part": ref_part, "cases": len(real_ref)},
            "segmenter_real": {"part": train_part, "cases": len(real_train)},
            "alignment_dice_real_reference": None if in_sample else {"part": "held_out", "cases": len(held_idx)},
            "attribute_classifier": {"part": train_part, "cases": len(real_train)},
            "attribute_accuracy_real": {"part": ref_part, "cases": len(real_ref)},
            "downstream_real_train": {"part": "train", "cases": ds_info["n_train"]} if ds_info else None,
            "downstream_test": {"part": "held_out", "cases": ds_info["n_test_real"]} if ds_info else None,
            "label_map_statistics_real": {"part": "all", "cases": len(real_set)},  # no network involved
        },
    }
    metrics["sets"] = {
        "real": {"path": str(real_set.root), "cases": len(real_set), "digest": real_set.digest},
        "synthetic": {"path": str(synth_set.root), "cases": len(synth_set), "digest": synth_set.digest},
    }
    metrics["config"] = {**_cfg_dict(replace(cfg, segmenter=None, features=None, attributes=None)),
                         "segmenter": _cfg_dict(cfg.segmenter), "features": _cfg_dict(cfg.features), "attributes": _cfg_dict(cfg.attributes)}
    metrics["cache_dir"] = str(cache)
    metrics["notes"] = notes
    metrics["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics["environment"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}

    metrics_path = out / "metrics.json"
    write_json_atomic(metrics_path, metrics)
    report_path = write_report(out / "report.html", metrics, real_set, synth_set, lm_plots, f_real, f_syn, montage_cases=cfg.montage_cases)
    return EvalResult(metrics, metrics_path, report_path, time.perf_counter() - t0, notes)
