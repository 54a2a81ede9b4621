"""``guidegen prepare``: round trips through TotalSegmentator-style inputs and validation."""

import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import guidegen
from guidegen.data.dicom import read_dicom_series, write_dicom_series
from guidegen.data.export_totalseg import export_totalseg_folder, export_totalseg_multilabel, export_tumor_mask, split_to_totalseg
from guidegen.data.datasets import CTLabelDataset, LabelMapDataset
from guidegen.data.layout import DatasetReader
from guidegen.data.prepare import (
    PrepareOptions,
    body_mask_from_ct,
    cache_configs,
    class_lookup,
    findings_from_masks,
    load_reports,
    prepare_dataset,
    render_findings_text,
)
from guidegen.data.totalseg import totalseg_classes, totalseg_ids
from guidegen.errors import GuideGenError
from guidegen.io import load_nifti, ras_affine, save_nifti

from helpers_cli import run_cli_inprocess  # noqa: E402  (tests/ is on sys.path)
from helpers_toy import kidney_liver_map  # noqa: E402

GRID = (16, 16, 16)
OPTS = PrepareOptions(grid=GRID, previews=False, margin_mm=10.0)


def _phantom(seed: int):
    """(labels, ct HU float, affine) of a small phantom case (32 x 32 x 40 voxels)."""
    from guidegen.data.phantom import render_phantom

    case = render_phantom(seed, (32, 32, 40))
    ct = case.ct.astype(np.float32) + np.float32(0.3)  # non-integer HU: the writer rounds
    return case.labels.astype(np.uint8), ct, case.affine


def _flip_xy(arr: np.ndarray, affine: np.ndarray):
    """Store a RAS array in LPS-like order (axes 0, 1 reversed) with the matching affine."""
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    f[0, 3], f[1, 3] = arr.shape[0] - 1, arr.shape[1] - 1
    return np.ascontiguousarray(arr[::-1, ::-1]), affine @ f


