"""``guidegen prepare``: a report's tumours checked against the label map, ``--findings``, unknown class files."""

import json

import numpy as np
import pytest

from guidegen.data.export_totalseg import export_totalseg_folder, export_totalseg_multilabel
from guidegen.data.layout import DatasetReader
from guidegen.data.prepare import PrepareOptions, check_findings, prepare_dataset, tumor_stats
from guidegen.errors import GuideGenError
from guidegen.evaluation.metrics import case_stats, sphere_diameter_mm
from guidegen.io import save_nifti

from helpers_cli import run_cli_inprocess  # noqa: E402  (tests/ is on sys.path)
from helpers_toy import kidney_liver_map  # noqa: E402

GRID = (16, 16, 16)
OPTS = PrepareOptions(grid=GRID, previews=False)
LIVER_BLOCK = (slice(19, 22), slice(19, 22), slice(21, 24))  # 3x3x3 voxels deep inside the seed-0 phantom's liver


def _phantom(seed: int = 0):
    """(labels, ct HU, affine) of a small phantom case (32 x 32 x 40 voxels of about 11 x 9 x 12 mm)."""
    from guidegen.data.phantom import render_phantom

    case = render_phantom(seed, (32, 32, 40))
    return case.labels.astype(np.uint8), case.ct.astype(np.float32), case.affine


def _case(root, case, label_set, *, tumor=None, folder=False, seed=0):
    """Write a case's CT and TotalSegmentator labels (no tumour class), plus a tumour mask when given."""
    labels, ct, affine = _phantom(seed)
    save_nifti(root / "ct" / f"{case}.nii.gz", ct, affine, np.float32)
    if folder:
        export_totalseg_folder(root / "labels" / case, labels, affine, label_set)
    else:
        export_totalseg_multilabel(root / "labels" / f"{case}.nii.gz", labels, affine, label_set)
    if tumor is not None:
        save_nifti(root / "tumors" / f"{case}.nii.gz", tumor, affine, np.uint8)
    return labels, affine


def _liver_tumor(label_set):
    labels, _, affine = _phantom(0)
    mask = np.zeros(labels.shape, np.uint8)
    mask[LIVER_BLOCK] = 1
    assert (labels[LIVER_BLOCK] == label_set.id_of("liver")).all()
    return mask, sphere_diameter_mm(mask.sum() * abs(np.linalg.det(affine[:3, :3])))


def _reports(root, rows: dict) -> object:
    path = root / "reports.jsonl"
    path.write_text("".join(json.dumps({"case": c, "text": t}) + "\n" for c, t in rows.items()))
    return path


def _run_cli(monkeypatch, capsys, *args):
    return run_cli_inprocess(monkeypatch, capsys, *args, columns=400)  # the dry-run table unfolded


def _kinds(meta: dict) -> list[str]:
    return [w["kind"] for w in meta["warnings"]]


# ------------------------------------------------------------------- report vs label map
def test_report_tumour_without_tumour_mask_is_written_with_a_warning(tmp_path, monkeypatch, capsys, label_set):
    _case(tmp_path, "c1", label_set)
    _case(tmp_path, "c2", label_set, seed=1)  # no report: findings from the map, nothing to check
    reports = _reports(tmp_path, {"c1": "A 4 cm mass in the left kidney."})
    args = ("prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--reports", reports, "--size", "16", "--no-previews")

    code, stdout, _ = _run_cli(monkeypatch, capsys, *args, "--dry-run")
    assert code == 0
    assert "dry run: 2 valid case(s)" in stdout and "1 case(s): the report names a tumour the label map lacks" in stdout
    row = next(line for line in stdout.splitlines() if "│ c1 " in line)
    assert "not in map: 40 mm left kidney tumour" in row
    full = [line for line in stdout.splitlines() if line.startswith("warning: ")]
    assert len(full) == 1 and full[0].startswith("warning: c1: the report names a 40 mm left kidney tumour")

    code, stdout, stderr = _run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "out")
    assert code == 0, stderr
    assert "wrote 2 case(s)" in stdout and "0 problem(s)" in stdout
    assert "1 case(s): the report names a tumour the label map lacks" in stdout and "warnings.txt" in stdout
    reader = DatasetReader(tmp_path / "out")
    assert reader.case_ids() == ["c1", "c2"]  # written despite the warning
    meta = reader.meta("c1")
    assert _kinds(meta) == ["report_tumor_missing"]
    assert "left kidney" in meta["warnings"][0]["message"] and "no tumour voxels (no --tumors mask" in meta["warnings"][0]["message"]
    check = meta["findings_check"]
    assert check["checked"] and check["map_tumors"] == [] and check["matches"][0]["placed"] is False
    assert meta["findings_source"] == "report"
    assert reader.report("c1")["findings"]["tumors"] == [{"site": "kidney", "side": "left", "size_mm": 40.0}]  # default: the report's
    assert reader.meta("c2")["warnings"] == [] and reader.meta("c2")["findings_check"]["checked"] is False
    listed = (tmp_path / "out" / "warnings.txt").read_text().splitlines()
    assert listed == [f"c1: {meta['warnings'][0]['message']}"]

    # a re-run skips both cases and still counts c1's warning (read from its meta)
    code, stdout, _ = _run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "out")
    assert code == 0 and "2 already done" in stdout and "1 case(s): the report names a tumour the label map lacks" in stdout
    assert (tmp_path / "out" / "warnings.txt").read_text().splitlines() == listed
    # once the report agrees, the re-written dataset has no warnings and no stale list
    reports.write_text(reports.read_text().replace("A 4 cm mass in the left kidney.", "No focal mass."))
    code, stdout, _ = _run_cli(monkeypatch, capsys, *args, "--out", tmp_path / "out", "--overwrite")
    assert code == 0 and "warnings" not in stdout and not (tmp_path / "out" / "warnings.txt").exists()


