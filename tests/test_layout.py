import json

import numpy as np
import pytest

from guidegen.data.cache import PreprocessCache, PreprocessConfig, preprocess_case, resize_labels
from guidegen.data.datasets import CTLabelDataset, LabelMapDataset
from guidegen.data.layout import CaseRecord, DatasetReader, DatasetWriter, parse_grid
from guidegen.errors import GuideGenError
from guidegen.io import load_nifti, ras_affine, save_nifti


def _toy_case(case="c1", shape=(20, 16, 24), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[2:-2, 2:-2, 2:-2] = 21  # body
    labels[5:12, 5:10, 6:18] = 3  # "liver"
    labels[8:10, 6:8, 10:12] = 20  # tumour
    ct = np.where(labels > 0, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
    return CaseRecord(case=case, labels=labels, affine=ras_affine((2.0, 2.5, 3.0)), ct=ct, text="liver mass 2 cm", findings={"tumors": [{"site": "liver"}]})


def test_parse_grid_forms():
    assert parse_grid("64") == (64, 64, 64)
    assert parse_grid("48,48,64") == (48, 48, 64)
    assert parse_grid("48x40x64") == (48, 40, 64)
    for bad in ["abc", "0", "48,48", "4", "100000"]:
        with pytest.raises(GuideGenError, match="--size"):
            parse_grid(bad)


def test_write_read_round_trip(tmp_path, label_set):
    w = DatasetWriter(tmp_path / "ds", name="toy")
    rec = _toy_case()
    w.write_case(rec)
    w.finalize()
    r = DatasetReader(tmp_path / "ds")
    assert r.case_ids() == ["c1"]
    back = r.load_case("c1")
    np.testing.assert_array_equal(back.labels, rec.labels)
    np.testing.assert_array_equal(back.ct, rec.ct)
    np.testing.assert_allclose(back.affine, rec.affine)
    assert back.text == "liver mass 2 cm" and back.findings == rec.findings
    lab, aff = load_nifti(tmp_path / "ds" / "labels" / "c1.nii.gz", reorient_to_ras=False)
    assert lab.dtype == np.uint8
    ct, _ = load_nifti(tmp_path / "ds" / "ct" / "c1.nii.gz", reorient_to_ras=False)
    assert ct.dtype == np.int16
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["format_version"] == 1 and info["num_cases"] == 1 and info["status"] == "complete"
    lines = (tmp_path / "ds" / "reports.jsonl").read_text().splitlines()
    assert [json.loads(x)["case"] for x in lines] == ["c1"]
    assert (tmp_path / "ds" / "previews" / "c1.png").stat().st_size > 1000


def test_non_empty_out_needs_overwrite(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "something.txt").write_text("x")
    with pytest.raises(GuideGenError, match="not empty"):
        DatasetWriter(d, name="x")
    DatasetWriter(d, name="x", mode="overwrite")  # allowed; user files outside the layout survive
    assert (d / "something.txt").exists()



def test_overwrite_never_deletes_a_folder_that_is_not_a_dataset(tmp_path):
    """A user's data folder with ct/ and labels/ but no dataset.json is not replaced."""
    d = tmp_path / "hospital"
    (d / "ct").mkdir(parents=True)
    (d / "ct" / "p1.nii.gz").write_bytes(b"x")
    with pytest.raises(GuideGenError, match=r"hospital: holds ct/ but no guidegen dataset .*--overwrite replaces datasets only"):
        DatasetWriter(d, name="x", mode="overwrite")
    assert (d / "ct" / "p1.nii.gz").read_bytes() == b"x"


def test_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(GuideGenError, match="not a directory"):
        DatasetWriter(f, name="x")


def test_interrupted_case_is_invisible(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="toy")
    w.write_case(_toy_case("done"))
    # simulate a crash after the volumes but before the meta (commit marker) of a second case
    rec = _toy_case("half")
    from guidegen.io import save_nifti

    save_nifti(tmp_path / "ds" / "labels" / "half.nii.gz", rec.labels, rec.affine, np.uint8)
    with open(tmp_path / "ds" / "reports.jsonl", "a") as fh:
        fh.write('{"case": "half", "te')  # torn line
    r = DatasetReader(tmp_path / "ds")
    assert r.case_ids() == ["done"]
    assert r.report("done")["text"] == "liver mass 2 cm"
    assert not w.has_case("half") and w.has_case("done")


def test_reader_errors(tmp_path):
    with pytest.raises(GuideGenError, match="not found"):
        DatasetReader(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(GuideGenError, match="dataset.json: missing"):
        DatasetReader(tmp_path / "x")
    (tmp_path / "x" / "dataset.json").write_text("{bad")
    with pytest.raises(GuideGenError, match="not valid JSON"):
        DatasetReader(tmp_path / "x")
    (tmp_path / "x" / "dataset.json").write_text('{"format_version": 99}')
    with pytest.raises(GuideGenError, match="format_version 99"):
        DatasetReader(tmp_path / "x")


def test_label_ids_outside_label_set_rejected(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="toy")
    rec = _toy_case()
    rec.labels[0, 0, 0] = 40
    with pytest.raises(GuideGenError, match="label id 40"):
        w.write_case(rec)


def test_preprocess_crops_to_torso_and_keeps_spacing(label_set):
    rec = _toy_case()
    cfg = PreprocessConfig(grid=(8, 8, 16), margin_voxels=0)
    out = preprocess_case(rec.labels, rec.ct, rec.affine, cfg, label_set)
    assert out["labels"].shape == (8, 8, 16) and out["ct"].shape == (8, 8, 16)
    # x/y cropped to the body (16 x 12 voxels), z to the organs (6..18 → 12 voxels)
    np.testing.assert_allclose(out["extent_mm"], [16 * 2.0, 12 * 2.5, 12 * 3.0])
    np.testing.assert_allclose(out["spacing_mm"], out["extent_mm"] / np.array([8, 8, 16]))
    assert set(np.unique(out["labels"])) <= {0, 3, 20, 21}


def test_resize_labels_nearest_keeps_ids():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[3:7, 3:7, 3:7] = 7
    small = resize_labels(lab, (5, 5, 5))
    assert set(np.unique(small)) == {0, 7}
    assert small.dtype == np.uint8


def test_cache_key_depends_on_config():
    a = PreprocessConfig(grid=(8, 8, 8)).key()
    assert a == PreprocessConfig(grid=(8, 8, 8)).key()
    assert a != PreprocessConfig(grid=(8, 8, 16)).key()
    assert a != PreprocessConfig(grid=(8, 8, 8), margin_voxels=3).key()


def test_datasets_serve_grid_tensors_and_cache(tmp_path):
    w = DatasetWriter(tmp_path / "ds", name="toy")
    for i in range(2):
        w.write_case(_toy_case(f"c{i}", seed=i), preview=False)
    w.finalize()
    ds = CTLabelDataset(tmp_path / "ds", (8, 8, 8))
    ds.build_cache(progress=False)
    assert len(list(ds.cache.dir.glob("*.npz"))) == 2
    item = ds[1]
    assert item["labels"].shape == (8, 8, 8) and item["ct"].shape == (1, 8, 8, 8)
    assert item["case"] == "c1" and item["text"] == "liver mass 2 cm"
    np.testing.assert_allclose(ds.spacing_of("c1"), item["spacing"].numpy(), rtol=1e-6)  # read alone, same value
    assert json.loads(item["findings_json"]) == {"tumors": [{"site": "liver"}]}
    lds = LabelMapDataset(tmp_path / "ds", (8, 8, 8))
    assert "ct" not in lds[0] and lds.cache.dir != ds.cache.dir
    assert PreprocessCache(tmp_path / "ds", ds.cache.cfg).load("c0")["labels"].shape == (8, 8, 8)


def test_cache_entry_of_a_replaced_label_map_is_recomputed(tmp_path):
    """A label map edited in place (same case id) must not keep being served from the cache."""
    import os

    w = DatasetWriter(tmp_path / "ds", name="toy")
    w.write_case(_toy_case("c0", seed=0), preview=False)
    w.finalize()
    ds = LabelMapDataset(tmp_path / "ds", (8, 8, 8))
    ds.build_cache(progress=False)
    before = ds[0]["labels"].clone()
    lab_path = ds.reader.labels_path("c0")
    assert ds.cache.is_fresh("c0", ds.sources("c0"))
    lab, aff = load_nifti(lab_path)
    save_nifti(lab_path, np.zeros_like(lab), aff, np.uint8)  # the user replaces the map in place
    st = os.stat(lab_path)
    os.utime(lab_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later time even on coarse clocks
    assert not ds.cache.is_fresh("c0", ds.sources("c0"))
    assert ds.cache.load("c0", ds.sources("c0")) is None
    after = LabelMapDataset(tmp_path / "ds", (8, 8, 8))[0]["labels"]
    assert before.any() and not after.any()  # recomputed from the new (empty) map
    assert LabelMapDataset(tmp_path / "ds", (8, 8, 8)).cache.is_fresh("c0", ds.sources("c0"))  # and stored fresh


def test_grid_cache_is_built_in_shares_across_ranks(tmp_path):
    """Under torchrun rank r builds the cases at positions i % world == r before the barrier, the
    rest (none, on a shared directory) after it."""
    w = DatasetWriter(tmp_path / "ds", name="toy")
    for i in range(5):
        w.write_case(_toy_case(f"c{i}", seed=i), preview=False)
    w.finalize()
    ds = LabelMapDataset(tmp_path / "ds", (8, 8, 8))
    seen = []
    ds.build_cache(progress=False, rank=1, world_size=2, barrier=lambda: seen.append(sorted(p.stem for p in ds.cache.dir.glob("*.npz"))))
    assert seen == [["c1", "c3"]]  # its share, before the barrier
    assert all(ds.cache.is_fresh(c, ds.sources(c)) for c in ds.cases)  # the others' share, built after it here


@pytest.mark.parametrize("codes", ["LPS", "PIR", "SAL", "RAS"])
def test_to_ras_flips_and_permutes_like_nibabel_and_from_ras_undoes_it(codes):
    import nibabel as nib

    from guidegen.io import from_ras, to_ras

    rng = np.random.default_rng(1)
    ras = rng.integers(0, 22, (5, 6, 7)).astype(np.uint8)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    to_codes = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(codes))
    img = nib.Nifti1Image(ras, affine).as_reoriented(to_codes)
    native, native_affine = np.asarray(img.dataobj), img.affine
    out, out_affine, back = to_ras(native, native_affine)
    assert np.array_equal(out, ras) and np.allclose(out_affine, affine)  # the voxels and the world are the same
    assert np.array_equal(from_ras(out, back), native)
