"""``guidegen prepare``: turn a user's CT, TotalSegmentator masks and reports into a dataset.

Inputs (matched to cases by id):

- CT: ``<id>.nii[.gz]`` files, or ``<id>/`` folders holding one DICOM series each.
- Organ labels: TotalSegmentator output, either one multi-label ``<id>.nii.gz`` with the
  ``total`` task's ids (v1 or v2, recognised per file from the lungs unless
  ``totalseg_version`` sets it; see ``guess_totalseg_version``) or one folder ``<id>/``
  of per-class binary masks named by class (``liver.nii.gz``, ``kidney_left.nii.gz``, ...; a
  ``body.nii.gz`` there is used as the body envelope). Classes are mapped to the label set by
  name (lateral pairs, lung lobes, vertebrae, ribs merged); TotalSegmentator classes that the
  label set does not use (trachea, femur, muscles, ...) fall back to background / body.
- Tumour masks (optional): ``<id>.nii.gz``; every non-zero voxel becomes the tumour class.
- Body masks (optional): ``<id>.nii.gz``; otherwise the envelope is derived from the CT.
- Reports (optional): CSV/TSV or JSONL with a case-id and a text column.

Findings and their check against the label map: a case's findings (what conditions the
generator next to the text) come from its report (``--findings report``, the default), or its
tumours from the label map (``--findings masks``: site, side and equivalent-sphere diameter per
tumour region, see :func:`findings_from_masks`; sex, age, TNM, phase and smoking still from the
report, whose text is stored unchanged); a case without a report always gets findings and a
short text derived from the map. Every case with a report is checked against its label map with
the evaluation's tumour matching (:func:`guidegen.evaluation.metrics.match_tumors`): a tumour the
report names that the map lacks, a map tumour region the report does not name, a tumour in
another organ (or side) than the report says, a size more than ±50 % off. Disagreements are
*warnings*, not problems: the case is still written, with the details in its meta
(``findings_check``, ``warnings``), one line per warning in ``<out>/warnings.txt`` (after a
dry run: below the table) and the counts in the summary line.

Design decision — one pass, per case: every case is validated completely (all of its problems
collected, not just the first) and, only if it has none, written right away by the same worker.
A bad case therefore never writes anything and never stops the good ones; at the end every
problem of the run (input matching, reports and all cases) is listed, one line each with the
file and the reason, and the CLI exits with code 2. Validating everything first and writing in
a second pass would read every volume twice, which is the slow part on real data.

A case is complete when its ``meta/<id>.json`` exists (the layout's commit marker), so a re-run
into the same ``--out`` skips complete cases and redoes interrupted ones.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from guidegen.data.cache import PreprocessCache, PreprocessConfig, preprocess_case, torso_bbox
from guidegen.data.datasets import cache_sources
from guidegen.data.dicom import looks_like_dicom_folder, read_dicom_series
from guidegen.data.layout import CaseRecord, DatasetReader, DatasetWriter, check_case_id, check_out_apart_from_inputs
from guidegen.data.totalseg import BODY_CLASS_NAMES, guess_totalseg_version, known_class_names, lung_ratio, totalseg_classes
from guidegen.errors import GuideGenError
from guidegen.evaluation.metrics import CaseStats, TumorComponent, case_stats, match_tumors, midline_x_mm
from guidegen.io import is_nifti, load_nifti, spacing_from_affine, strip_nifti_suffix, write_text_atomic
from guidegen.labels import LabelSet, load_label_set

BODY_HU_THRESHOLD = -500.0  # DESIGN §2: tissue of the body envelope is denser than this
AIR_HU_REQUIRED = -500.0  # a torso CT in HU has air (outside, lungs) below this somewhere
ID_COLUMNS = ("case", "id", "case_id")
TEXT_COLUMNS = ("text", "report", "report_text")
FINDINGS_SOURCES = ("report", "masks")  # --findings: where a case's tumour findings come from
# Warnings: the case is still written. kind → what the summary line counts the cases by.
WARNINGS_FILE = "warnings.txt"  # in --out: one line per warning of the run
WARNING_KINDS = {
    "report_tumor_missing": "the report names a tumour the label map lacks",
    "site_mismatch": "the report puts a tumour in another organ or side than the label map",
    "size_mismatch": "the report's tumour size is more than ±50 % off the label map's",
    "map_tumor_unreported": "the label map has a tumour region the report does not name",
    "unknown_class_file": "unknown class file(s) in the per-class folder ignored",
    "no_orientation": "the CT file has no orientation (NIfTI qform and sform codes 0): left and right may be swapped",
}


# ----------------------------------------------------------------------------- data types
@dataclass
class PrepareOptions:
    """Settings of one prepare run (picklable: it travels to the worker processes)."""

    label_set: str = "guidegen22"
    # Table of multi-label ids: 1, 2 or "auto" (per file from its content, 2 when undecidable;
    # see load_multilabel). The CLI passes "1"/"2" as strings; parse_totalseg_version accepts both.
    totalseg_version: int | str = "auto"
    grid: tuple[int, int, int] = (48, 48, 64)
    margin_mm: float = 10.0
    geometry_tol_mm: float = 1e-3
    direction_tol: float = 1e-4
    previews: bool = True
    # Tumour findings of a case with a report: "report" (parsed from it) or "masks" (measured on
    # the label map, the report's other fields kept); see parse_findings_source.
    findings: Literal["report", "masks"] = "report"


@dataclass
class CaseInputs:
    """The matched input files of one case."""

    case: str
    ct: Path  # NIfTI file or DICOM series folder
    labels: Path  # multi-label NIfTI file or per-class folder
    tumor: Path | None = None
    body: Path | None = None
    report: str | None = None  # report text, when the reports file has one

    @property
    def ct_kind(self) -> str:
        return "dicom" if self.ct.is_dir() else "nifti"

    @property
    def labels_kind(self) -> str:
        return "per-class" if self.labels.is_dir() else "multi-label"


@dataclass
class CaseResult:
    """Outcome of one case: ``status`` is written, valid (dry run), skipped or invalid."""

    case: str
    status: str
    problems: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    warnings: list[dict] = field(default_factory=list)  # {"kind", "message", "note"}; the case is still written


@dataclass
class PrepareReport:
    """What a run did: per-case results plus problems that belong to no single case."""

    results: list[CaseResult]
    input_problems: list[str]
    out: Path | None
    dry_run: bool
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def problems(self) -> list[str]:
        return self.input_problems + [p for r in self.results for p in r.problems]

    @property
    def warnings(self) -> list[str]:
        """Every warning of the cases written, valid (dry run) or skipped, one line each:
        ``<case>: <message>`` (an invalid case's problems come first)."""
        return [f"{r.case}: {w['message']}" for r in self.results if r.status != "invalid" for w in r.warnings]

    def warning_counts(self) -> dict[str, int]:
        """``{warning kind: number of cases with it}`` (kinds of :data:`WARNING_KINDS`, in that order),
        over the cases written, valid (dry run) or skipped: an invalid case's problems come first."""
        counts = {kind: sum(r.status != "invalid" and any(w["kind"] == kind for w in r.warnings) for r in self.results) for kind in WARNING_KINDS}
        return {kind: n for kind, n in counts.items() if n}

    def summary_line(self) -> str:
        assumed = sum(r.status != "invalid" and r.summary.get("totalseg_version_source") == "assumed" for r in self.results)
        note = f"; {assumed} multi-label map(s) read as TotalSegmentator v2 by default (lungs do not tell the version; set --totalseg-version)" if assumed else ""
        counts = self.warning_counts()
        if counts:
            where = "listed below the table" if self.dry_run else f"cases written; one line each in {self.out / WARNINGS_FILE}"
            note += f"; warnings ({where}): " + ", ".join(f"{n} case(s): {WARNING_KINDS[kind]}" for kind, n in counts.items())
        if self.dry_run:
            return f"dry run: {self.count('valid')} valid case(s), {self.count('invalid')} invalid, {len(self.problems)} problem(s); nothing written{note}"
        return (
            f"wrote {self.count('written')} case(s) to {self.out} ({self.count('skipped')} already done, skipped); "
            f"{self.count('invalid')} case(s) with problems not written; {len(self.problems)} problem(s){note}"
        )

    def raise_for_problems(self) -> None:
        """Raise one :class:`GuideGenError` listing every problem (one line each), if any."""
        problems = self.problems
        if problems:
            head = f"{len(problems)} problem(s) in the input; {self.summary_line()}"
            raise GuideGenError("\n".join([head, *(f"  {p}" for p in problems)]))


# ------------------------------------------------------------------------ input discovery
def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _scan_volumes(folder: Path, what: str, *, allow_dirs: str | None) -> tuple[dict[str, Path], list[str]]:
    """Map case id → NIfTI file (or sub-folder when ``allow_dirs``) in ``folder``; plus problems.

    ``allow_dirs``: ``"dicom"`` (sub-folders must hold DICOM), ``"classes"`` (per-class mask
    folders) or None (sub-folders are not inputs).
    """
    if not folder.is_dir():
        raise GuideGenError(f"{what} {folder}: not a directory")
    found: dict[str, Path] = {}
    problems: list[str] = []
    for p in _visible(folder):
        if p.is_dir():
            if allow_dirs is None:
                problems.append(f"{p}: unexpected folder in {what} (expected <case>.nii.gz files)")
                continue
            if allow_dirs == "dicom" and not looks_like_dicom_folder(p):
                problems.append(f"{p}: folder holds no DICOM files (expected one DICOM series per folder)")
                continue
            if allow_dirs == "classes" and not any(is_nifti(f) for f in p.iterdir()):
                problems.append(f"{p}: per-class folder holds no NIfTI masks")
                continue
            case = p.name
        elif is_nifti(p):
            case = strip_nifti_suffix(p.name)
        else:
            problems.append(f"{p}: not a NIfTI file (expected .nii or .nii.gz{' or a DICOM series folder' if allow_dirs == 'dicom' else ''})")
            continue
        try:
            check_case_id(case)
        except GuideGenError:
            problems.append(f"{p}: invalid case id {case!r} (use letters, digits, '.', '_' or '-')")
            continue
        if case in found:
            problems.append(f"{p}: duplicate case id {case!r} (also {found[case].name}); case skipped")
            found[case] = None  # type: ignore[assignment]  # poisoned: neither input is used
        else:
            found[case] = p
    return found, problems


def _pick_column(columns: list[str], requested: str, fallbacks: tuple[str, ...], option: str, source: Path) -> str:
    if requested in columns:
        return requested
    if requested == fallbacks[0]:  # the default: accept the common alternatives too
        for name in fallbacks[1:]:
            if name in columns:
                return name
    raise GuideGenError(f"{source}: no column {requested!r} (set {option}); columns: {', '.join(columns) or 'none'}")


def load_reports(path: str | os.PathLike, *, id_column: str = "case", text_column: str = "text") -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Read a CSV/TSV or JSONL reports file; return ``({case: (text, where)}, problems)``.

    ``where`` is ``"file line N"`` for messages. The id column defaults to ``case`` (also
    accepting ``id``/``case_id``) and the text column to ``text`` (also ``report``/``report_text``).
    A missing column raises :class:`GuideGenError`; bad rows are returned as problems.
    """
    path = Path(path)
    if path.is_dir():
        raise GuideGenError(f"--reports {path}: is a directory; expected a reports file (.csv, .tsv, .jsonl or .json)")
    if not path.is_file():
        raise GuideGenError(f"--reports {path}: file not found")
    rows: list[tuple[str, dict]] = []  # ("line N" / "item N", row)
    problems: list[str] = []
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GuideGenError(f"--reports {path}: cannot read ({type(exc).__name__})") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(raw.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        columns = list(reader.fieldnames or [])
        rows = [(f"line {i + 2}", row) for i, row in enumerate(reader)]  # line 1 is the header
    elif suffix in (".jsonl", ".ndjson", ".json"):
        entries: list[tuple[str, object]] = []  # (where in the file, parsed value)
        if suffix == ".json" and raw.lstrip().startswith("["):  # one JSON array of report objects
            try:
                entries = [(f"item {i}", obj) for i, obj in enumerate(json.loads(raw), start=1)]
            except json.JSONDecodeError as exc:
                raise GuideGenError(f"--reports {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        else:
            for lineno, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    entries.append((f"line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    problems.append(f"{path} line {lineno}: not valid JSON ({exc.msg})")
        columns_seen: dict[str, None] = {}
        for where, obj in entries:
            if not isinstance(obj, dict):
                problems.append(f"{path} {where}: expected a JSON object")
                continue
            columns_seen.update(dict.fromkeys(obj))
            rows.append((where, obj))
        columns = list(columns_seen)
    else:
        raise GuideGenError(f"--reports {path}: unknown format {suffix or '(no suffix)'}; use .csv, .tsv, .jsonl or .json")
    if not rows:
        return {}, problems
    id_col = _pick_column(columns, id_column, ID_COLUMNS, "--report-id-column", path)
    text_col = _pick_column(columns, text_column, TEXT_COLUMNS, "--report-text-column", path)
    reports: dict[str, tuple[str, str]] = {}
    for place, row in rows:
        case = strip_nifti_suffix(str(row.get(id_col) or "").strip())
        text = str(row.get(text_col) or "").strip()
        where = f"{path} {place}"
        if not case:
            problems.append(f"{where}: empty case id")
        elif case in reports:
            problems.append(f"{where}: duplicate report for case {case!r} (first at {reports[case][1].split()[-1]})")
        elif text:
            reports[case] = (text, where)
    return reports, problems


def discover_cases(
    ct_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    *,
    tumors_dir: str | os.PathLike | None = None,
    body_dir: str | os.PathLike | None = None,
    reports: str | os.PathLike | None = None,
    report_id_column: str = "case",
    report_text_column: str = "text",
) -> tuple[list[CaseInputs], list[str]]:
    """Match the input files by case id; return the matched cases and the matching problems.

    Problems (one line each): unreadable entries, duplicate ids, CT without labels, labels /
    tumour / body files without a CT, report rows for cases that are not in the input.
    """
    cts, problems = _scan_volumes(Path(ct_dir), "--ct", allow_dirs="dicom")
    labels, p = _scan_volumes(Path(labels_dir), "--labels", allow_dirs="classes")
    problems += p
    extra: dict[str, dict[str, Path]] = {}
    for name, folder in (("--tumors", tumors_dir), ("--body", body_dir)):
        if folder is not None:
            extra[name], p = _scan_volumes(Path(folder), name, allow_dirs=None)
            problems += p
    texts: dict[str, tuple[str, str]] = {}
    if reports is not None:
        texts, p = load_reports(reports, id_column=report_id_column, text_column=report_text_column)
        problems += p

    cases: list[CaseInputs] = []
    for case in sorted(cts):
        if cts[case] is None:
            continue  # duplicate id, already reported
        if case not in labels:
            problems.append(f"{cts[case]}: no labels for case {case!r} (looked for {Path(labels_dir) / case}.nii.gz or {Path(labels_dir) / case}/)")
            continue
        if labels[case] is None or any(extra[k].get(case, 0) is None for k in extra):
            continue  # duplicate id in another input, already reported
        cases.append(
            CaseInputs(
                case=case,
                ct=cts[case],
                labels=labels[case],
                tumor=extra.get("--tumors", {}).get(case),
                body=extra.get("--body", {}).get(case),
                report=texts[case][0] if case in texts else None,
            )
        )
    for name, found in (("--labels", labels), *extra.items()):
        for case, path in sorted(found.items()):
            if path is not None and case not in cts:
                problems.append(f"{path}: {name} file has no matching CT (case {case!r})")
    for case, (_, where) in sorted(texts.items()):
        if case not in cts:
            problems.append(f"{where}: report for case {case!r}, which has no CT/labels in the input")
    return cases, problems


# ------------------------------------------------------------------------------- loading
def _check_geometry(path: Path, shape: tuple, affine: np.ndarray, ref_shape: tuple, ref_affine: np.ndarray, opts: PrepareOptions) -> str | None:
    """One-line reason why a mask's grid differs from the CT's, or None when they match."""
    if tuple(shape) != tuple(ref_shape):
        return f"{path}: shape {tuple(shape)} differs from the CT's {tuple(ref_shape)}"
    sp, ref_sp = np.linalg.norm(affine[:3, :3], axis=0), np.linalg.norm(ref_affine[:3, :3], axis=0)
    if np.abs(sp - ref_sp).max() > opts.geometry_tol_mm:
        return f"{path}: voxel spacing {np.round(sp, 4).tolist()} mm differs from the CT's {np.round(ref_sp, 4).tolist()} mm"
    if np.abs(affine[:3, :3] / sp - ref_affine[:3, :3] / ref_sp).max() > opts.direction_tol:
        return f"{path}: orientation (affine directions) differs from the CT's"
    shift = float(np.abs(affine[:3, 3] - ref_affine[:3, 3]).max())
    if shift > opts.geometry_tol_mm:
        return f"{path}: origin differs from the CT's by {shift:.4g} mm (tolerance {opts.geometry_tol_mm} mm)"
    return None


def nifti_is_oriented(path: Path) -> bool:
    """Whether a NIfTI header says where its axes point (qform or sform code > 0); without
    either, nibabel falls back to pixdim scaling with a conventional axis order, which may be
    mirrored."""
    import nibabel as nib

    header = nib.load(str(path)).header
    return bool(int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0)


MIN_CT_VOXELS = 8  # per axis: fewer is a 2D image or a slab stored as 3D, not a torso volume


def load_ct(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """CT of a case as ``(hu (X, Y, Z) float32, RAS affine, info)`` from NIfTI or DICOM, at least
    :data:`MIN_CT_VOXELS` voxels along every axis."""
    if path.is_dir():
        hu, affine, info = read_dicom_series(path)
        info = {"format": "dicom", **info}
    else:
        hu, affine = load_nifti(path, dtype=np.float32)
        info = {"format": "nifti", "oriented": nifti_is_oriented(path)}
    if min(hu.shape) < MIN_CT_VOXELS:
        raise GuideGenError(f"{path}: shape {tuple(hu.shape)} has fewer than {MIN_CT_VOXELS} voxels along an axis; "
                            "a 2D image or a thin slab, expected a 3D CT volume")
    return hu, affine, info


def check_ct_values(path: Path, hu: np.ndarray) -> list[str]:
    """Problems with the CT values: non-finite voxels, values that cannot be HU."""
    problems = []
    finite = np.isfinite(hu)
    if not finite.all():
        problems.append(f"{path}: {int((~finite).sum())} voxel(s) are NaN or infinite")
        hu = hu[finite]
    if hu.size:
        lo, hi = float(hu.min()), float(hu.max())
        if lo > AIR_HU_REQUIRED:
            problems.append(
                f"{path}: values {lo:.0f} to {hi:.0f} do not look like HU (no air below {AIR_HU_REQUIRED:.0f}); "
                "raw scanner values without rescale slope/intercept?"
            )
    return problems


def _is_integer_valued(data: np.ndarray) -> bool:
    return np.issubdtype(data.dtype, np.integer) or bool(np.all(data == np.rint(data)))


def _mask(data: np.ndarray) -> np.ndarray:
    """Binary mask of a mask volume: non-zero for integers, >= 0.5 for float probabilities."""
    return data != 0 if _is_integer_valued(data) else data >= 0.5


def class_lookup(label_set: LabelSet, version: int) -> np.ndarray:
    """``lut[totalseg_id] → label-set id`` (0 for classes the label set does not use)."""
    table = totalseg_classes(version)
    lut = np.zeros(max(table) + 1, dtype=np.uint8)
    for tid, name in table.items():
        lut[tid] = label_set.class_for_source(name, version) or 0
    return lut


def _source_class(label_set: LabelSet, name: str, version: int) -> int | None:
    """Label-set id of a per-class file name, trying the given TotalSegmentator version first."""
    for v in (version, 3 - version):
        cid = label_set.class_for_source(name, v)
        if cid is not None:
            return cid
    return None


def parse_totalseg_version(value: int | str) -> int | str:
    """``--totalseg-version`` as 1, 2 or ``"auto"`` (the CLI passes strings); raises otherwise."""
    if str(value).strip().lower() == "auto":
        return "auto"
    if str(value).strip() not in ("1", "2"):
        raise GuideGenError(f"--totalseg-version: expected auto, 1 or 2, got {value!r}")
    return int(value)


def load_multilabel(path: Path, label_set: LabelSet, version: int | str) -> tuple[np.ndarray | None, np.ndarray | None, list[str], tuple[int, str] | None]:
    """A multi-label TotalSegmentator NIfTI mapped to label-set ids.

    Returns ``(labels, affine, problems, (version used, how))``, how being ``"option"``,
    ``"detected"`` or ``"assumed"``. The ids alone do not say which table they follow, and the
    wrong one maps most classes to other organs without any error, so the content is checked
    (:func:`guess_totalseg_version`): with ``version="auto"`` it picks the table (2 when it
    cannot tell: "assumed"); with 1 or 2 a map that clearly follows the other table is a problem.
    """
    version = parse_totalseg_version(version)
    try:
        data, affine = load_nifti(path)
    except GuideGenError as exc:
        return None, None, [str(exc)], None
    if not _is_integer_valued(data):
        return None, affine, [f"{path}: label values are not integers; expected TotalSegmentator class ids"], None
    ids, n_voxels = np.unique(data, return_counts=True)
    ids = ids.astype(np.int64)
    widest = 2 if version == "auto" else version  # auto: anything in either table is fine here
    n = max(totalseg_classes(widest))
    bad = ids[(ids < 0) | (ids > n)]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:6]) + (" ..." if bad.size > 6 else "")
        hint = f" (TotalSegmentator v{widest} `total` has ids 1..{n}" + ("; v2 output? use --totalseg-version 2)" if widest == 1 else ")")
        return None, affine, [f"{path}: unknown label id(s) {shown}{hint}"], None
    if ids.max(initial=0) == 0:
        return None, affine, [f"{path}: label map is empty (all voxels 0)"], None
    counts = np.zeros(int(ids.max()) + 1, dtype=np.int64)
    counts[ids] = n_voxels
    guess = guess_totalseg_version(counts)
    if version == "auto":
        used = (guess, "detected") if guess else (2, "assumed")
    elif guess and guess != version:
        mine, theirs = lung_ratio(counts, version), lung_ratio(counts, guess)
        return None, affine, [
            f"{path}: looks like TotalSegmentator v{guess} output (right/left lung volume {mine:.2g} when read as v{version}, "
            f"{theirs:.2g} as v{guess}); pass --totalseg-version {guess}"
        ], None
    else:
        used = (version, "option")
    lut = class_lookup(label_set, used[0])
    return lut[data if np.issubdtype(data.dtype, np.integer) else data.astype(np.int32)], affine, [], used


def load_class_folder(folder: Path, label_set: LabelSet, version: int, ref_shape: tuple | None, ref_affine: np.ndarray | None, opts: PrepareOptions) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, list[str], list[dict]]:
    """Merge per-class masks ``<class>.nii.gz`` into one label map.

    Returns ``(labels (X, Y, Z) uint8 | None, body mask | None, affine, problems, warnings)``;
    the body mask comes from ``body*.nii.gz`` files when present. Known TotalSegmentator classes
    that the label set does not use are read (and checked) but not labelled. A file whose name
    is no known class (``lung_nodules.nii.gz`` of another TotalSegmentator task, a typo) is not
    read at all: it is a warning naming the file, not a problem, so the case is still written.
    """
    known = known_class_names()
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    problems = [f"{p}: not a NIfTI mask" for p in files if not is_nifti(p)]
    files = [p for p in files if is_nifti(p)]
    unknown = [p for p in files if strip_nifti_suffix(p.name) not in known]
    warnings = [
        _warning("unknown_class_file", f"{p}: unknown class name {strip_nifti_suffix(p.name)!r} (not a TotalSegmentator v1/v2 `total` or body class); file ignored", f"ignored {p.name}")
        for p in unknown
    ]
    labels = body = affine = None
    any_voxel = False
    for p in files:
        if p in unknown:
            continue
        try:
            data, aff = load_nifti(p)
        except GuideGenError as exc:
            problems.append(str(exc))
            continue
        if ref_shape is None:
            ref_shape, ref_affine = data.shape, aff
        reason = _check_geometry(p, data.shape, aff, ref_shape, ref_affine, opts)
        if reason:
            problems.append(reason)
            continue
        if labels is None:
            labels, affine = np.zeros(data.shape, dtype=np.uint8), aff
        mask = _mask(data)
        name = strip_nifti_suffix(p.name)
        if name in BODY_CLASS_NAMES:
            body = mask if body is None else (body | mask)
            continue
        any_voxel |= bool(mask.any())
        cid = _source_class(label_set, name, version)
        if cid:  # classes outside the label set stay 0 here and become body later
            labels[mask] = cid
    if labels is not None and not any_voxel and not problems:
        problems.append(f"{folder}: every class mask is empty")
    if labels is None and not problems:  # every NIfTI in the folder had an unknown name
        problems.append(f"{folder}: no TotalSegmentator class mask (every file has an unknown class name)")
    return labels, body, affine, problems, warnings


def _load_binary(path: Path, ref_shape: tuple, ref_affine: np.ndarray, opts: PrepareOptions) -> tuple[np.ndarray | None, list[str]]:
    try:
        data, aff = load_nifti(path)
    except GuideGenError as exc:
        return None, [str(exc)]
    if not np.isfinite(data).all():
        return None, [f"{path}: mask has NaN or infinite values"]
    reason = _check_geometry(path, data.shape, aff, ref_shape, ref_affine, opts)
    return (None, [reason]) if reason else (_mask(data), [])


# ------------------------------------------------------------------ body and findings
def body_mask_from_ct(hu: np.ndarray, threshold: float = BODY_HU_THRESHOLD) -> np.ndarray:
    """Body envelope of an (X, Y, Z) HU volume: > ``threshold``, largest connected component,
    holes filled per axial slice (closes the lungs, which touch no slice border) and in 3D."""
    mask = hu > threshold
    comps, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    mask = comps == int(sizes.argmax())
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return ndimage.binary_fill_holes(mask)


def _paired_classes(label_set: LabelSet) -> set[int]:
    """Ids whose TotalSegmentator sources come as left/right pairs (kidney, lung, adrenal, rib)."""
    paired = set()
    for name in totalseg_classes(2).values():
        cid = label_set.class_for_source(name, 2)
        if cid and ("_left" in name or "_right" in name):
            paired.add(cid)
    return paired


def findings_from_masks(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet) -> dict:
    """Findings of a case read off its label map (for cases without a report).

    Same shape as the phantom's findings (``{"tumors": [{"site", "side", "size_mm"}], ...}``,
    unknown fields None). One tumour per connected tumour component (:func:`tumor_stats`, the
    regions ``case_stats`` and the evaluation match against), largest first: site = the organ
    with most voxels touching it; size = equivalent-sphere diameter in mm; side (paired organs
    only) from its centroid vs the midline (RAS: +x is the patient's right).
    """
    findings: dict = {"sex": None, "age": None, "tumors": [], "t_stage": None, "n_stage": None, "m_stage": None, "phase": None, "smoking": None}
    stats = tumor_stats(labels, affine, label_set)
    paired = _paired_classes(label_set)
    tumors = [_region_finding(comp, stats, label_set, paired) for comp in stats.tumors]
    findings["tumors"] = sorted(tumors, key=lambda t: -t["size_mm"])
    return findings


def render_findings_text(findings: dict) -> str:
    """A short report from :func:`findings_from_masks` output (one sentence per tumour)."""
    parts = ["CT of the chest, abdomen and pelvis."]
    for t in findings.get("tumors") or []:
        parts.append(f"A {t['size_mm'] / 10:.1f} cm mass in the {_describe(t, None)}.")
    if len(parts) == 1:
        parts.append("No focal mass.")
    return " ".join(parts)


def parse_findings_source(value: str) -> str:
    """``--findings`` as one of :data:`FINDINGS_SOURCES`; raises a one-line error otherwise."""
    v = str(value).strip().lower()
    if v not in FINDINGS_SOURCES:
        raise GuideGenError(f"--findings: expected {' or '.join(FINDINGS_SOURCES)}, got {value!r}")
    return v


def _warning(kind: str, message: str, note: str) -> dict:
    """A case warning: ``kind`` (a key of :data:`WARNING_KINDS`), the full message, a short note for the table."""
    assert kind in WARNING_KINDS, kind
    return {"kind": kind, "message": message, "note": note}


def tumor_stats(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet) -> CaseStats:
    """:func:`~guidegen.evaluation.metrics.case_stats` for tumour matching, at the cost of the tumours.

    ``case_stats`` also counts the components of every class, which takes tens of seconds on a
    full-resolution map; here it runs on the tumour voxels' bounding box grown by one voxel
    (every tumour region and its whole 1-voxel shell lie inside, so ``tumors`` is the same) and
    the midline is set from the whole map as ``case_stats`` defines it. Only ``tumors`` and
    ``midline_x_mm`` of the result describe the whole map.
    """
    tid = label_set.tumor_id
    found = ndimage.find_objects((labels == tid).astype(np.uint8)) if tid is not None else []
    if found and found[0] is not None:
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(found[0], labels.shape))
    else:
        box = (slice(0, 0),) * 3
    sub = np.asarray(affine, dtype=np.float64).copy()
    sub[:3, 3] = sub[:3, :3] @ np.array([s.start for s in box], dtype=np.float64) + sub[:3, 3]
    stats = case_stats(labels[box], sub, label_set)
    stats.midline_x_mm = midline_x_mm(labels, affine, label_set) if stats.tumors else 0.0
    return stats


def _region_finding(comp: TumorComponent, stats: CaseStats, label_set: LabelSet, paired: set[int]) -> dict:
    """``{"site", "side", "size_mm"}`` of a tumour region: the organ most of its 1-voxel shell
    touches, the side of a paired organ from its centroid vs the midline, its equivalent-sphere
    diameter."""
    organ_ids = list(label_set.organ_ids)
    counts = comp.shell_counts[organ_ids]
    site_id = organ_ids[int(counts.argmax())] if counts.sum() else None
    side = None
    if site_id in paired:
        side = "right" if comp.centroid_mm[0] > stats.midline_x_mm else "left"
    return {"site": label_set.name_of(site_id) if site_id else None, "side": side, "size_mm": round(float(comp.diameter_mm), 1)}


def _describe(t: dict, size_key: str | None = "size_mm") -> str:
    """``"40 mm left kidney"`` of a tumour dict (without the size when ``size_key`` is None or unset)."""
    where = (t.get("site") or "unknown organ").replace("_", " ")
    if t.get("side"):
        where = f"{t['side']} {where}"
    return f"{float(t[size_key]):.0f} mm {where}" if size_key and t.get(size_key) else where


def check_findings(report_tumors: list[dict], labels: np.ndarray, affine: np.ndarray, label_set: LabelSet, *, tumor_mask: bool = True) -> tuple[dict, list[dict]]:
    """Compare a report's tumours with the tumour regions of a label map; ``(check, warnings)``.

    Matching is :func:`~guidegen.evaluation.metrics.match_tumors` (a tumour is placed in a
    region touching or inside its organ, on its side for paired organs; sizes agree within ±50 %
    of the equivalent-sphere diameter). Unplaced report tumours, largest first, are paired with
    the largest unmatched regions: a pair is a ``site_mismatch``, a tumour left over is
    ``report_tumor_missing``, a region left over ``map_tumor_unreported``; a placed tumour whose
    size is off is ``size_mismatch``. ``tumor_mask``: whether the case had a ``--tumors`` mask
    (only for the message). ``check`` is JSON-ready for the case's meta.
    """
    requested = [t for t in report_tumors if isinstance(t, dict)]
    stats = tumor_stats(labels, affine, label_set)
    paired = _paired_classes(label_set)
    regions = [_region_finding(comp, stats, label_set, paired) for comp in stats.tumors]
    matches = match_tumors(requested, stats, label_set)
    used = {m["region"] for m in matches if m["placed"]}
    free = sorted((j for j in range(len(regions)) if j not in used), key=lambda j: -stats.tumors[j].voxels)
    warnings: list[dict] = []
    unplaced = sorted((i for i, m in enumerate(matches) if not m["placed"]), key=lambda i: -(requested[i].get("size_mm") or 0.0))
    for i in unplaced:
        req = _describe(requested[i])
        if free:
            j = free.pop(0)
            warnings.append(_warning(
                "site_mismatch",
                f"the report names a {req} tumour; the label map's tumour region is in the {_describe(regions[j], None)} ({regions[j]['size_mm']:.0f} mm)",
                f"tumour site: report {req}, map {_describe(regions[j])}",
            ))
        else:
            why = ("the label map has no tumour voxels" + ("" if tumor_mask else " (no --tumors mask for this case)")) if not regions else \
                f"each of the label map's {len(regions)} tumour region(s) is matched to another tumour of the report"
            warnings.append(_warning("report_tumor_missing", f"the report names a {req} tumour; {why}", f"not in map: {req} tumour"))
    for m in matches:
        if m["placed"] and m["size_ok"] is False:
            warnings.append(_warning(
                "size_mismatch",
                f"the report's {_describe(m, 'requested_mm')} tumour measures {m['measured_mm']:.0f} mm in the label map "
                "(equivalent-sphere diameter; more than ±50 % off)",
                f"tumour size: report {float(m['requested_mm']):.0f} mm, map {m['measured_mm']:.0f} mm",
            ))
    for j in free:
        warnings.append(_warning(
            "map_tumor_unreported",
            f"the label map has a {regions[j]['size_mm']:.0f} mm tumour region in the {_describe(regions[j], None)} that the report does not name",
            f"not in report: {_describe(regions[j])} tumour",
        ))
    as_json = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in m.items()} for m in matches]
    check = {"checked": True, "report_tumors": requested, "map_tumors": regions, "matches": as_json, "warnings": [w["kind"] for w in warnings]}
    return check, warnings


def parse_report(text: str) -> dict | None:
    """Findings parsed by ``guidegen.text.findings.parse_findings`` if that module exists."""
    try:
        from guidegen.text.findings import parse_findings
    except ImportError:
        return None
    result = parse_findings(text)
    for attr in ("to_dict", "model_dump"):
        if hasattr(result, attr):
            return getattr(result, attr)()
    if hasattr(result, "__dataclass_fields__"):
        return json.loads(json.dumps(asdict(result), default=str))
    return result if isinstance(result, dict) else None


# --------------------------------------------------------------------------- one case
def crop_box(labels: np.ndarray, affine: np.ndarray, label_set: LabelSet, margin_mm: float) -> tuple[slice, slice, slice]:
    """Torso bounding box (x/y: all labels, z: organs; see ``torso_bbox``) + a margin in mm."""
    box = torso_bbox(labels, label_set, 0)
    spacing = spacing_from_affine(affine)
    out = []
    for axis, s in enumerate(box):
        m = int(math.ceil(margin_mm / spacing[axis] - 1e-9))
        out.append(slice(max(s.start - m, 0), min(s.stop + m, labels.shape[axis])))
    return tuple(out)  # type: ignore[return-value]


def build_case(inputs: CaseInputs, opts: PrepareOptions) -> tuple[CaseRecord | None, dict, list[str]]:
    """Load, validate and assemble one case at full resolution, cropped to the torso.

    Returns ``(record or None, summary, problems)``; the record is None whenever there is any
    problem. All problems of the case are collected (CT, labels, tumour, body, geometry).
    """
    label_set = load_label_set(opts.label_set)
    problems: list[str] = []
    summary: dict = {"case": inputs.case, "ct": inputs.ct_kind, "labels": inputs.labels_kind}
    hu = ct_affine = None
    try:
        hu, ct_affine, ct_info = load_ct(inputs.ct)
        problems += check_ct_values(inputs.ct, hu)
        if ct_info.get("oriented") is False:
            summary.setdefault("warnings", []).append(_warning(
                "no_orientation", f"{inputs.ct}: no orientation in the NIfTI header (qform and sform codes 0): axes taken as "
                "nibabel's default with the pixdim spacing; left and right may be swapped (check a kidney or the liver)",
                "no orientation"))
        finite = hu[np.isfinite(hu)]
        summary.update(hu_range=(float(finite.min()), float(finite.max())) if finite.size else None, spacing=spacing_from_affine(ct_affine), shape=hu.shape)
    except GuideGenError as exc:
        problems.append(str(exc))
    ref_shape = hu.shape if hu is not None else None

    body = None
    if inputs.labels.is_dir():  # files named by class: the version only orders the name lookup
        version = parse_totalseg_version(opts.totalseg_version)
        used: tuple[int, str] | None = (2 if version == "auto" else int(version), "class names")
        labels, body, lab_affine, p, w = load_class_folder(inputs.labels, label_set, used[0], ref_shape, ct_affine, opts)
        problems += p
        summary["warnings"] = summary.get("warnings", []) + w
    else:
        labels, lab_affine, p, used = load_multilabel(inputs.labels, label_set, opts.totalseg_version)
        problems += p
        if labels is not None and hu is not None:
            reason = _check_geometry(inputs.labels, labels.shape, lab_affine, hu.shape, ct_affine, opts)
            if reason:
                problems.append(reason)
                labels = None
    if used is not None:
        summary.update(totalseg_version=used[0], totalseg_version_source=used[1])
    tumor = None
    if hu is not None:
        for kind, path in (("tumor", inputs.tumor), ("body", inputs.body)):
            if path is not None:
                mask, p = _load_binary(path, hu.shape, ct_affine, opts)
                problems += p
                if kind == "tumor" and label_set.tumor_id is None:
                    problems.append(f"{path}: label set {label_set.name!r} has no tumour class")
                elif kind == "tumor":
                    tumor = mask
                else:
                    body = mask if body is None else (body | mask)
    if labels is not None and not np.isin(labels, label_set.organ_ids).any() and not any("empty" in p for p in problems):
        problems.append(f"{inputs.labels}: no class of label set {label_set.name!r} present (after mapping TotalSegmentator classes)")
    if problems or hu is None or labels is None:
        return None, summary, problems

    # Assemble: organs, then the tumour on top, then the body envelope where nothing else is.
    body_source = "mask" if body is not None else "derived from CT (> -500 HU)"
    if tumor is not None:
        labels[tumor] = label_set.tumor_id
    if label_set.body_id is not None:
        if body is None:
            body = body_mask_from_ct(hu)
        labels[(labels == 0) & body] = label_set.body_id
    box = crop_box(labels, ct_affine, label_set, opts.margin_mm)
    start = np.array([s.start for s in box] + [1], dtype=np.float64)
    affine = ct_affine.copy()
    affine[:3, 3] = (ct_affine @ start)[:3]
    labels, hu = np.ascontiguousarray(labels[box]), hu[box]

    check: dict = {"checked": False, "reason": "no report: findings derived from the label map"}
    if inputs.report:
        text, findings = inputs.report, parse_report(inputs.report)
        text_source = findings_source = "report"
        if findings is None:
            check = {"checked": False, "reason": "no report parser (guidegen.text.findings) installed"}
        else:
            check, warnings = check_findings(findings.get("tumors") or [], labels, affine, label_set, tumor_mask=inputs.tumor is not None)
            summary["warnings"] = summary.get("warnings", []) + warnings
        if opts.findings == "masks":
            measured = findings_from_masks(labels, affine, label_set)
            findings = {**measured, **(findings or {}), "tumors": measured["tumors"]}
            findings_source = "report, tumours from the label map"
    else:
        findings = findings_from_masks(labels, affine, label_set)
        text, text_source = render_findings_text(findings), "derived from masks"
        findings_source = "derived from masks"
    present = [label_set.name_of(int(i)) for i in np.unique(labels) if i != 0]
    summary.update(classes=present, all_classes=label_set.names[1:], organs=label_set.organ_names, cropped_shape=labels.shape, tumor_voxels=int((labels == label_set.tumor_id).sum()) if label_set.tumor_id is not None else 0)
    meta = {
        "source": "prepare",
        "request": case_request(inputs, opts),
        "inputs": {k: (str(v) if isinstance(v, Path) else None) for k, v in (("ct", inputs.ct), ("labels", inputs.labels), ("tumor", inputs.tumor), ("body", inputs.body))},
        "ct_format": ct_info["format"],
        "labels_format": inputs.labels_kind,
        "totalseg_version": summary["totalseg_version"],  # the table used for this case's ids
        "totalseg_version_source": summary["totalseg_version_source"],  # option, detected, assumed, class names
        "original_shape": list(ref_shape),
        "crop_box": [[s.start, s.stop] for s in box],
        "extent_mm": [round(float(n * s), 3) for n, s in zip(labels.shape, spacing_from_affine(affine))],
        "hu_range": list(summary["hu_range"]),
        "classes_present": present,
        "body_source": body_source,
        "text_source": text_source,
        "findings_source": findings_source,
        "findings_check": check,
        "warnings": summary.get("warnings", []),
    }
    record = CaseRecord(case=inputs.case, labels=labels, affine=affine, ct=hu, text=text, findings=findings, meta=meta)
    return record, summary, []


def file_identity(path: Path | None) -> list | None:
    """``[name, bytes]`` of an input file, or of a folder (DICOM series, per-class masks) its
    ``[name, files, bytes]``: what tells a replaced input from the one a case was prepared
    from, cheaply and wherever the data was moved (so no absolute path, no mtime)."""
    if path is None:
        return None
    if path.is_dir():
        files = [f for f in path.rglob("*") if f.is_file()]
        return [path.name, len(files), sum(f.stat().st_size for f in files)]
    return [path.name, path.stat().st_size]


def case_request(inputs: CaseInputs, opts: PrepareOptions) -> dict:
    """What decides a prepared case's content: its input files, report text and the options
    that change the written volumes or findings (``meta/<case>.json`` ``request``; a re-run
    that would prepare the case differently is refused instead of skipping it)."""
    import hashlib

    return {
        "ct": file_identity(inputs.ct), "labels": file_identity(inputs.labels), "tumor": file_identity(inputs.tumor),
        "body": file_identity(inputs.body),
        "report_sha256": hashlib.sha256(inputs.report.encode()).hexdigest()[:16] if inputs.report else None,
        "label_set": opts.label_set, "totalseg_version": opts.totalseg_version, "margin_mm": opts.margin_mm, "findings": opts.findings,
    }


def changed_request(out: Path, inputs: CaseInputs, opts: PrepareOptions) -> str | None:
    """Why the finished case ``inputs.case`` in ``out`` does not match this run (None when it
    does, or when its meta predates requests)."""
    meta_path = out / "meta" / f"{inputs.case}.json"
    try:
        done = json.loads(meta_path.read_text()).get("request")
    except (OSError, ValueError) as exc:
        return f"{meta_path}: unreadable meta of a prepared case ({type(exc).__name__})"
    if done is None:
        return None
    wanted = json.loads(json.dumps(case_request(inputs, opts)))
    differ = [k for k in wanted if done.get(k) != wanted[k]]
    if not differ:
        return None
    return f"{meta_path}: case {inputs.case!r} was prepared from other inputs or settings ({', '.join(differ)})"


def cache_configs(opts: PrepareOptions) -> tuple[PreprocessConfig, PreprocessConfig]:
    """The grid-cache configs the training datasets use (CT + labels, labels only)."""
    return (PreprocessConfig(grid=tuple(opts.grid), label_set=opts.label_set, with_ct=True), PreprocessConfig(grid=tuple(opts.grid), label_set=opts.label_set, with_ct=False))


def store_cache(root: Path, record: CaseRecord, opts: PrepareOptions) -> None:
    """Write the training-grid cache entries of one case (read by ``guidegen.data.datasets``)."""
    label_set = load_label_set(opts.label_set)
    with_ct, labels_only = cache_configs(opts)
    item = preprocess_case(record.labels, record.ct, record.affine, with_ct, label_set)
    reader = DatasetReader(root)
    PreprocessCache(root, with_ct).store(record.case, item, cache_sources(reader, record.case, with_ct=record.ct is not None))
    PreprocessCache(root, labels_only).store(record.case, {**item, "ct": None}, cache_sources(reader, record.case, with_ct=False))


def process_case(inputs: CaseInputs, opts: PrepareOptions, out: str | None) -> CaseResult:
    """Validate one case and, when ``out`` is given and it is valid, write it (worker entry)."""
    try:
        record, summary, problems = build_case(inputs, opts)
        warnings = summary.get("warnings", [])
        if record is None:
            return CaseResult(inputs.case, "invalid", problems, summary, warnings)
        if out is None:
            return CaseResult(inputs.case, "valid", [], summary, warnings)
        writer = DatasetWriter(out, name="prepared", label_set=opts.label_set, mode="resume")
        writer.write_case(record, preview=opts.previews)
        store_cache(Path(out), record, opts)
        return CaseResult(inputs.case, "written", [], summary, warnings)
    except GuideGenError as exc:
        return CaseResult(inputs.case, "invalid", [str(exc).splitlines()[0]], {"case": inputs.case})
    except Exception as exc:  # one broken case must not stop the run; report it as a problem
        msg = str(exc).splitlines()[0] if str(exc) else ""
        return CaseResult(inputs.case, "invalid", [f"{inputs.ct}: unexpected error ({type(exc).__name__}: {msg})"], {"case": inputs.case})


def write_warnings_file(report: PrepareReport) -> None:
    """``<out>/warnings.txt``: every warning of the run's cases (skipped ones' from their meta),
    one ``<case>: <message>`` line each, written atomically; removed when there are none, so it
    never describes an earlier run."""
    if report.out is None:
        return
    path = report.out / WARNINGS_FILE
    lines = report.warnings
    if lines:
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    else:
        path.unlink(missing_ok=True)


def _stored_warnings(out: Path, case: str) -> list[dict]:
    """The warnings in a written case's meta (so a re-run that skips it still counts them)."""
    try:
        meta = json.loads((out / "meta" / f"{case}.json").read_text())
    except (OSError, ValueError):
        return []
    warnings = meta.get("warnings") if isinstance(meta, dict) else None
    return [w for w in warnings or [] if isinstance(w, dict) and w.get("kind") in WARNING_KINDS]


