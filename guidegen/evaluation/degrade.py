"""Degraded copies of a dataset: a known-bad "synthetic" set to check that the metrics notice.

Three independent faults, each aimed at one metric family:
- scanner-like Gaussian noise on the CT (distribution features),
- the label map shifted by a few voxels relative to the CT (alignment Dice),
- every reported tumour moved to a wrong organ in the findings (tumour placement).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guidegen.data.layout import CaseRecord, DatasetReader, DatasetWriter

# a far-away organ for each tumour site, so a "wrong" site never touches the real tumour
WRONG_SITE = {"lung": "urinary_bladder", "urinary_bladder": "lung", "heart": "colon", "esophagus": "colon"}


def shift_labels(labels: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """Translate an (X, Y, Z) label map by whole voxels; uncovered voxels become 0."""
    out = np.zeros_like(labels)
    src, dst = [], []
    for s, n in zip(shift, labels.shape):
        s = int(np.clip(s, -n, n))
        src.append(slice(max(-s, 0), n - max(s, 0)))
        dst.append(slice(max(s, 0), n - max(-s, 0)))
    out[tuple(dst)] = labels[tuple(src)]
    return out


def wrong_site_findings(findings: dict | None) -> dict | None:
    """Findings with each tumour's site replaced by a distant organ (lung for abdominal sites)."""
    if not isinstance(findings, dict):
        return findings
    tumors = []
    for t in findings.get("tumors") or []:
        t = dict(t)
        t["site"] = WRONG_SITE.get(t.get("site"), "lung")
        t["side"] = ("left" if t.get("side") != "left" else "right") if t["site"] in ("lung", "kidney", "adrenal_gland") else None
        tumors.append(t)
    return {**findings, "tumors": tumors}


def write_degraded_copy(src: str | Path, out: str | Path, *, noise_hu: float = 80.0, shift_voxels: int = 3,
                        wrong_site: bool = True, seed: int = 0) -> Path:
    """Copy dataset ``src`` to ``out`` with noise, a label shift of ``shift_voxels`` (x and y) and wrong sites."""
    reader = DatasetReader(src)
    writer = DatasetWriter(out, name=f"degraded-{reader.info.get('name', 'dataset')}", label_set=reader.label_set.name, mode="overwrite",
                           info={"source": "degraded copy", "noise_hu": noise_hu, "shift_voxels": shift_voxels, "wrong_site": wrong_site})
    rng = np.random.default_rng(seed)
    for case in reader.case_ids():
        rec = reader.load_case(case)
        ct = None if rec.ct is None else rec.ct.astype(np.float32) + rng.normal(0.0, noise_hu, rec.ct.shape).astype(np.float32)
        labels = shift_labels(rec.labels, (shift_voxels, shift_voxels, 0)) if shift_voxels else rec.labels
        findings = wrong_site_findings(rec.findings) if wrong_site else rec.findings
        writer.write_case(CaseRecord(case, labels, rec.affine, ct, rec.text, findings, {"source": "degraded copy", "of": case}), preview=False)
    writer.finalize()
    return Path(out)
