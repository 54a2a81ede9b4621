"""``guidegen train {tcss,autoencoder,ldm}``: build a stage's dataset and task, fit, export.

The run directory holds the training state (resumable) and, at the end, ``RUN/export/`` — the
small inference checkpoint (DESIGN §7) that ``generate`` loads.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np

from guidegen.config import GuideGenConfig, dump_config, load_config
from guidegen.errors import GuideGenError
from guidegen.io import write_json_atomic, write_text_atomic
from guidegen.labels import load_label_set

STAGES = ("tcss", "autoencoder", "ldm")


# The config sections each stage's weights depend on; other sections may change between
# sessions (e.g. a preset gains an ldm section while its autoencoder run is still going).
STAGE_SECTIONS = {"tcss": ("data", "text", "tcss"), "autoencoder": ("data", "autoencoder"), "ldm": ("data", "text", "ldm")}


# train keys a resumed run may change: the step budget, and cadences that do not touch the
# weights (samples are drawn under their own RNG state; workers only prefetch)
RESUMABLE_TRAIN_KEYS = ("max_steps", "log_every", "sample_every", "checkpoint_every", "num_workers")


def _stage_view(cfg: GuideGenConfig, stage: str) -> dict:
    view = {k: v for k, v in cfg.model_dump(mode="json").items() if k in STAGE_SECTIONS[stage]}
    for key in RESUMABLE_TRAIN_KEYS:
        view[stage]["train"].pop(key, None)
    return view


def _changed_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (``tcss.train.lr``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new)) for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if old != new else []


def _check_run_config(out: Path, cfg: GuideGenConfig, stage: str) -> None:
    """A run keeps the config it started with; resuming with a different one is refused."""
    saved = out / "config.yaml"
    if saved.is_file() and (out / "checkpoint").exists():
        old = load_config(saved)
        changed = _changed_keys(_stage_view(old, stage), _stage_view(cfg, stage))
        if changed:
            shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise GuideGenError(f"{saved}: this run was started with a different config ({shown} changed; only "
                                f"{', '.join(f'train.{k}' for k in RESUMABLE_TRAIN_KEYS)} may change on resume); "
                                "use a new --out or the same --config")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, dump_config(cfg))


DATA_RECORD = "data.json"  # in a run directory: the dataset the run started on


def dataset_record(reader) -> dict:
    """``{"name", "cases", "digest"}`` of a training set: its folder name, complete cases and a
    hash of their ids and file sizes (cheap on thousands of cases; a rewritten volume of the
    same size is not seen)."""
    import hashlib

    h = hashlib.sha256()
    cases = reader.case_ids()
    for case in cases:
        sizes = [p.stat().st_size if p.is_file() else -1 for p in (reader.labels_path(case), reader.ct_path(case))]
        h.update(f"{case}:{sizes[0]}:{sizes[1]};".encode())
    return {"name": reader.root.name, "cases": len(cases), "digest": h.hexdigest()[:16]}


def check_run_data(out: Path, reader) -> dict:
    """Record the training set a run starts on (``out/data.json``) and warn when a resume uses
    another one or an incomplete one: the resume is then not exact (the data order follows the
    case list), which may be intended (more data) but should never be silent."""
    from guidegen.training.common import launch_rank, warn_run

    record = dataset_record(reader)
    if reader.incomplete:
        warn_run(f"{reader.root}: dataset.json says status {reader.info.get('status')!r} (an interrupted phantom, "
                 f"prepare or generate run?): training on its {record['cases']} complete case(s)", out)
    path = out / DATA_RECORD
    started = None
    if path.is_file():
        try:
            started = json.loads(path.read_text())
        except ValueError:
            started = None
    if started is not None and (out / "checkpoint").exists() and started.get("digest") != record["digest"]:
        warn_run(f"--data {reader.root}: not the dataset this run started on ({started.get('name')}, {started.get('cases')} "
                 f"cases; now {record['name']}, {record['cases']} cases): resuming on it, the data order is not the original's", out)
    if launch_rank()[0] == 0:
        write_json_atomic(path, record)
    return record


def data_geometry(dataset) -> dict:
    """Mean spacing / extent (mm) of the training grid over the dataset's cache (for output affines)."""
    spacings = np.stack([dataset.spacing_of(c) for c in dataset.cases])
    return {"grid": list(dataset.grid), "spacing_mm": spacings.mean(0).round(4).tolist(), "spacing_mm_std": spacings.std(0).round(4).tolist()}