def _offset(orig_affine: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
    """Voxel index in the original volume of a cropped volume's first voxel."""
    start = np.linalg.solve(orig_affine, out_affine[:, 3])[:3]
    assert np.allclose(start, np.round(start), atol=1e-3)
    return np.round(start).astype(int)


def _expected_crop(orig: np.ndarray, orig_affine: np.ndarray, out: np.ndarray, out_affine: np.ndarray) -> np.ndarray:
    """The region of ``orig`` that a prepared (cropped) volume covers, from the two affines."""
    np.testing.assert_allclose(out_affine[:3, :3], orig_affine[:3, :3], atol=1e-5)
    s = _offset(orig_affine, out_affine)
    return orig[s[0] : s[0] + out.shape[0], s[1] : s[1] + out.shape[1], s[2] : s[2] + out.shape[2]]


def _run_cli(monkeypatch, capsys, *args):
    return run_cli_inprocess(monkeypatch, capsys, *args)


# ------------------------------------------------------------------------------ tables
def test_totalseg_tables_and_mapping(label_set):
    v2, v1 = totalseg_classes(2), totalseg_classes(1)
    assert len(v2) == 117 and len(v1) == 104
    assert (v2[5], v2[51], v2[63], v2[92], v2[117]) == ("liver", "heart", "inferior_vena_cava", "rib_left_1", "costal_cartilages")
    assert (v1[7], v1[44], v1[58], v1[104]) == ("aorta", "heart_myocardium", "rib_left_1", "urinary_bladder")
    for version in (1, 2):
        lut = class_lookup(label_set, version)
        assert set(np.unique(lut)) == {0, *label_set.organ_ids}  # every organ has a source
    lut2 = class_lookup(label_set, 2)
    assert lut2[totalseg_ids(2)["kidney_left"]] == lut2[totalseg_ids(2)["kidney_right"]] == label_set.id_of("kidney")
    assert lut2[totalseg_ids(2)["trachea"]] == 0  # not in the label set → body/background
    assert class_lookup(label_set, 1)[totalseg_ids(1)["heart_atrium_left"]] == label_set.id_of("heart")
    with pytest.raises(GuideGenError, match="totalseg-version"):
        totalseg_classes(3)


def test_dicom_reader_sorts_rescales_and_builds_affine(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 1500, (6, 5, 7)).astype(np.float32)
    lps_arr, lps_aff = _flip_xy(hu, ras_affine((0.8, 0.9, 2.5), (-20.0, 10.0, -100.0)))
    write_dicom_series(tmp_path / "s", lps_arr, lps_aff)
    back, affine, info = read_dicom_series(tmp_path / "s")
    assert info["n_slices"] == 7 and info["rescaled"]
    np.testing.assert_array_equal(back, hu)
    np.testing.assert_allclose(affine, ras_affine((0.8, 0.9, 2.5), (-20.0, 10.0, -100.0)), atol=1e-4)


def test_a_corrupt_dicom_slice_is_named_not_dropped(tmp_path):
    """A truncated DICOM file is an error naming it (dropping it would lose a slice); other
    files in the folder (notes, thumbnails) are still ignored."""
    files = write_dicom_series(tmp_path / "s", np.zeros((6, 5, 7), np.float32) - 1000, ras_affine((1.0, 1.0, 2.0)))
    (tmp_path / "s" / "notes.txt").write_text("scanner export")
    assert read_dicom_series(tmp_path / "s")[2]["n_slices"] == 7
    whole = files[3].read_bytes()
    for keep in (200, 600, len(whole) // 2):
        files[3].write_bytes(whole[:keep])
        with pytest.raises(GuideGenError, match=f"{files[3].name}: .*truncated or corrupt"):
            read_dicom_series(tmp_path / "s")


# -------------------------------------------------------------------------- round trip
def test_round_trip_multilabel_folder_and_dicom(tmp_path, label_set):
    """Three phantom cases, three input forms; labels come back equal, CT within 1 HU."""
    ct_dir, lab_dir, tum_dir, body_dir = (tmp_path / d for d in ("ct", "labels", "tumors", "body"))
    originals = {}
    for seed, case in enumerate(["mlv2", "folder", "dicom"]):
        labels, ct, affine = _phantom(seed)
        originals[case] = (labels, ct, affine)
        s_labels, s_aff = _flip_xy(labels, affine)  # stored in LPS order: prepare reorients
        s_ct, _ = _flip_xy(ct, affine)
        if case == "dicom":
            write_dicom_series(ct_dir / case, s_ct, s_aff)
        else:
            save_nifti(ct_dir / f"{case}.nii.gz", s_ct, s_aff, np.float32)
        if case == "mlv2":
            export_totalseg_multilabel(lab_dir / f"{case}.nii.gz", s_labels, s_aff, label_set, version=2)
            save_nifti(body_dir / f"{case}.nii.gz", s_labels > 0, s_aff, np.uint8)
        else:
            written = export_totalseg_folder(lab_dir / case, s_labels, s_aff, label_set, version=2)
            names = {p.name for p in written}
            assert {"kidney_left.nii.gz", "kidney_right.nii.gz", "lung_middle_lobe_right.nii.gz", "body.nii.gz"} <= names
        export_tumor_mask(tum_dir / f"{case}.nii.gz", s_labels, s_aff, label_set)
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"case": "folder", "text": "A 3 cm mass in the liver."}) + "\n")

    out = tmp_path / "out"
    rep = prepare_dataset(ct_dir, lab_dir, out, tumors=tum_dir, body=body_dir, reports=reports, options=OPTS, workers=2, progress=False)
    assert rep.problems == [], rep.problems
    assert rep.count("written") == 3

    reader = DatasetReader(out)
    assert reader.case_ids() == ["dicom", "folder", "mlv2"]
    for case, (labels, ct, affine) in originals.items():
        rec = reader.load_case(case)
        np.testing.assert_array_equal(rec.labels, _expected_crop(labels, affine, rec.labels, rec.affine))
        assert np.abs(rec.ct.astype(np.float32) - _expected_crop(ct, affine, rec.ct, rec.affine)).max() <= 1.0
        meta = reader.meta(case)
        assert [b - a for a, b in meta["crop_box"]] == list(rec.labels.shape) and meta["original_shape"] == list(labels.shape)
        assert meta["ct_format"] == ("dicom" if case == "dicom" else "nifti")
        assert (meta["totalseg_version"], meta["totalseg_version_source"]) == (2, "detected" if case == "mlv2" else "class names")
        assert meta["body_source"] == "mask" and len(meta["extent_mm"]) == 3
        cache = np.load(out / "cache" / cache_configs(OPTS)[0].key() / f"{case}.npz")
        assert cache["labels"].shape == GRID and cache["ct"].shape == GRID
        assert LabelMapDataset(out, GRID).cache.path(case).is_file()  # the datasets find prepare's cache
        for ds in (LabelMapDataset(out, GRID), CTLabelDataset(out, GRID)):  # ... and take it as fresh (same sources)
            assert ds.cache.is_fresh(case, ds.sources(case))
    assert reader.report("folder")["text"] == "A 3 cm mass in the liver."
    if importlib.util.find_spec("guidegen.text.findings"):  # the report parser, when installed
        assert reader.report("folder")["findings"]["tumors"] == [{"site": "liver", "side": None, "size_mm": 30.0}]
    derived = reader.report("mlv2")
    assert derived["findings"]["tumors"] and "mass in the" in derived["text"]  # from the masks
    assert json.loads((out / "dataset.json").read_text())["status"] == "complete"


