"""Load a dataset directory (DESIGN §4) for evaluation: pairs on a fixed grid + reports.

Every set that ``evaluate`` reads — phantom sets, prepared real sets, ``generate`` outputs — is
in the one dataset layout, so one loader serves them all. CT and labels are brought to the
evaluation grid with the training preprocessing (crop to the torso, resize; labels nearest, CT
trilinear) and reuse its on-disk cache when the dataset directory is writable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guidegen.data.cache import PreprocessCache, PreprocessConfig, preprocess_case
from guidegen.data.layout import DatasetReader
from guidegen.errors import GuideGenError
from guidegen.labels import LabelSet

# HU → network input: soft tissue, lung and most bone stay distinguishable in [-1, 1]
CT_LOW, CT_HIGH = -1000.0, 1000.0


def ct_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU (any shape) → float32 in [-1, 1], clipped to [CT_LOW, CT_HIGH] HU first."""
    hu = np.clip(np.asarray(hu, dtype=np.float32), CT_LOW, CT_HIGH)
    return (2.0 * (hu - CT_LOW) / (CT_HIGH - CT_LOW) - 1.0).astype(np.float32)


@dataclass
class EvalSet:
    """One evaluated set on the evaluation grid.

    ``labels`` (N, X, Y, Z) uint8 label ids; ``ct`` (N, X, Y, Z) float32 HU; ``findings`` one
    dict (or None) per case from ``reports.jsonl``; ``digest`` a short hash of the files, used
    as the cache key of the networks trained on this set.
    """

    root: Path
    reader: DatasetReader
    cases: list[str]
    labels: np.ndarray
    ct: np.ndarray
    findings: list[dict | None]
    texts: list[str]
    digest: str
    label_set: LabelSet = field(repr=False, default=None)  # type: ignore[assignment]
    spacing: np.ndarray | None = None  # (N, 3) mm per voxel of the evaluation grid

    def __len__(self) -> int:
        return len(self.cases)

    def subset(self, index: list[int] | np.ndarray) -> "EvalSet":
        idx = [int(i) for i in index]
        return EvalSet(self.root, self.reader, [self.cases[i] for i in idx], self.labels[idx], self.ct[idx],
                       [self.findings[i] for i in idx], [self.texts[i] for i in idx], self.digest, self.label_set,
                       None if self.spacing is None else self.spacing[idx])


def open_dataset(root: str | Path, option: str) -> DatasetReader:
    """A :class:`DatasetReader` whose errors name the CLI option (``--real`` / ``--synthetic``)."""
    try:
        reader = DatasetReader(root)
    except GuideGenError as exc:
        raise GuideGenError(f"{option}: {exc}") from None
    if not reader.case_ids():
        raise GuideGenError(f"{option} {root}: dataset has no complete cases (no meta/<case>.json with labels/<case>.nii.gz)")
    return reader


def dataset_digest(reader: DatasetReader, cases: list[str]) -> str:
    """Short content hash of a set: case ids, file sizes and the head and tail of every volume.

    Reading the head and tail (64 KiB each) instead of whole files keeps this fast for large real
    sets while still changing whenever a volume is rewritten (gzip trailers hold the CRC).
    """
    h = hashlib.sha256()
    for case in cases:
        for path in (reader.labels_path(case), reader.ct_path(case)):
            h.update(f"{case}/{path.parent.name}".encode())
            if not path.is_file():
                continue
            size = path.stat().st_size
            h.update(str(size).encode())
            with open(path, "rb") as fh:
                h.update(fh.read(65536))
                if size > 65536:
                    fh.seek(max(size - 65536, 65536))
                    h.update(fh.read())
    return h.hexdigest()[:16]


def load_eval_set(root: str | Path, grid: tuple[int, int, int], *, option: str = "--real", progress: bool = False) -> EvalSet:
    """Read every complete case of ``root`` onto ``grid``; CT is required for every case."""
    reader = open_dataset(root, option)
    cases = reader.case_ids()
    missing = [c for c in cases if not reader.ct_path(c).is_file()]
    if missing:
        raise GuideGenError(
            f"{option} {root}: {len(missing)} of {len(cases)} case(s) have no CT (first: ct/{missing[0]}.nii.gz); evaluate needs CT + label pairs"
        )
    cfg = PreprocessConfig(grid=tuple(int(g) for g in grid), margin_voxels=2, label_set=reader.label_set.name, with_ct=True)
    cache = PreprocessCache(reader.root, cfg)
    labels, cts, findings, texts, spacing = [], [], [], [], []
    from tqdm import tqdm

    for case in tqdm(cases, desc=f"loading {option.lstrip('-')}", disable=not progress, unit="case"):
        item = cache.load(case)
        if item is None or item.get("ct") is None:
            rec = reader.load_case(case, with_ct=True)
            if rec.ct is None or rec.ct.shape != rec.labels.shape:
                raise GuideGenError(f"{option} {root}: case {case}: CT shape {None if rec.ct is None else rec.ct.shape} differs from labels {rec.labels.shape}")
            item = preprocess_case(rec.labels, rec.ct, rec.affine, cfg, reader.label_set)
            try:  # the cache is a convenience; a read-only dataset is still evaluated
                cache.store(case, item)
            except OSError:
                pass
        labels.append(np.asarray(item["labels"], dtype=np.uint8))
        cts.append(np.asarray(item["ct"], dtype=np.float32))
        spacing.append(np.asarray(item["spacing_mm"], dtype=np.float32))
        rep = reader.report(case)
        findings.append(rep.get("findings") if isinstance(rep.get("findings"), dict) else None)
        texts.append(rep.get("text") or "")
    return EvalSet(reader.root, reader, cases, np.stack(labels), np.stack(cts), findings, texts,
                   dataset_digest(reader, cases), reader.label_set, np.stack(spacing))