def init_from_checkpoint(trainer, ckpt_dir: str | Path) -> None:
    """Start a *new* run from an exported checkpoint's weights (fine-tuning / continuing a demo).

    Only the weights (and the EMA copy) are taken; optimizer state and step start fresh. A run
    that already has its own training checkpoint resumes from that instead (exact resume wins).
    Modules the model lists in ``INIT_MAY_LACK`` (output-neutral additions, e.g. the AE's
    per-class readout) may be absent from the checkpoint; they start from their initialisation,
    as do those in ``INIT_MAY_DIFFER`` (measured again at export) stored in another shape.
    """
    from guidegen.training.trainer import load_model_weights

    if trainer.step > 0:
        return
    model = trainer.modules["model"]
    load_model_weights(model, ckpt_dir, may_lack=getattr(model, "INIT_MAY_LACK", ()),
                       may_differ=getattr(model, "INIT_MAY_DIFFER", ()))
    if "model" in trainer.ema:
        trainer.ema["model"].module.load_state_dict(model.state_dict())


LINEAGE_FILE = "lineage.json"  # in a run directory: the parent checkpoint a run started from


def run_lineage(out: Path, init_from: str | Path | None, resuming: bool, write: bool = True) -> dict | None:
    """The parent a run's weights descend from: ``{"train_steps": parent total, "created": ...}``.

    ``train_steps`` is the parent's ``total_train_steps`` (else its ``train_steps``). Recorded in
    ``out/lineage.json`` when a new run starts (``write``: on the main process only) and read back
    when the run resumes, with or without ``--init-from`` (the weights then come from the run's own
    checkpoint, so the recorded parent is the true one even if ``init_from`` was since replaced).
    None for a run trained from scratch, and for runs started before this file existed.
    """
    from guidegen.training.trainer import read_checkpoint_meta

    path = out / LINEAGE_FILE
    if resuming:
        return json.loads(path.read_text()) if path.is_file() else None
    lineage = None
    if init_from is not None:
        parent = read_checkpoint_meta(init_from)
        lineage = {"train_steps": int(parent.get("total_train_steps", parent.get("train_steps", 0))), "created": parent.get("created")}
    if write and lineage is not None:
        write_json_atomic(path, lineage)
    elif write:
        path.unlink(missing_ok=True)  # left by an attempt that stopped before its first checkpoint: not this run's parent
    return lineage


def lineage_meta(lineage: dict, steps: int) -> dict:
    """Meta keys of a run descended from ``lineage`` (:func:`run_lineage`): the parent and the total.

    ``train_steps`` stays this run's own count; ``total_train_steps`` adds the parent's total
    (``lineage["train_steps"]``: the parent's own total), so chains of continued runs add up.
    """
    return {"init_from": lineage, "total_train_steps": int(lineage["train_steps"]) + int(steps)}


def training_hu_reference(ct_dataset, label_set, max_cases: int = 64, statistic: str | None = None) -> dict:
    """Per-class ranges of HU levels (``statistic``, default ``qc.HU_STATISTIC``) over (up to
    ``max_cases``) training cases, for generate's QC."""
    from guidegen.qc import HU_STATISTIC, hu_reference

    n = min(len(ct_dataset), max_cases)
    pairs = ((ct_dataset[i]["ct"][0].numpy(), ct_dataset[i]["labels"].numpy()) for i in range(n))
    return hu_reference(pairs, label_set, statistic or HU_STATISTIC)