def test_tumour_in_liver_but_report_names_kidney_is_a_site_mismatch(tmp_path, label_set):
    mask, _ = _liver_tumor(label_set)
    _case(tmp_path, "c1", label_set, tumor=mask)
    reports = _reports(tmp_path, {"c1": "A 4 cm mass in the left kidney."})
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", tmp_path / "out", tumors=tmp_path / "tumors", reports=reports, options=OPTS, progress=False)
    assert rep.problems == [] and rep.count("written") == 1
    meta = DatasetReader(tmp_path / "out").meta("c1")
    assert _kinds(meta) == ["site_mismatch"]  # one pair: neither "missing" nor "unreported"
    assert "left kidney" in meta["warnings"][0]["message"] and "in the liver" in meta["warnings"][0]["message"]
    assert [t["site"] for t in meta["findings_check"]["map_tumors"]] == ["liver"]
    assert rep.warning_counts() == {"site_mismatch": 1}
    assert "1 case(s): the report puts a tumour in another organ or side than the label map" in rep.summary_line()
    assert rep.warnings == [f"c1: {meta['warnings'][0]['message']}"]


def test_findings_masks_takes_the_tumour_from_the_label_map(tmp_path, monkeypatch, capsys, label_set):
    mask, diameter = _liver_tumor(label_set)
    _case(tmp_path, "c1", label_set, tumor=mask)
    reports = _reports(tmp_path, {"c1": "62-year-old man. A 2 cm mass in the left kidney. Portal venous phase."})
    base = ("prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--tumors", tmp_path / "tumors", "--reports", reports, "--size", "16", "--no-previews")

    code, _, stderr = _run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "masks", "--findings", "masks")
    assert code == 0, stderr
    reader = DatasetReader(tmp_path / "masks")
    findings = reader.report("c1")["findings"]
    assert [(t["site"], t["side"]) for t in findings["tumors"]] == [("liver", None)]
    assert abs(findings["tumors"][0]["size_mm"] - diameter) < 0.1  # the mask's equivalent-sphere diameter (~40 mm)
    assert (findings["sex"], findings["age"], findings["phase"]) == ("male", 62, "portal_venous")  # the report's other fields
    assert reader.report("c1")["text"].startswith("62-year-old man.")  # the report text is kept
    meta = reader.meta("c1")
    assert meta["findings_source"] == "report, tumours from the label map"
    assert _kinds(meta) == ["site_mismatch"]  # the check still compares the report with the map

    code, _, _ = _run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "report")  # default: the report's tumour
    assert code == 0
    assert DatasetReader(tmp_path / "report").report("c1")["findings"]["tumors"] == [{"site": "kidney", "side": "left", "size_mm": 20.0}]

    code, _, stderr = _run_cli(monkeypatch, capsys, *base, "--out", tmp_path / "bad", "--findings", "both")
    assert code == 2 and "--findings: expected report or masks, got 'both'" in stderr and not (tmp_path / "bad").exists()
    assert "Traceback" not in stderr and len([line for line in stderr.splitlines() if line.strip()]) == 1
    with pytest.raises(GuideGenError, match="--findings: expected report or masks"):
        prepare_dataset(tmp_path / "ct", tmp_path / "labels", None, options=PrepareOptions(findings="mask"), dry_run=True, progress=False)


