"""TotalSegmentator v1 vs v2 multi-label maps: recognised from the lungs, contradictions rejected."""


import numpy as np
import pytest

from guidegen.data.layout import DatasetReader
from guidegen.data.prepare import PrepareOptions, parse_totalseg_version, prepare_dataset
from guidegen.data.totalseg import guess_totalseg_version, lung_ratio, totalseg_classes, totalseg_ids
from guidegen.errors import GuideGenError
from guidegen.io import ras_affine, save_nifti

from helpers_cli import run_cli_inprocess  # noqa: E402  (tests/ is on sys.path)

# Voxel counts of a whole-torso CT (about ml x 100), by class name.
TORSO = {
    "spleen": 20000, "kidney_right": 15000, "kidney_left": 15000, "liver": 150000, "stomach": 30000,
    "aorta": 15000, "inferior_vena_cava": 8000, "pancreas": 8000, "adrenal_gland_right": 500,
    "adrenal_gland_left": 500, "lung_upper_lobe_left": 130000, "lung_lower_lobe_left": 120000,
    "lung_upper_lobe_right": 100000, "lung_middle_lobe_right": 50000, "lung_lower_lobe_right": 130000,
    "esophagus": 3000, "trachea": 3000, "thyroid_gland": 2000,
}


def _counts(volumes: dict[str, int], version: int) -> np.ndarray:
    """Per-id voxel counts of an id map with these classes, coded with ``version``'s ids."""
    ids = totalseg_ids(version)
    counts = np.zeros(max(totalseg_classes(version)) + 1, np.int64)
    for name, n in volumes.items():
        if name in ids:  # thyroid_gland is v2 only
            counts[ids[name]] = n
    return counts


def test_lobe_ids_match_the_tables():
    """The ids the check rests on (v2 lobes 10-14, v1 13-17) are what the tables say."""
    v1, v2 = totalseg_classes(1), totalseg_classes(2)
    assert [v2[i] for i in range(10, 18)] == [
        "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
        "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland",
    ]
    assert [v1[i] for i in range(10, 18)] == [
        "pancreas", "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
        "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right",
    ]
    assert max(v1) == 104 and max(v2) == 117


def test_guess_from_counts():
    v2, v1 = _counts(TORSO, 2), _counts(TORSO, 1)
    assert guess_totalseg_version(v2) == 2
    assert guess_totalseg_version(v1) == 1
    assert lung_ratio(v2, 2) == lung_ratio(v1, 1) == pytest.approx(280 / 250)
    assert lung_ratio(v1, 2) > 20 and lung_ratio(v2, 1) < 0.05  # the wrong readings
    # no lungs in view under either reading: undecidable
    no_lungs = {k: v for k, v in TORSO.items() if not k.startswith("lung_") and k not in ("esophagus", "trachea", "thyroid_gland")}
    assert guess_totalseg_version(_counts(no_lungs, 1)) is None
    assert guess_totalseg_version(_counts(no_lungs, 2)) is None
    # an id only v2 has (above 104: sternum 116) decides even without lungs
    with_rib = _counts({**no_lungs, "sternum": 400}, 2)
    assert with_rib.size > 105 and guess_totalseg_version(with_rib) == 2
    # abdominal CT with lung bases only, v1: read as v2 the "lungs" (pancreas + bases) also
    # look plausible, so the check does not claim to know
    bases = {"pancreas": 8000, "adrenal_gland_right": 500, "adrenal_gland_left": 500, "lung_lower_lobe_left": 15000, "lung_lower_lobe_right": 10000}
    c = _counts(bases, 1)
    assert 0.4 < lung_ratio(c, 1) < 2.5 and 0.4 < lung_ratio(c, 2) < 2.5
    assert guess_totalseg_version(c) is None
    # one lung only (both readings implausible): undecidable, not a guess
    one_lung = {k: v for k, v in TORSO.items() if not k.endswith("_right") or not k.startswith("lung_")}
    assert guess_totalseg_version(_counts(one_lung, 2)) is None
    # a few stray lung voxels are not enough to judge
    assert lung_ratio(_counts({"lung_upper_lobe_left": 100, "lung_upper_lobe_right": 100}, 2), 2) is None


def test_version_option_values():
    assert parse_totalseg_version("auto") == "auto" and parse_totalseg_version("AUTO") == "auto"
    assert parse_totalseg_version("1") == 1 and parse_totalseg_version(2) == 2
    with pytest.raises(GuideGenError, match="expected auto, 1 or 2, got '3'"):
        parse_totalseg_version("3")
    assert PrepareOptions().totalseg_version == "auto"