def run_training(stage: str, config: str | Path | None, data: str | Path, out: str | Path, *, max_steps: int | None = None,
                 progress: bool = True, init_from: str | Path | None = None) -> Path:
    """Train ``stage`` on the dataset ``data`` in run directory ``out``; returns the export dir.

    ``init_from``: an exported checkpoint of the same stage and config whose weights start a
    new run (ignored when ``out`` already holds a training checkpoint).
    """
    if stage not in STAGES:
        raise GuideGenError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    cfg = load_config(config)
    out = Path(out)
    _check_run_config(out, cfg, stage)
    from guidegen.training.trainer import Trainer, export_checkpoint, find_checkpoint

    # a resume takes its weights, frozen encoder included, from the run's own checkpoint
    if stage == "autoencoder" and cfg.autoencoder.freeze_encoder and init_from is None and find_checkpoint(out) is None:
        raise GuideGenError("autoencoder.freeze_encoder fine-tunes the decoder of a trained autoencoder: "
                            "pass --init-from CHECKPOINT (the one whose latent space to keep)")
    label_set = load_label_set(cfg.data.label_set)
    from guidegen.data.layout import DatasetReader

    reader = DatasetReader(data)
    if reader.label_set.name != label_set.name:
        raise GuideGenError(f"{data}: dataset label set {reader.label_set.name!r} differs from the config's {label_set.name!r}")
    data_record = check_run_data(out, reader)
    if stage == "tcss":
        task, dataset, meta = _tcss_setup(cfg, label_set, data)
    elif stage == "autoencoder":
        task, dataset, meta = _autoencoder_setup(cfg, label_set, data)
    else:
        task, dataset, meta = _ldm_setup(cfg, label_set, data, out)
    train_cfg = getattr(cfg, stage).train
    trainer = Trainer(out, train_cfg, task, dataset, progress=progress)
    lineage = run_lineage(out, init_from, resuming=trainer.step > 0, write=trainer.is_main)
    if init_from is not None:
        init_from_checkpoint(trainer, init_from)
    # fit() has written the checkpoint (also when interrupted) before it returns: a kill during
    # the export below loses nothing that a resume needs.
    result = trainer.fit(max_steps=max_steps)
    export = out / "export"
    previous = _export_identity(export)  # read before the barrier: rank 0 replaces it after
    trainer.accelerator.wait_for_everyone()  # the last collective of the run; none after it
    if not trainer.is_main:
        # The replicas are identical: rank 0 alone measures (an AE's latent scale and texture
        # over up to 64 volumes; export_meta holds no collective) and writes. The others wait for
        # its export on the file system, not in a barrier that a long export could time out.
        _wait_for_export(export, previous)
        return export
    meta.update(task.export_meta(trainer) if hasattr(task, "export_meta") else {})
    if lineage is not None:
        meta.update(lineage_meta(lineage, trainer.step))
    if stage == "ldm":
        from guidegen.qc import HU_STATISTIC

        meta["hu_reference"] = training_hu_reference(dataset.source, label_set)
        meta["hu_reference_statistic"] = HU_STATISTIC
    stopped_by = signal.Signals(result.stop_signal).name if result.stop_signal else None
    export_checkpoint(trainer, export, stage, cfg, {**meta, "data": data_record, "interrupted": result.interrupted, "stop_signal": stopped_by})
    return export


def _export_identity(export: Path) -> tuple[int, int, int] | None:
    """Which file ``export/meta.json`` is (device, inode, mtime), None when there is none."""
    try:
        st = (export / "meta.json").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def _wait_for_export(export: Path, previous: tuple[int, int, int] | None, poll_s: float = 0.5) -> None:
    """Wait until rank 0 has put a new export in place (written atomically: a new ``meta.json``).

    No timeout: if rank 0 fails, the launcher (torchrun, accelerate launch) ends the others.
    """
    import time

    while (now := _export_identity(export)) is None or now == previous:
        time.sleep(poll_s)


def _tcss_setup(cfg: GuideGenConfig, label_set, data):
    from guidegen.data.datasets import LabelMapDataset
    from guidegen.text.knowledge import TextConditioner
    from guidegen.training.common import build_cache_on_ranks, text_cache_dir
    from guidegen.training.tcss import TCSSTask

    dataset = LabelMapDataset(data, cfg.data.grid)
    build_cache_on_ranks(dataset)
    conditioner = TextConditioner(cfg.text, cache_dir=text_cache_dir(data))
    meta = {"label_set": label_set.name, "text_encoder": conditioner.encoder.encoder_id, **data_geometry(dataset)}
    return TCSSTask(cfg, label_set, conditioner, spacing_mm=tuple(meta["spacing_mm"])), dataset, meta


def _autoencoder_setup(cfg: GuideGenConfig, label_set, data):
    from guidegen.data.datasets import CTLabelDataset
    from guidegen.training.autoencoder import AutoencoderTask
    from guidegen.training.common import build_cache_on_ranks

    dataset = CTLabelDataset(data, cfg.data.grid)
    build_cache_on_ranks(dataset)
    meta = {"label_set": label_set.name, **data_geometry(dataset)}
    return AutoencoderTask(cfg, label_set), dataset, meta


def _ldm_setup(cfg: GuideGenConfig, label_set, data, out=None):
    from guidegen.training.ldm import ldm_setup

    return ldm_setup(cfg, label_set, data, out)