def test_check_findings_size_unreported_and_missing(label_set):
    """Unit check on a synthetic map: size off, an unnamed region, more report tumours than regions."""
    labels, affine, (kidney_t, _) = kidney_liver_map(label_set, [(10, 3**2), (30, 1)])  # inside the kidney, the liver
    measured = sphere_diameter_mm(kidney_t.sum() * 8.0)  # ~13 mm

    check, warnings = check_findings([{"site": "kidney", "side": "left", "size_mm": 40.0}], labels, affine, label_set)
    assert [w["kind"] for w in warnings] == ["size_mismatch", "map_tumor_unreported"]
    assert f"measures {measured:.0f} mm" in warnings[0]["message"] and "in the liver" in warnings[1]["message"]
    assert check["matches"][0]["placed"] and check["matches"][0]["size_ok"] is False
    json.dumps(check)  # JSON-ready for the meta

    _, warnings = check_findings([{"site": "kidney", "side": "left", "size_mm": round(measured)}, {"site": "liver", "side": None, "size_mm": 4.0}], labels, affine, label_set)
    assert warnings == []  # both placed, sizes within ±50 %

    _, warnings = check_findings([{"site": "kidney", "side": "left", "size_mm": 12.0}] * 2 + [{"site": "liver", "side": None, "size_mm": None}], labels, affine, label_set)
    assert [w["kind"] for w in warnings] == ["report_tumor_missing"] and "matched to another tumour" in warnings[0]["message"]

    _, warnings = check_findings([{"site": "kidney", "side": "right", "size_mm": 12.0}], labels, affine, label_set)
    assert [w["kind"] for w in warnings] == ["site_mismatch", "map_tumor_unreported"]  # wrong side pairs with the largest region


def test_tumor_stats_matches_case_stats_on_the_whole_map(label_set):
    labels, _, affine = _phantom(3)
    labels = np.where(labels == label_set.tumor_id, label_set.body_id, labels).astype(np.uint8)  # only the two regions below
    labels[LIVER_BLOCK] = label_set.tumor_id
    labels[24, 22, 25] = label_set.tumor_id  # both regions' box holds no vertebra: the midline must come from the whole map
    full, fast = case_stats(labels, affine, label_set), tumor_stats(labels, affine, label_set)
    assert len(full.tumors) == len(fast.tumors) == 2
    for a, b in zip(full.tumors, fast.tumors):
        assert a.voxels == b.voxels
        np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-6)
        np.testing.assert_array_equal(a.shell_counts, b.shell_counts)
    assert abs(full.midline_x_mm - fast.midline_x_mm) < 1e-6


# ------------------------------------------------------------------------ unknown class files
def test_unknown_class_file_is_ignored_with_a_warning(tmp_path, monkeypatch, capsys, label_set):
    labels, affine = _case(tmp_path, "u", label_set, folder=True)
    save_nifti(tmp_path / "labels" / "u" / "lung_nodules.nii.gz", labels == label_set.id_of("lung"), affine, np.uint8)
    # only an unknown file: nothing to build the map from → a problem
    _case(tmp_path, "only", label_set, folder=True, seed=1)
    for p in (tmp_path / "labels" / "only").iterdir():
        p.unlink()
    save_nifti(tmp_path / "labels" / "only" / "lung_nodules.nii.gz", labels > 0, affine, np.uint8)
    # a known class file of the wrong shape stays a problem, an unknown one beside it a warning
    _case(tmp_path, "broken", label_set, folder=True, seed=2)
    save_nifti(tmp_path / "labels" / "broken" / "liver.nii.gz", np.ones((4, 4, 4), np.uint8), affine, np.uint8)
    save_nifti(tmp_path / "labels" / "broken" / "lung_nodules.nii.gz", labels > 0, affine, np.uint8)

    code, stdout, stderr = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--out", tmp_path / "out", "--size", "16", "--no-previews")
    assert code == 2
    problems = [line for line in stderr.splitlines() if line.startswith("  ")]
    assert len(problems) == 2, stderr
    assert any("only: no TotalSegmentator class mask (every file has an unknown class name)" in p for p in problems)
    assert any("broken/liver.nii.gz: shape (4, 4, 4) differs" in p for p in problems)
    assert not any("lung_nodules" in p for p in problems)  # warnings are not problems
    assert "wrote 1 case(s)" in stdout and "2 case(s) with problems not written" in stdout
    assert "1 case(s): unknown class file(s) in the per-class folder ignored" in stdout
    reader = DatasetReader(tmp_path / "out")
    assert reader.case_ids() == ["u"]
    meta = reader.meta("u")
    assert _kinds(meta) == ["unknown_class_file"]
    assert "u/lung_nodules.nii.gz: unknown class name 'lung_nodules'" in meta["warnings"][0]["message"]
    assert "file ignored" in meta["warnings"][0]["message"]