def test_round_trip_v1_ids_and_unmapped_classes_become_body(tmp_path, label_set):
    labels, ct, affine = _phantom(7)
    save_nifti(tmp_path / "ct" / "a.nii.gz", ct, affine, np.float32)
    export_totalseg_multilabel(tmp_path / "labels" / "a.nii.gz", labels, affine, label_set, version=1)
    v1 = load_nifti(tmp_path / "labels" / "a.nii.gz")[0]
    present = set(np.unique(v1).tolist())
    assert 44 in present and len(present & {45, 46, 47, 48}) >= 2  # myocardium + chambers to merge
    # a TotalSegmentator class outside the label set (trachea) inside the body → body label
    body_only = np.argwhere(labels[:, :, 20] == label_set.body_id)[:5]  # mid-torso: inside the crop
    body_only = np.c_[body_only, np.full(len(body_only), 20)]
    v1[tuple(body_only.T)] = totalseg_ids(1)["trachea"]
    save_nifti(tmp_path / "labels" / "a.nii.gz", v1, affine, np.uint8)
    save_nifti(tmp_path / "tumors" / "a.nii.gz", (labels == label_set.tumor_id) * 3, affine, np.uint8)  # multi-label tumour mask
    save_nifti(tmp_path / "body" / "a.nii.gz", labels > 0, affine, np.uint8)
    opts = PrepareOptions(grid=GRID, previews=False, totalseg_version=1)
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", tmp_path / "out", tumors=tmp_path / "tumors", body=tmp_path / "body", options=opts, progress=False)
    assert rep.problems == []
    rec = DatasetReader(tmp_path / "out").load_case("a")
    np.testing.assert_array_equal(rec.labels, _expected_crop(labels, affine, rec.labels, rec.affine))
    assert np.all(rec.labels[tuple((body_only - _offset(affine, rec.affine)).T)] == label_set.body_id)


def test_body_derived_from_ct():
    hu = np.full((30, 30, 12), -1000.0, np.float32)
    x, y = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    torso = ((x - 14) / 10) ** 2 + ((y - 15) / 8) ** 2 <= 1
    lung = ((x - 11) / 3) ** 2 + ((y - 15) / 3) ** 2 <= 1
    arm = ((x - 27) / 1.5) ** 2 + ((y - 15) / 1.5) ** 2 <= 1  # a separate component
    hu[torso] = 40.0
    hu[torso & lung] = -850.0
    hu[arm] = 40.0
    hu[14, 15, 6] = -900.0  # an enclosed air bubble (3D hole)
    body = body_mask_from_ct(hu)
    assert body[..., 3][torso].all() and body[14, 15, 6]  # lungs and holes filled
    assert not body[..., 3][arm].any()  # only the largest component
    assert not body[0, 0, 0]


def test_findings_from_masks_site_side_size(label_set):
    labels, affine, (big, small) = kidney_liver_map(label_set, [(15, 3**2), (24, 1)])  # touching the kidney, the liver
    f = findings_from_masks(labels, affine, label_set)
    assert [t["site"] for t in f["tumors"]] == ["kidney", "liver"]
    assert f["tumors"][0]["side"] == "left" and f["tumors"][1]["side"] is None
    expected = 2.0 * (6 * big.sum() / np.pi) ** (1 / 3)
    assert abs(f["tumors"][0]["size_mm"] - expected) < 0.1
    small_cm = 2.0 * (6 * small.sum() / np.pi) ** (1 / 3) / 10
    assert render_findings_text(f) == f"CT of the chest, abdomen and pelvis. A {expected / 10:.1f} cm mass in the left kidney. A {small_cm:.1f} cm mass in the liver."
    assert "No focal mass" in render_findings_text(findings_from_masks(labels * (labels != label_set.tumor_id), affine, label_set))


