"""Export a dataset (real or synthetic, DESIGN §4) as an nnU-Net v2 raw dataset.

```
OUT/DatasetNNN_NAME/
  imagesTr/<case>_0000.nii.gz   CT (channel 0), int16 HU, copied as is
  labelsTr/<case>.nii.gz        uint8 label ids, same grid and affine
  dataset.json                  channel_names {"0": "CT"}, labels {name: id}, numTraining, file_ending
```
nnU-Net's "CT" channel name selects its CT intensity normalization (global percentile clip +
z-score). Labels must be consecutive ids from 0 = background, which every guidegen label set is.
:func:`check_nnunet_dataset` checks the result the way nnU-Net's ``verify_dataset_integrity``
does (file pairs, geometry, label values) without needing nnU-Net installed.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from guidegen.errors import GuideGenError
from guidegen.evaluation.sets import open_dataset
from guidegen.io import write_json_atomic

FILE_ENDING = ".nii.gz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def nnunet_dataset_dir(out: str | Path, dataset_id: int, name: str) -> Path:
    """``OUT/DatasetNNN_NAME`` (nnU-Net names datasets by a 3-digit id and a name)."""
    return Path(out) / f"Dataset{dataset_id:03d}_{name}"


def export_nnunet(data: str | Path, out: str | Path, dataset_id: int, name: str, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Write ``data`` as nnU-Net v2 raw dataset ``OUT/DatasetNNN_NAME``, checked by
    :func:`check_nnunet_dataset` before it takes that name; returns that directory."""
    if not 1 <= int(dataset_id) <= 999:
        raise GuideGenError(f"--dataset-id: must be between 1 and 999 (nnU-Net uses 3 digits), got {dataset_id}")
    if not _NAME.match(name or ""):
        raise GuideGenError(f"--name: use letters, digits, '_' or '-' (no spaces), got {name!r}")
    if re.match(r"^Dataset\d{3}_", name):
        raise GuideGenError(f"--name: give the name without the DatasetNNN_ prefix (--dataset-id sets the number), got {name!r}")
    reader = open_dataset(data, "--data")
    cases = reader.case_ids()
    if reader.incomplete:
        print(f"warning: --data {data}: dataset.json says status 'incomplete' (an interrupted run?): exporting its "
              f"{len(cases)} complete case(s)", file=sys.stderr)
    missing = [c for c in cases if not reader.ct_path(c).is_file()]
    if missing:
        raise GuideGenError(f"--data {data}: {len(missing)} of {len(cases)} case(s) have no CT (first: ct/{missing[0]}.nii.gz); nnU-Net needs image + label pairs")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GuideGenError(f"--out {out}: exists and is not a directory")
    target = nnunet_dataset_dir(out, dataset_id, name)
    clash = [p.name for p in out.glob(f"Dataset{int(dataset_id):03d}_*") if p != target] if out.is_dir() else []
    if clash:
        raise GuideGenError(f"--dataset-id {dataset_id}: {out} already holds {clash[0]}; nnU-Net needs one dataset per id "
                            f"(choose another --dataset-id, or remove {clash[0]} first)")
    replace = target.exists() and any(target.iterdir())
    if replace and not overwrite:
        raise GuideGenError(f"--out {target}: exists and is not empty (use --overwrite to replace it)")
    tmp = target.with_name(f".{target.name}.partial")  # built aside, moved into place when complete
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    from tqdm import tqdm

    for case in tqdm(cases, desc="export nnU-Net", unit="case", disable=not progress):
        shutil.copyfile(reader.ct_path(case), tmp / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        shutil.copyfile(reader.labels_path(case), tmp / "labelsTr" / f"{case}{FILE_ENDING}")
    ls = reader.label_set
    body = {
        "name": name,
        "description": f"exported by guidegen from {reader.info.get('name', Path(data).name)} ({reader.info.get('source', 'dataset')})",
        "channel_names": {"0": "CT"},
        "labels": {c.name: c.id for c in ls.classes},
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        "label_set": ls.name,
    }
    write_json_atomic(tmp / "dataset.json", body)
    splits = grouped_splits(reader, cases)
    if splits is not None:
        write_json_atomic(tmp / SPLITS_FILE, splits)
    # checked before it replaces anything: a failing export leaves the previous dataset as it was
    problems = check_nnunet_dataset(tmp)
    if problems:
        shutil.rmtree(tmp)
        raise GuideGenError(f"{target}: the exported dataset failed its check: {problems[0]} (+{len(problems) - 1} more); "
                            "nothing was replaced")
    # the dataset it replaces is moved aside, not deleted, until the new one is in place: an
    # export that fails half-way leaves the previous dataset as it was
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


SPLITS_FILE = "splits_final.json"
NNUNET_FOLDS = 5


def source_map_groups(reader, cases: list[str]) -> dict[str, list[str]]:
    """Cases grouped by the label map they were rendered from: the CTs ``generate --labels``
    made of one map (``request.labels_digest`` in their meta) form one group; every other case
    is its own."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        digest = (reader.meta(case).get("request") or {}).get("labels_digest")
        groups.setdefault(f"map:{digest}" if digest else f"case:{case}", []).append(case)
    return groups


def grouped_splits(reader, cases: list[str], folds: int = NNUNET_FOLDS, seed: int = 0) -> list[dict] | None:
    """nnU-Net's ``splits_final.json`` (``[{"train": [...], "val": [...]}]``, ``folds`` of them,
    fewer when there are fewer source maps) with every source map's CTs in one fold; None when no
    map has more than one CT (nnU-Net's own random split is then as good).

    Why: nnU-Net splits cases at random for its cross-validation; several CTs of one label map
    (``--n`` > 1) would land in both training and validation, and the validation Dice would
    measure memorised anatomy. Groups go to folds largest first, each to the fold with the fewest
    cases so far (ties by a seeded shuffle). One source map alone cannot be split: raises."""
    groups = list(source_map_groups(reader, cases).values())
    if all(len(g) == 1 for g in groups):
        return None
    if len(groups) < 2:
        raise GuideGenError(f"--data {reader.root}: all {len(cases)} CTs come from one label map; no cross-validation split can "
                            "keep training and validation apart (render CTs of more maps)")
    folds = min(folds, len(groups))
    order = np.random.default_rng(seed).permutation(len(groups))
    fold_cases: list[list[str]] = [[] for _ in range(folds)]
    for i in sorted(order, key=lambda i: -len(groups[i])):  # stable: the shuffle breaks size ties
        min(fold_cases, key=len).extend(groups[i])
    return [{"train": sorted(c for j, f in enumerate(fold_cases) if j != k for c in f), "val": sorted(fold_cases[k])}
            for k in range(folds)]


def _case_of_image(fname: str, ending: str) -> tuple[str, str] | None:
    m = re.match(rf"^(.*)_(\d{{4}}){re.escape(ending)}$", fname)
    return (m.group(1), m.group(2)) if m else None


def check_nnunet_dataset(path: str | Path) -> list[str]:
    """Problems of an nnU-Net v2 raw dataset directory; an empty list means it looks valid.

    Checks: dataset.json (required keys, background = 0, consecutive label ids), imagesTr /
    labelsTr present, every label has one image per channel and vice versa, file suffixes,
    numTraining, and per case: equal shapes and affines of images and label, label values
    among the declared ids.
    """
    root = Path(path)
    problems: list[str] = []
    ds_json = root / "dataset.json"
    if not ds_json.is_file():
        return [f"{ds_json}: missing"]
    try:
        meta = json.loads(ds_json.read_text())
    except json.JSONDecodeError as exc:
        return [f"{ds_json}: not valid JSON ({exc.msg})"]
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in meta:
            problems.append(f"dataset.json: missing key {key!r}")
    if problems:
        return problems
    ending = meta["file_ending"]
    channels = sorted(meta["channel_names"], key=int)
    labels = meta["labels"]
    ids = sorted(int(v) for v in labels.values() if not isinstance(v, (list, tuple)))
    if labels.get("background") != 0:
        problems.append("dataset.json: labels must map 'background' to 0")
    if ids != list(range(len(ids))):
        problems.append(f"dataset.json: label ids must be consecutive from 0, got {ids}")
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).is_dir():
            problems.append(f"{sub}/: missing")
    if problems:
        return problems
    label_files = sorted(p.name for p in (root / "labelsTr").iterdir() if not p.name.startswith("."))
    image_files = sorted(p.name for p in (root / "imagesTr").iterdir() if not p.name.startswith("."))
    for f in label_files + image_files:
        if not f.endswith(ending):
            problems.append(f"{f}: suffix is not the dataset's file_ending {ending!r}")
    cases = [f[: -len(ending)] for f in label_files if f.endswith(ending)]
    if meta["numTraining"] != len(cases):
        problems.append(f"dataset.json: numTraining is {meta['numTraining']} but labelsTr holds {len(cases)} label files")
    images: dict[str, set[str]] = {}
    for f in image_files:
        parsed = _case_of_image(f, ending)
        if parsed is None:
            if f.endswith(ending):
                problems.append(f"imagesTr/{f}: name is not <case>_XXXX{ending}")
            continue
        images.setdefault(parsed[0], set()).add(parsed[1])
    for case in sorted(set(images) - set(cases)):
        problems.append(f"imagesTr/{case}_*: no label labelsTr/{case}{ending}")
    allowed = set(ids)
    for case in cases:
        have = images.get(case, set())
        for ch in channels:
            if f"{int(ch):04d}" not in have:
                problems.append(f"labelsTr/{case}{ending}: no image imagesTr/{case}_{int(ch):04d}{ending} (channel {ch})")
        try:
            seg = nib.load(str(root / "labelsTr" / f"{case}{ending}"))
            values = np.unique(np.asarray(seg.dataobj))
        except Exception as exc:
            problems.append(f"labelsTr/{case}{ending}: unreadable ({type(exc).__name__})")
            continue
        bad = sorted(set(int(v) for v in values) - allowed) if np.all(np.mod(values, 1) == 0) else ["non-integer"]
        if bad:
            problems.append(f"labelsTr/{case}{ending}: label values {bad} not in dataset.json labels")
        for ch in channels:
            img_path = root / "imagesTr" / f"{case}_{int(ch):04d}{ending}"
            if not img_path.is_file():
                continue
            try:
                img = nib.load(str(img_path))
            except Exception as exc:
                problems.append(f"{img_path.name}: unreadable ({type(exc).__name__})")
                continue
            if img.shape[:3] != seg.shape[:3]:
                problems.append(f"{case}: image shape {img.shape} differs from label shape {seg.shape}")
            elif not np.allclose(img.affine, seg.affine, atol=1e-4):
                problems.append(f"{case}: image and label affines differ")
    return problems