def _worker_init() -> None:
    import signal

    import torch

    torch.set_num_threads(1)  # workers share the cores; one thread each
    # Ctrl-C reaches the whole process group: the main process cancels the queued cases and
    # lets the running ones finish; a worker that died of the interrupt would break the pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ------------------------------------------------------------------------------ the run
def prepare_dataset(
    ct: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike | None,
    *,
    tumors: str | os.PathLike | None = None,
    body: str | os.PathLike | None = None,
    reports: str | os.PathLike | None = None,
    report_id_column: str = "case",
    report_text_column: str = "text",
    options: PrepareOptions | None = None,
    workers: int = 1,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Validate the inputs and (unless ``dry_run``) write the dataset and its grid cache.

    Data problems do not raise: they are in the returned report (``report.problems``; call
    ``report.raise_for_problems()`` for the CLI behaviour). Option errors raise
    :class:`GuideGenError`. A re-run into an existing ``out`` skips complete cases.
    """
    t0 = time.perf_counter()
    opts = options or PrepareOptions()
    label_set = load_label_set(opts.label_set)
    opts = replace(opts, totalseg_version=parse_totalseg_version(opts.totalseg_version), findings=parse_findings_source(opts.findings))  # validates them
    if workers < 1:
        raise GuideGenError(f"--workers must be at least 1, got {workers}")
    if not math.isfinite(opts.margin_mm) or opts.margin_mm < 0:
        raise GuideGenError(f"--margin-mm must be a number >= 0, got {opts.margin_mm}")
    if out is None and not dry_run:
        raise GuideGenError("--out is required (or use --dry-run)")
    inputs = {"--ct": ct, "--labels": labels, "--tumors": tumors, "--body": body, "--reports": reports}
    if out is not None:
        check_out_apart_from_inputs(Path(out), inputs)
    if reports is not None and not dry_run:
        # a row that cannot be read belongs to a case that would be written with made-up text
        _, bad_rows = load_reports(reports, id_column=report_id_column, text_column=report_text_column)
        if bad_rows:
            raise GuideGenError(f"--reports {reports}: {len(bad_rows)} problem(s), first: {bad_rows[0]}; nothing written "
                                "(--dry-run lists them all)")
    cases, input_problems = discover_cases(ct, labels, tumors_dir=tumors, body_dir=body, reports=reports, report_id_column=report_id_column, report_text_column=report_text_column)

    results: list[CaseResult] = []
    writer = None
    if not dry_run:
        out = Path(out)  # type: ignore[arg-type]
        mode = "overwrite" if overwrite else ("resume" if (out / "dataset.json").is_file() else "new")
        if mode == "resume":
            existing = json.loads((out / "dataset.json").read_text()).get("label_set")
            if existing != label_set.name:
                raise GuideGenError(f"--out {out}: existing dataset uses label set {existing!r}, not {label_set.name!r} (use --overwrite)")
            done = set(DatasetReader(out).case_ids())
            changed = [why for c in cases if c.case in done and (why := changed_request(out, c, opts))]
            if changed:
                raise GuideGenError(f"{changed[0]}{f' (and {len(changed) - 1} more case(s))' if len(changed) > 1 else ''}; "
                                    "nothing written: use --overwrite to prepare again, or another --out")
        info = {"source": "guidegen prepare", "grid": list(opts.grid), "totalseg_version": opts.totalseg_version, "spacing_policy": "full-resolution crops; cache resized to grid"}
        writer = DatasetWriter(out, name="prepared", label_set=label_set.name, mode=mode, info=info)
        todo = []
        for c in cases:
            if writer.has_case(c.case):
                results.append(CaseResult(c.case, "skipped", [], {"case": c.case}, _stored_warnings(out, c.case)))
                with_ct, _ = cache_configs(opts)
                if not PreprocessCache(out, with_ct).path(c.case).is_file():  # resumed after the volumes
                    store_cache(out, DatasetReader(out).load_case(c.case), opts)
            else:
                todo.append(c)
        if todo:
            writer.mark_incomplete()  # an interrupted resume must not leave the set marked complete
    else:
        todo = list(cases)

    out_str = None if dry_run else str(out)
    with tqdm(total=len(todo), desc="prepare" if not dry_run else "validate", unit="case", disable=not progress or not todo) as bar:
        if workers == 1 or len(todo) <= 1:
            for c in todo:
                results.append(process_case(c, opts, out_str))
                bar.update()
        else:
            results += _process_in_pool(todo, opts, out_str, workers, bar)
    if writer is not None:
        writer.finalize()
    results.sort(key=lambda r: r.case)
    report = PrepareReport(results=results, input_problems=input_problems, out=None if dry_run else Path(out), dry_run=dry_run, seconds=time.perf_counter() - t0)
    write_warnings_file(report)
    return report


def _process_in_pool(todo: list[CaseInputs], opts: PrepareOptions, out: str | None, workers: int, bar) -> list[CaseResult]:
    """:func:`process_case` of every case in ``workers`` spawned processes.

    Ctrl-C cancels the queued cases and waits for the running ones (each writes whole cases
    only), then re-raises; a worker that dies (killed, out of memory) is one error line naming
    the cases it left, whose complete cases a re-run keeps.
    """
    from concurrent.futures.process import BrokenProcessPool

    # spawn: workers start clean (no forked OpenMP/torch thread state from this process)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    results: list[CaseResult] = []
    futures = {pool.submit(process_case, c, opts, out): c.case for c in todo}
    try:
        for fut in as_completed(futures):
            results.append(fut.result())
            bar.update()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through the CLI's handler
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    except BrokenProcessPool:
        pool.shutdown(wait=False, cancel_futures=True)
        left = sorted(case for fut, case in futures.items() if not (fut.done() and not fut.exception()))
        raise GuideGenError(f"a prepare worker process died (killed, or out of memory?) with {len(left)} case(s) unfinished "
                            f"(first: {left[0]}); complete cases are kept: re-run to resume, with fewer --workers if memory "
                            "is short") from None
    pool.shutdown(wait=True)
    return results


def summary_table(report: PrepareReport):
    """A rich Table of the cases: classes present, HU range, spacing, size, status (and warnings, if any)."""
    from rich.table import Table

    table = Table(title="guidegen prepare" + (" (dry run)" if report.dry_run else ""))
    warned = any(r.warnings for r in report.results)  # the warnings column only when there are some
    for col in ("case", "CT", "labels", "classes", "missing organs", "tumour vox", "HU range", "spacing mm", "size", "status", *(["warnings"] if warned else [])):
        table.add_column(col, overflow="fold")
    for r in report.results:
        s = r.summary
        hu = s.get("hu_range")
        table.add_row(
            r.case,
            s.get("ct", ""),
            s.get("labels", "") + (f" v{s['totalseg_version']} ({s['totalseg_version_source']})" if s.get("totalseg_version_source") in ("detected", "assumed") else ""),
            f"{len(s['classes'])}/{len(s['all_classes'])}" if "classes" in s else "",
            ", ".join(c for c in s.get("all_classes", []) if c not in s["classes"] and c in s.get("organs", [])) if "classes" in s else "",
            str(s.get("tumor_voxels", "")),
            f"{hu[0]:.0f}..{hu[1]:.0f}" if hu else "",
            "x".join(f"{v:.2f}" for v in s["spacing"]) if "spacing" in s else "",
            ("x".join(map(str, s["shape"])) + (f" → {'x'.join(map(str, s['cropped_shape']))}" if "cropped_shape" in s else "")) if "shape" in s else "",
            r.status if not r.problems else f"{r.status} ({len(r.problems)} problem{'s' if len(r.problems) > 1 else ''})",
            *(["; ".join(w["note"] for w in r.warnings)] if warned else []),
        )
    return table