# -------------------------------------------------------------------------- reports
def test_reports_columns_and_bad_rows(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text('id,report\na,"liver mass, 3 cm"\nb.nii.gz,no lesion\na,dup\n')
    texts, problems = load_reports(csv_path)  # defaults fall back to id / report
    assert texts["a"][0] == "liver mass, 3 cm" and texts["b"][0] == "no lesion"
    assert len(problems) == 1 and "line 4" in problems[0] and "duplicate" in problems[0]
    with pytest.raises(GuideGenError, match="no column 'findings'.*--report-text-column"):
        load_reports(csv_path, text_column="findings")
    jl = tmp_path / "r.jsonl"
    jl.write_text('{"case": "a", "text": "x"}\nnot json\n')
    texts, problems = load_reports(jl)
    assert list(texts) == ["a"] and "line 2" in problems[0]
    (tmp_path / "r.xlsx").write_text("x")
    with pytest.raises(GuideGenError, match="r.xlsx: unknown format .xlsx"):
        load_reports(tmp_path / "r.xlsx")


# ------------------------------------------------------------------------ validation
def _good_inputs(root, case, label_set, seed=0):
    labels, ct, affine = _phantom(seed)
    save_nifti(root / "ct" / f"{case}.nii.gz", ct, affine, np.float32)
    export_totalseg_multilabel(root / "labels" / f"{case}.nii.gz", labels, affine, label_set)
    return labels, ct, affine


def test_validation_reports_every_problem_and_writes_good_cases(tmp_path, monkeypatch, capsys, label_set):
    ct, lab = tmp_path / "ct", tmp_path / "labels"
    labels, hu, affine = _good_inputs(tmp_path, "good", label_set)
    ml = load_nifti(lab / "good.nii.gz")[0]
    # 2D and 4D CT
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), ct / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), ct / "four.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.int16) - 1000, affine), ct / "slab.nii.gz")  # a 2D image stored as 3D
    save_nifti(lab / "slab.nii.gz", ml[:, :, :1], affine, np.uint8)
    save_nifti(lab / "flat.nii.gz", ml[:8, :8, :8], np.eye(4), np.uint8)
    save_nifti(lab / "four.nii.gz", ml[:8, :8, :8], np.eye(4), np.uint8)
    # unreadable NIfTI and a non-NIfTI file
    (ct / "corrupt.nii.gz").write_bytes(b"not really gzip")
    save_nifti(lab / "corrupt.nii.gz", ml, affine, np.uint8)
    (ct / "notes.txt").write_text("hello")
    # CT/mask shape and affine mismatch
    save_nifti(ct / "shape.nii.gz", hu, affine, np.float32)
    save_nifti(lab / "shape.nii.gz", ml[:-1], affine, np.uint8)
    save_nifti(ct / "affine.nii.gz", hu, affine, np.float32)
    shifted = affine.copy()
    shifted[2, 3] += 2.0
    save_nifti(lab / "affine.nii.gz", ml, shifted, np.uint8)
    # NaN CT, raw (not HU) CT, empty labels
    bad = hu.copy()
    bad[3, 3, 3] = np.nan
    save_nifti(ct / "nan.nii.gz", bad, affine, np.float32)
    save_nifti(lab / "nan.nii.gz", ml, affine, np.uint8)
    save_nifti(ct / "raw.nii.gz", np.clip(hu + 1024, 0, 4095), affine, np.float32)
    save_nifti(lab / "raw.nii.gz", ml, affine, np.uint8)
    save_nifti(ct / "empty.nii.gz", hu, affine, np.float32)
    save_nifti(lab / "empty.nii.gz", np.zeros_like(ml), affine, np.uint8)
    # per-class folder with an unknown class file name: ignored with a warning, the case is written
    save_nifti(ct / "unknown.nii.gz", hu, affine, np.float32)
    export_totalseg_folder(lab / "unknown", labels, affine, label_set)
    save_nifti(lab / "unknown" / "livr.nii.gz", labels == 3, affine, np.uint8)
    # duplicate case id (.nii and .nii.gz), labels without CT, multi-label ids outside v2
    save_nifti(ct / "dup.nii.gz", hu, affine, np.float32)
    save_nifti(ct / "dup.nii", hu, affine, np.float32)
    save_nifti(lab / "dup.nii.gz", ml, affine, np.uint8)
    save_nifti(lab / "orphan.nii.gz", ml, affine, np.uint8)
    save_nifti(ct / "ids.nii.gz", hu, affine, np.float32)
    save_nifti(lab / "ids.nii.gz", np.where(ml > 0, 200, 0), affine, np.uint8)
    # a DICOM series with a missing slice
    write_dicom_series(ct / "gap", hu, affine)
    gap_files = sorted((ct / "gap").iterdir(), key=lambda p: int(p.stem.split("_")[-1]))
    gap_files[len(gap_files) // 2].unlink()
    save_nifti(lab / "gap.nii.gz", ml, affine, np.uint8)
    # a report for a case that is not in the input
    (tmp_path / "r.csv").write_text("case,text\ngood,A 3 cm liver mass.\nghost,whatever\n")

    out = tmp_path / "out"
    code, stdout, stderr = _run_cli(monkeypatch, capsys, "prepare", "--ct", ct, "--labels", lab, "--reports", tmp_path / "r.csv", "--out", out, "--size", "16", "--no-previews")
    assert code == 2
    assert "Traceback" not in stderr
    expected = {
        "flat.nii.gz: image is 2D",
        "four.nii.gz: image is 4D",
        "slab.nii.gz: shape (32, 32, 1) has fewer than 8 voxels along an axis",
        "corrupt.nii.gz: cannot read NIfTI",
        "notes.txt: not a NIfTI file",
        "labels/shape.nii.gz: shape (31, 32, 40) differs from the CT's (32, 32, 40)",
        "labels/affine.nii.gz: origin differs from the CT's by 2 mm",
        "nan.nii.gz: 1 voxel(s) are NaN or infinite",
        "raw.nii.gz: values 0 to",
        "labels/empty.nii.gz: label map is empty",
        "duplicate case id 'dup'",
        "orphan.nii.gz: --labels file has no matching CT",
        "labels/ids.nii.gz: unknown label id(s) 200",
        "gap: uneven slice spacing",
        "r.csv line 3: report for case 'ghost'",
    }
    lines = stderr.splitlines()
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, (fragment, stderr)
    head = next(i for i, line in enumerate(lines) if line.startswith("error: "))  # after tqdm's bar
    assert lines[head].startswith(f"error: {len(lines) - head - 1} problem(s)")  # then one line per problem
    assert all(line.startswith("  ") for line in lines[head + 1 :])
    assert not any("livr" in line for line in lines[head:])  # an unknown class file is a warning, not a problem
    assert "wrote 2 case(s)" in stdout and "wrote 2 case(s)" in lines[head]
    assert "1 case(s): unknown class file(s) in the per-class folder ignored" in stdout
    assert "1 case(s): the report names a tumour the label map lacks" in stdout  # good: "3 cm liver mass", no --tumors
    reader = DatasetReader(out)
    assert reader.case_ids() == ["good", "unknown"]
    assert [w["kind"] for w in reader.meta("unknown")["warnings"]] == ["unknown_class_file"]
    assert "unknown/livr.nii.gz: unknown class name 'livr'" in reader.meta("unknown")["warnings"][0]["message"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["good.nii.gz", "unknown.nii.gz"]
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["good.nii.gz", "unknown.nii.gz"]
    assert sorted(p.name for p in (out / "cache").rglob("*.npz")) == ["good.npz", "good.npz", "unknown.npz", "unknown.npz"]
    assert reader.report("good")["text"] == "A 3 cm liver mass."
    assert reader.meta("good")["body_source"].startswith("derived")  # no body mask: from the CT
    good = reader.load_case("good")  # the phantom's body is > -500 HU, filled: derivation matches it
    no_tumor_given = np.where(labels == label_set.tumor_id, label_set.body_id, labels)
    np.testing.assert_array_equal(good.labels, _expected_crop(no_tumor_given, affine, good.labels, good.affine))


def test_dry_run_prints_table_and_writes_nothing(tmp_path, monkeypatch, capsys, label_set):
    _good_inputs(tmp_path, "c1", label_set, seed=1)
    _good_inputs(tmp_path, "c2", label_set, seed=2)
    out = tmp_path / "out"
    code, stdout, _ = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--out", out, "--dry-run")
    assert code == 0 and not out.exists()
    assert "c1" in stdout and "c2" in stdout and "HU range" in stdout and "spacing mm" in stdout
    assert "-1024.." in stdout and "32x32x40 →" in stdout
    assert re.search(r"│ c1 .*│ 2[01]/21 .*│ valid", stdout)  # 20 or 21 of 21 classes, per tumour
    assert "dry run: 2 valid case(s)" in stdout
    # a dry run with a problem exits 2 and still writes nothing
    (tmp_path / "labels" / "c3.nii.gz").write_bytes(b"x")
    code, _, stderr = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--dry-run")
    assert code == 2 and "c3.nii.gz: --labels file has no matching CT" in stderr and not out.exists()


def test_rerun_skips_done_cases_and_redoes_interrupted(tmp_path, label_set):
    for i, case in enumerate(["a", "b"]):
        _good_inputs(tmp_path, case, label_set, seed=i)
    args = (tmp_path / "ct", tmp_path / "labels", tmp_path / "out")
    first = prepare_dataset(*args, options=OPTS, progress=False)
    assert first.count("written") == 2
    stamp = (tmp_path / "out" / "labels" / "a.nii.gz").stat().st_mtime_ns
    (tmp_path / "out" / "meta" / "b.json").unlink()  # as if the run died while writing b
    second = prepare_dataset(*args, options=OPTS, progress=False)
    assert {r.case: r.status for r in second.results} == {"a": "skipped", "b": "written"}
    assert (tmp_path / "out" / "labels" / "a.nii.gz").stat().st_mtime_ns == stamp
    assert DatasetReader(tmp_path / "out").case_ids() == ["a", "b"]
    lines = (tmp_path / "out" / "reports.jsonl").read_text().splitlines()
    assert [json.loads(line)["case"] for line in lines] == ["a", "b"]
    other = tmp_path / "other.yaml"
    other.write_text(Path(guidegen.__file__).with_name("labelsets").joinpath("guidegen22.yaml").read_text().replace("name: guidegen22", "name: other"))
    with pytest.raises(GuideGenError, match="uses label set 'guidegen22', not 'other'"):
        prepare_dataset(*args, options=PrepareOptions(label_set=str(other), grid=GRID), progress=False)


def test_rerun_refuses_cases_of_other_inputs_or_settings(tmp_path, label_set):
    """A finished case whose CT, report or options changed is not skipped as done: the run is
    refused (nothing written) until --overwrite; an interrupted resume leaves the set incomplete."""
    for i, case in enumerate(["a", "b"]):
        _good_inputs(tmp_path, case, label_set, seed=i)
    reports = tmp_path / "r.csv"
    reports.write_text("case,text\na,A 3 cm liver mass.\n")
    args = (tmp_path / "ct", tmp_path / "labels", tmp_path / "out")
    assert prepare_dataset(*args, reports=reports, options=OPTS, progress=False).count("written") == 2
    stamp = (tmp_path / "out" / "meta" / "a.json").stat().st_mtime_ns
    with pytest.raises(GuideGenError, match=r"a.json: case 'a' was prepared from other inputs or settings \(margin_mm\) \(and 1 more"):
        prepare_dataset(*args, reports=reports, options=PrepareOptions(grid=GRID, previews=False, margin_mm=0.0), progress=False)
    reports.write_text("case,text\na,A 5 cm liver mass.\n")
    with pytest.raises(GuideGenError, match=r"case 'a' was prepared from other inputs or settings \(report_sha256\); nothing written"):
        prepare_dataset(*args, reports=reports, options=OPTS, progress=False)
    reports.write_text("case,text\na,A 3 cm liver mass.\n")
    labels, ct, affine = _phantom(5)
    save_nifti(tmp_path / "ct" / "b.nii.gz", ct, affine, np.float32)  # another CT under the same name
    with pytest.raises(GuideGenError, match=r"case 'b' was prepared from other inputs or settings \(ct\)"):
        prepare_dataset(*args, reports=reports, options=OPTS, progress=False)
    assert (tmp_path / "out" / "meta" / "a.json").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["status"] == "complete"
    # the new CT is written with --overwrite; then a resume that is interrupted marks the set incomplete
    export_totalseg_multilabel(tmp_path / "labels" / "b.nii.gz", labels, affine, label_set)
    assert prepare_dataset(*args, reports=reports, options=OPTS, overwrite=True, progress=False).count("written") == 2
    _good_inputs(tmp_path, "c", label_set, seed=2)
    from guidegen.data import prepare as prepare_module

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare_module, "process_case", interrupted)
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(*args, reports=reports, options=OPTS, progress=False)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["status"] == "incomplete"


def test_bad_report_rows_write_nothing_and_json_arrays_are_read(tmp_path, label_set):
    _good_inputs(tmp_path, "a", label_set)
    args = (tmp_path / "ct", tmp_path / "labels", tmp_path / "out")
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"case": "a", "text": "liver mass 3 cm"}\nnot json\n')
    with pytest.raises(GuideGenError, match=r"--reports .*r.jsonl: 1 problem\(s\), first: .*line 2: not valid JSON.*nothing written"):
        prepare_dataset(*args, reports=bad, options=OPTS, progress=False)
    assert not (tmp_path / "out").exists()
    array = tmp_path / "r.json"
    array.write_text(json.dumps([{"case": "a", "text": "A 3 cm liver mass."}]))
    assert prepare_dataset(*args, reports=array, options=OPTS, progress=False).count("written") == 1
    assert DatasetReader(tmp_path / "out").report("a")["text"] == "A 3 cm liver mass."
    with pytest.raises(GuideGenError, match="--reports .*: is a directory"):
        load_reports(tmp_path)
    with pytest.raises(GuideGenError, match="--margin-mm must be a number >= 0, got nan"):
        prepare_dataset(*args, options=PrepareOptions(grid=GRID, margin_mm=float("nan")), progress=False)


