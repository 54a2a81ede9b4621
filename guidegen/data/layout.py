"""The dataset layout every command reads and writes (DESIGN §4).

```
DATASET/
  dataset.json         name, label set, case count, format version, provenance
  ct/<case>.nii.gz     int16 HU          (optional for label-only sets)
  labels/<case>.nii.gz uint8 label ids, same shape and affine as the CT
  reports.jsonl        {"case", "text", "findings"} per line
  meta/<case>.json     provenance, seed, settings, timings — written LAST: it marks the case complete
  previews/<case>.png  orthogonal slices with label overlay
  cache/<hash>/        preprocessed fixed-grid arrays (guidegen.data.cache)
```
Why the meta file is the commit marker: volumes are written atomically one by one, so a run
killed between them could leave a CT without labels. A reader only accepts cases whose
``meta/<case>.json`` exists, and the meta is written after both volumes, so an interrupted case
is invisible and a re-run simply rewrites it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from guidegen import __version__
from guidegen.errors import GuideGenError
from guidegen.io import load_nifti, save_nifti, spacing_from_affine, write_json_atomic, write_text_atomic
from guidegen.labels import LabelSet, load_label_set

FORMAT_VERSION = 1
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LAYOUT_ENTRIES = ("dataset.json", "reports.jsonl", "ct", "labels", "meta", "previews", "cache")


def parse_grid(text: str | int | tuple, option: str = "--size", low: int = 8, high: int = 512) -> tuple[int, int, int]:
    """Parse ``"64"`` → (64, 64, 64) or ``"48,48,64"`` / ``"48x48x64"`` → (48, 48, 64)."""
    if isinstance(text, int):
        parts = [text]
    elif isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = [p for p in re.split(r"[,xX× ]+", str(text).strip()) if p]
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise GuideGenError(f"{option}: expected S or X,Y,Z with integers, got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise GuideGenError(f"{option}: expected 1 or 3 sizes, got {len(values)} ({text!r})")
    if any(v < low or v > high for v in values):
        raise GuideGenError(f"{option}: each size must be between {low} and {high}, got {text!r}")
    return tuple(values)  # type: ignore[return-value]


def check_case_id(case: str) -> str:
    if not _CASE_ID.match(case or ""):
        raise GuideGenError(f"invalid case id {case!r}: use letters, digits, '.', '_' or '-'")
    return case


@dataclass
class CaseRecord:
    """One case in memory. ``labels`` (X, Y, Z) uint8; ``ct`` (X, Y, Z) int16 HU or None."""

    case: str
    labels: np.ndarray
    affine: np.ndarray
    ct: np.ndarray | None = None
    text: str = ""
    findings: dict | None = None
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)


def _dir_is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def check_output_root(root: str | os.PathLike, *, overwrite_option: bool, resume: bool = True) -> str:
    """Check an output directory before any work: ``"new"`` (absent or empty) or ``"resume"``
    (holds a dataset: ``dataset.json``); raise one line for a file, or a non-empty directory
    that holds no dataset (or any non-empty one when ``resume`` is False).

    ``overwrite_option``: whether the calling command has ``--overwrite`` (the message offers it).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise GuideGenError(f"{root}: exists and is not a directory")
    if not root.is_dir() or _dir_is_empty(root):
        return "new"
    if resume and (root / "dataset.json").is_file():
        return "resume"
    what = "holds no guidegen dataset" if resume else "is not empty"
    hint = "use --overwrite to replace its dataset, or choose a new or empty directory" if overwrite_option else "choose a new or empty directory"
    raise GuideGenError(f"{root}: directory {what} ({hint})")