# ------------------------------------------------------------------------ end to end
def _write_case(root, case: str, version: int, lungs: bool = True) -> np.ndarray:
    """A tiny torso (24 x 20 x 16 voxels of 10 mm) as CT + multi-label map with ``version``'s ids.

    Left lung at low x (RAS: +x is the patient's right), right lung at high x, the aorta between
    them, small pancreas and adrenal blocks. Returns the aorta mask.
    """
    ids = totalseg_ids(version)
    shape = (24, 20, 16)
    ml = np.zeros(shape, np.uint8)
    ct = np.full(shape, -1000.0, np.float32)
    ct[2:22, 2:18] = 40.0
    if lungs:
        ml[4:9, 5:15, :8], ml[4:9, 5:15, 8:] = ids["lung_lower_lobe_left"], ids["lung_upper_lobe_left"]
        ml[15:20, 5:15, :6], ml[15:20, 5:15, 6:11] = ids["lung_lower_lobe_right"], ids["lung_middle_lobe_right"]
        ml[15:20, 5:15, 11:] = ids["lung_upper_lobe_right"]
        ct[ml > 0] = -850.0
    ml[11:13, 10:12, :] = ids["aorta"]
    ml[10:14, 5:7, 2:4] = ids["pancreas"]
    ml[12:14, 14:16, 6:7] = ids["adrenal_gland_right"]
    ml[10:12, 14:16, 6:7] = ids["adrenal_gland_left"]
    affine = ras_affine((10.0, 10.0, 10.0))
    save_nifti(root / "ct" / f"{case}.nii.gz", ct, affine, np.float32)
    save_nifti(root / "labels" / f"{case}.nii.gz", ml, affine, np.uint8)
    return ml == ids["aorta"]


def _run_cli(monkeypatch, capsys, *args):
    return run_cli_inprocess(monkeypatch, capsys, *args)


def test_v1_map_is_read_as_v1_under_auto_and_rejected_as_v2(tmp_path, monkeypatch, capsys, label_set):
    aorta = _write_case(tmp_path, "a", version=1)
    assert totalseg_classes(2)[totalseg_ids(1)["aorta"]] == "pancreas"  # what a v2 reading would make of it
    out = tmp_path / "out"
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", out, options=PrepareOptions(grid=(8, 8, 8), previews=False), progress=False)
    assert rep.problems == [] and rep.count("written") == 1
    assert "by default" not in rep.summary_line()
    reader = DatasetReader(out)
    rec = reader.load_case("a")
    start = np.round(np.linalg.solve(ras_affine((10.0, 10.0, 10.0)), rec.affine[:, 3])[:3]).astype(int)
    crop = aorta[start[0] : start[0] + rec.labels.shape[0], start[1] : start[1] + rec.labels.shape[1], start[2] : start[2] + rec.labels.shape[2]]
    assert crop.sum() == aorta.sum()  # the crop keeps the whole aorta
    assert np.all(rec.labels[crop] == label_set.id_of("aorta"))
    assert not np.any(rec.labels == label_set.id_of("esophagus"))  # v1 lobes 15-17 are not v2 esophagus/trachea/thyroid
    assert (rec.labels == label_set.id_of("lung")).sum() == 2 * 5 * 10 * 16
    meta = reader.meta("a")
    assert (meta["totalseg_version"], meta["totalseg_version_source"]) == (1, "detected")

    # the same map with an explicit --totalseg-version 2: rejected, one line naming the file
    code, _, stderr = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--totalseg-version", "2", "--dry-run")
    assert code == 2
    lab = tmp_path / "labels" / "a.nii.gz"
    expected = f"  {lab}: looks like TotalSegmentator v1 output (right/left lung volume 40 when read as v2, 1 as v1); pass --totalseg-version 1"
    assert expected in stderr.splitlines(), stderr
    # and with the right explicit version it is accepted
    rep = prepare_dataset(tmp_path / "ct", tmp_path / "labels", None, options=PrepareOptions(totalseg_version=1, grid=(8, 8, 8)), dry_run=True, progress=False)
    assert rep.problems == [] and rep.results[0].summary["totalseg_version_source"] == "option"


def test_undecidable_map_is_read_as_v2_and_noted(tmp_path, monkeypatch, capsys, label_set):
    _write_case(tmp_path, "nolungs", version=2, lungs=False)
    code, stdout, _ = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--out", tmp_path / "out", "--size", "8", "--no-previews")
    assert code == 0
    assert "1 multi-label map(s) read as TotalSegmentator v2 by default" in stdout
    meta = DatasetReader(tmp_path / "out").meta("nolungs")
    assert (meta["totalseg_version"], meta["totalseg_version_source"]) == (2, "assumed")
    rec = DatasetReader(tmp_path / "out").load_case("nolungs")
    assert np.any(rec.labels == label_set.id_of("aorta"))
    code, stdout, _ = _run_cli(monkeypatch, capsys, "prepare", "--ct", tmp_path / "ct", "--labels", tmp_path / "labels", "--dry-run")
    assert code == 0 and "multi-label v2" in stdout and "(assumed)" in stdout  # the case's row (the cell may wrap)