def test_upper_case_nifti_names_pair_like_lower_case_ones(tmp_path, label_set):
    _good_inputs(tmp_path, "CT01", label_set)
    (tmp_path / "ct" / "CT01.nii.gz").rename(tmp_path / "ct" / "CT01.NII.GZ")
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", None, options=OPTS, dry_run=True, progress=False)
    assert rep.problems == [] and [r.case for r in rep.results] == ["CT01"] and rep.count("valid") == 1


def test_a_ct_without_orientation_is_written_with_a_warning(tmp_path, label_set):
    _, ct, affine = _good_inputs(tmp_path, "a", label_set)
    ml = nib.load(tmp_path / "labels" / "a.nii.gz")
    for folder, data in (("ct", ct), ("labels", np.asarray(ml.dataobj))):  # both written by a tool that drops orientation
        img = nib.Nifti1Image(data, affine)
        img.set_qform(None, code=0)
        img.set_sform(None, code=0)
        nib.save(img, tmp_path / folder / "a.nii.gz")
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", None, options=OPTS, dry_run=True, progress=False)
    assert rep.warning_counts() == {"no_orientation": 1}
    assert any("a.nii.gz: no orientation in the NIfTI header" in line for line in rep.warnings)


def test_an_out_that_holds_the_inputs_is_refused(tmp_path, label_set):
    """--out above the inputs (with --overwrite above all) would replace them."""
    _good_inputs(tmp_path / "hospital", "a", label_set)
    root = tmp_path / "hospital"
    for overwrite in (False, True):
        with pytest.raises(GuideGenError, match=r"--out .*hospital: holds the input --ct .*choose an --out outside the inputs"):
            prepare_dataset(root / "ct", root / "labels", root, options=OPTS, overwrite=overwrite, progress=False)
    assert sorted(p.name for p in (root / "ct").iterdir()) == ["a.nii.gz"]


def test_split_exporter_covers_every_voxel(label_set):
    labels, _, affine = _phantom(3)
    parts = split_to_totalseg(labels, affine, label_set, version=2)
    merged = np.zeros_like(labels)
    lut = class_lookup(label_set, 2)
    ids = totalseg_ids(2)
    for name, mask in parts.items():
        assert not np.any(merged[mask]), name  # parts never overlap
        merged[mask] = lut[ids[name]]
    organs = np.isin(labels, label_set.organ_ids)
    np.testing.assert_array_equal(merged[organs], labels[organs])
    assert not merged[~organs].any()
    assert sum(n.startswith("lung_") for n, m in parts.items() if m.any()) == 5