def check_out_apart_from_inputs(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output directory that is an input, holds one, or lies inside an input
    directory (option name → path; None entries are skipped): writing there would mix the
    outputs into the inputs, and ``--overwrite`` could replace them."""
    target = Path(out).resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise GuideGenError(f"--out {out}: holds the input {option} {path}; choose an --out outside the inputs")
        if source.is_dir() and source in target.parents:
            raise GuideGenError(f"--out {out}: lies inside the input {option} {path}; choose an --out outside the inputs")


def write_case_preview(root: str | os.PathLike, record: CaseRecord, label_set: LabelSet) -> None:
    """``root/previews/<case>.png`` of a record (atomic).

    The slow part of writing a case (a matplotlib figure, ~20x the NIfTI writes at the demo
    grid): :meth:`DatasetWriter.write_case` calls it, and parallel writers call it in their
    worker processes, then ``write_case(record, preview=False)``.
    """
    from guidegen.viz import save_case_preview

    case = check_case_id(record.case)
    save_case_preview(Path(root) / "previews" / f"{case}.png", np.asarray(record.labels), record.ct, label_set,
                      title=case, spacing=record.spacing)


class DatasetWriter:
    """Write cases into a dataset directory, one complete case at a time.

    ``mode``: ``"new"`` (the directory must be missing or empty), ``"overwrite"`` (remove an
    existing dataset's entries first) or ``"resume"`` (keep complete cases; ``has_case`` tells
    which exist so a re-run skips them).
    """

    def __init__(self, root: str | os.PathLike, *, name: str, label_set: str = "guidegen22", mode: str = "new", info: dict | None = None):
        self.root = Path(root)
        self.label_set = load_label_set(label_set)
        self.name = name
        self.info = dict(info or {})
        self._prepare_root(mode)
        for sub in ("labels", "meta", "previews"):
            (self.root / sub).mkdir(exist_ok=True)
        if not (self.root / "dataset.json").exists() or mode != "resume":
            self._write_dataset_json(status="incomplete")

    def _prepare_root(self, mode: str) -> None:
        root = self.root
        if mode == "overwrite":
            if root.exists() and not root.is_dir():
                raise GuideGenError(f"{root}: exists and is not a directory")
        else:
            check_output_root(root, overwrite_option=True, resume=mode == "resume")
        if root.is_dir() and not _dir_is_empty(root):
            if mode == "overwrite":
                # --overwrite replaces a dataset; a folder without dataset.json that holds ct/,
                # labels/ ... is someone's data (a user's input folder), not ours to delete
                if not (root / "dataset.json").is_file():
                    theirs = [e for e in _LAYOUT_ENTRIES if (root / e).exists()]
                    if theirs:
                        raise GuideGenError(f"{root}: holds {theirs[0]}{'/' if (root / theirs[0]).is_dir() else ''} but no guidegen "
                                            "dataset (no dataset.json); --overwrite replaces datasets only: choose another directory")
                for entry in _LAYOUT_ENTRIES:
                    target = root / entry
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".write_probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise GuideGenError(f"{root}: not writable ({exc.strerror or exc})") from None

    def _write_dataset_json(self, status: str) -> None:
        body = {
            "name": self.name,
            "format_version": FORMAT_VERSION,
            "label_set": self.label_set.name,
            "labels": {str(c.id): c.name for c in self.label_set.classes},
            "num_cases": len(self.case_ids()),
            "status": status,
            "guidegen_version": __version__,
            **self.info,
        }
        write_json_atomic(self.root / "dataset.json", body)

    def mark_incomplete(self) -> None:
        """Set ``dataset.json``'s status to incomplete while a resumed run adds cases (a reader
        must not take the dataset for finished; :meth:`finalize` marks it complete again)."""
        with self._reports_locked():
            self._write_dataset_json(status="incomplete")

    def case_ids(self) -> list[str]:
        return sorted(p.name.removesuffix(".json") for p in (self.root / "meta").glob("*.json") if not p.name.startswith("."))

    def has_case(self, case: str) -> bool:
        return _case_complete(self.root, case)

    def write_case(self, record: CaseRecord, *, preview: bool = True) -> None:
        """Write volumes, preview, meta (the commit marker) and the report line of one case."""
        case = check_case_id(record.case)
        labels = np.asarray(record.labels)
        if labels.ndim != 3:
            raise GuideGenError(f"case {case}: label map must be 3D, got shape {labels.shape}")
        if labels.size and int(labels.max()) >= self.label_set.num_classes:
            raise GuideGenError(f"case {case}: label id {int(labels.max())} outside label set {self.label_set.name}")
        meta_path = self.root / "meta" / f"{case}.json"
        if meta_path.exists():  # rewriting a case: un-commit it first so a crash cannot mix versions
            meta_path.unlink()
        save_nifti(self.root / "labels" / f"{case}.nii.gz", labels, record.affine, np.uint8)
        if record.ct is not None:
            if record.ct.shape != labels.shape:
                raise GuideGenError(f"case {case}: CT shape {record.ct.shape} differs from label shape {labels.shape}")
            ct = np.clip(np.rint(record.ct), -32768, 32767)
            save_nifti(self.root / "ct" / f"{case}.nii.gz", ct, record.affine, np.int16)
        if preview:
            write_case_preview(self.root, record, self.label_set)
        meta = {
            "case": case,
            "shape": list(labels.shape),
            "spacing_mm": [round(s, 4) for s in record.spacing],
            "has_ct": record.ct is not None,
            "text": record.text,
            "findings": record.findings,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **record.meta,
        }
        write_json_atomic(meta_path, meta)
        self._append_report(case, record.text, record.findings)

    @contextlib.contextmanager
    def _reports_locked(self) -> Iterator[IO[str]]:
        """``reports.jsonl`` opened for appending under an exclusive lock.

        The ranks of a torchrun job append to one file, and :meth:`finalize` (run by whichever
        rank finishes last) replaces it: both hold this lock, and a writer that waited while
        the file was replaced locks the new file instead of appending to the unlinked one.
        """
        path = self.root / "reports.jsonl"
        while True:
            fh = open(path, "a")
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                current = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            fh.close()
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _append_report(self, case: str, text: str, findings: dict | None) -> None:
        line = json.dumps({"case": case, "text": text, "findings": findings}) + "\n"
        with self._reports_locked() as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def finalize(self) -> None:
        """Rewrite ``reports.jsonl`` from the complete cases (sorted, deduplicated) and mark done."""
        with self._reports_locked():
            reader = DatasetReader(self.root)
            lines = [json.dumps({"case": c, **reader.report(c)}) for c in reader.case_ids()]
            write_text_atomic(self.root / "reports.jsonl", "".join(line + "\n" for line in lines))
            self._write_dataset_json(status="complete")


def _case_complete(root: Path, case: str) -> bool:
    return (root / "meta" / f"{case}.json").is_file() and (root / "labels" / f"{case}.nii.gz").is_file()


class DatasetReader:
    """Read a dataset directory; only complete cases (with their meta file) are visible."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        ds_json = self.root / "dataset.json"
        if not self.root.is_dir():
            raise GuideGenError(f"{self.root}: dataset directory not found")
        if not ds_json.is_file():
            raise GuideGenError(f"{ds_json}: missing; not a guidegen dataset directory")
        try:
            self.info = json.loads(ds_json.read_text())
        except json.JSONDecodeError as exc:
            raise GuideGenError(f"{ds_json}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        version = self.info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise GuideGenError(f"{ds_json}: format_version {version!r} is not supported (this guidegen reads <= {FORMAT_VERSION})")
        self.label_set: LabelSet = load_label_set(self.info.get("label_set", "guidegen22"))
        self._reports: dict[str, dict] | None = None

    @property
    def incomplete(self) -> bool:
        """Whether ``dataset.json`` says the run that writes this set has not finished (an
        interrupted phantom, prepare or generate run; a missing status counts as finished)."""
        return self.info.get("status") == "incomplete"

    def case_ids(self) -> list[str]:
        meta_dir = self.root / "meta"
        if not meta_dir.is_dir():
            return []
        ids = (p.name.removesuffix(".json") for p in meta_dir.glob("*.json") if not p.name.startswith("."))
        return sorted(c for c in ids if _case_complete(self.root, c))

    def __len__(self) -> int:
        return len(self.case_ids())

    def meta(self, case: str) -> dict:
        path = self.root / "meta" / f"{case}.json"
        if not path.is_file():
            raise GuideGenError(f"{self.root}: no complete case {case!r}")
        return json.loads(path.read_text())

    def _load_reports(self) -> dict[str, dict]:
        reports: dict[str, dict] = {}
        path = self.root / "reports.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted append; the meta file has the same data
                if isinstance(obj, dict) and "case" in obj:
                    reports[obj["case"]] = {"text": obj.get("text", ""), "findings": obj.get("findings")}
        return reports

    def report(self, case: str) -> dict:
        """``{"text", "findings"}`` of a case (from reports.jsonl, else its meta)."""
        if self._reports is None:
            self._reports = self._load_reports()
        if case in self._reports:
            return self._reports[case]
        meta = self.meta(case)
        return {"text": meta.get("text", ""), "findings": meta.get("findings")}

    def labels_path(self, case: str) -> Path:
        return self.root / "labels" / f"{case}.nii.gz"

    def ct_path(self, case: str) -> Path:
        return self.root / "ct" / f"{case}.nii.gz"

    def load_case(self, case: str, *, with_ct: bool = True) -> CaseRecord:
        labels, affine = load_nifti(self.labels_path(case))
        ct = None
        if with_ct and self.ct_path(case).is_file():
            ct, _ = load_nifti(self.ct_path(case))
        rep = self.report(case)
        return CaseRecord(case=case, labels=labels.astype(np.uint8), affine=affine, ct=ct, text=rep["text"], findings=rep["findings"], meta=self.meta(case))
