"""``guidegen export nnunet``: layout, dataset.json, our integrity check, nnU-Net's own (optional)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from guidegen.cli import app
from guidegen.data.phantom_dataset import write_phantom_dataset
from guidegen.errors import GuideGenError
from guidegen.evaluation.export import check_nnunet_dataset, export_nnunet
from guidegen.io import load_nifti
from guidegen.labels import load_label_set


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp") / "ph"
    write_phantom_dataset(root, n=3, grid=(16, 16, 24), seed=5, previews=False, progress=False)
    return root


@pytest.fixture
def exported(phantom, tmp_path):
    return export_nnunet(phantom, tmp_path / "raw", 42, "GuideGenPhantom")


def test_layout_and_dataset_json(phantom, exported):
    assert exported.name == "Dataset042_GuideGenPhantom"
    meta = json.loads((exported / "dataset.json").read_text())
    ls = load_label_set()
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"]["background"] == 0 and meta["labels"]["tumor"] == ls.tumor_id
    assert sorted(meta["labels"].values()) == list(range(ls.num_classes))
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (exported / "labelsTr").iterdir())
    assert cases == ["phantom_000005", "phantom_000006", "phantom_000007"]
    for c in cases:
        img, aff_i = load_nifti(exported / "imagesTr" / f"{c}_0000.nii.gz")
        lab, aff_l = load_nifti(exported / "labelsTr" / f"{c}.nii.gz")
        src, _ = load_nifti(phantom / "ct" / f"{c}.nii.gz")
        assert img.shape == lab.shape == (16, 16, 24) and np.array_equal(img, src) and np.allclose(aff_i, aff_l)
    assert check_nnunet_dataset(exported) == []


def test_check_finds_problems(exported):
    (exported / "imagesTr" / "phantom_000005_0000.nii.gz").unlink()
    lab_path = exported / "labelsTr" / "phantom_000006.nii.gz"
    img = nib.load(str(lab_path))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 99
    nib.save(nib.Nifti1Image(data, img.affine), str(lab_path))
    img7 = nib.load(str(exported / "imagesTr" / "phantom_000007_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img7.dataobj)[:, :, :20], img7.affine), str(exported / "imagesTr" / "phantom_000007_0000.nii.gz"))
    (exported / "labelsTr" / "extra.nii").write_bytes(b"")
    meta = json.loads((exported / "dataset.json").read_text())
    meta["numTraining"] = 7
    (exported / "dataset.json").write_text(json.dumps(meta))
    problems = "\n".join(check_nnunet_dataset(exported))
    assert "phantom_000005" in problems and "no image" in problems
    assert "label values [99]" in problems
    assert "phantom_000007: image shape" in problems
    assert "extra.nii: suffix" in problems
    assert "numTraining is 7" in problems


def test_check_dataset_json_problems(exported):
    meta = json.loads((exported / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": 2}
    del meta["file_ending"]
    (exported / "dataset.json").write_text(json.dumps(meta))
    assert check_nnunet_dataset(exported) == ["dataset.json: missing key 'file_ending'"]
    meta["file_ending"] = ".nii.gz"
    (exported / "dataset.json").write_text(json.dumps(meta))
    assert any("consecutive" in p for p in check_nnunet_dataset(exported))


def test_bad_inputs(phantom, tmp_path, exported):
    with pytest.raises(GuideGenError, match=r"^--data: .*not found"):
        export_nnunet(tmp_path / "missing", tmp_path / "raw", 1, "X")
    with pytest.raises(GuideGenError, match="--dataset-id"):
        export_nnunet(phantom, tmp_path / "raw", 1000, "X")
    with pytest.raises(GuideGenError, match="--name"):
        export_nnunet(phantom, tmp_path / "raw", 1, "has space")
    with pytest.raises(GuideGenError, match="without the DatasetNNN_ prefix"):
        export_nnunet(phantom, tmp_path / "raw", 5, "Dataset005_x")
    with pytest.raises(GuideGenError, match="exists and is not empty"):
        export_nnunet(phantom, tmp_path / "raw", 42, "GuideGenPhantom")
    with pytest.raises(GuideGenError, match="already holds Dataset042_GuideGenPhantom.*remove Dataset042_GuideGenPhantom first"):
        export_nnunet(phantom, tmp_path / "raw", 42, "Other")
    assert export_nnunet(phantom, tmp_path / "raw", 42, "GuideGenPhantom", overwrite=True) == exported
    noct = tmp_path / "noct"
    shutil.copytree(phantom, noct)
    shutil.rmtree(noct / "ct")
    with pytest.raises(GuideGenError, match=r"^--data .*3 of 3 case\(s\) have no CT"):
        export_nnunet(noct, tmp_path / "raw2", 2, "NoCT")


def test_cli_export(phantom, tmp_path):
    res = CliRunner().invoke(app, ["export", "nnunet", "--data", str(phantom), "--out", str(tmp_path / "raw"), "--dataset-id", "3", "--name", "P"])
    assert res.exit_code == 0, res.output
    assert "Dataset003_P" in res.output
    assert check_nnunet_dataset(tmp_path / "raw" / "Dataset003_P") == []


def test_nnunetv2_integrity_check(exported):
    pytest.importorskip("nnunetv2")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(exported), num_processes=1)  # raises on any problem


def test_failed_overwrite_keeps_the_previous_dataset(phantom, tmp_path, exported, monkeypatch):
    """--overwrite replaces the dataset only once the new one is complete."""
    from guidegen.evaluation import export as export_module

    before = sorted(p.relative_to(exported) for p in exported.rglob("*"))
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def failing_copy(src, dst):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(export_module.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        export_nnunet(phantom, exported.parent, 42, "GuideGenPhantom", overwrite=True)
    assert sorted(p.relative_to(exported) for p in exported.rglob("*")) == before
    assert check_nnunet_dataset(exported) == []


def test_an_export_that_fails_its_check_replaces_nothing(phantom, tmp_path, exported, monkeypatch):
    """The check runs on the new dataset before it takes the name: a failing one is removed and
    the previous dataset stays."""
    from guidegen.evaluation import export as export_module

    before = sorted(p.relative_to(exported) for p in exported.rglob("*"))
    monkeypatch.setattr(export_module, "check_nnunet_dataset", lambda path: ["labelsTr/x.nii.gz: label values [99] not in dataset.json labels"])
    with pytest.raises(GuideGenError, match=r"Dataset042_GuideGenPhantom: the exported dataset failed its check: labelsTr/x.*nothing was replaced"):
        export_nnunet(phantom, exported.parent, 42, "GuideGenPhantom", overwrite=True)
    assert sorted(p.relative_to(exported) for p in exported.rglob("*")) == before
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no partial copy left


def test_an_incomplete_set_is_exported_with_a_warning(phantom, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(phantom, copy)
    info = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**info, "status": "incomplete"}))
    export_nnunet(copy, tmp_path / "raw", 7, "Partial")
    assert "warning: --data" in capsys.readouterr().err


def test_ct_of_one_source_map_share_a_fold(tmp_path):
    """A mask -> CT set with 2-3 CTs per source map gets a splits_final.json whose folds never
    split a map's CTs between training and validation; a set without repeats gets none."""
    from guidegen.data.layout import CaseRecord, DatasetReader, DatasetWriter
    from guidegen.evaluation.export import SPLITS_FILE, grouped_splits

    writer = DatasetWriter(tmp_path / "aug", name="guidegen-synthetic", mode="new", info={"source": "guidegen generate --labels"})
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:6, 2:6, 2:6] = 3
    ct = np.full((8, 8, 8), -1000, np.int16)
    for m in range(7):
        for k in range(1 + m % 3):
            writer.write_case(CaseRecord(case=f"map{m}_seed{k}", labels=labels, affine=np.eye(4), ct=ct, text="",
                                         meta={"request": {"labels_digest": f"d{m}"}}), preview=False)
    writer.finalize()
    exported = export_nnunet(tmp_path / "aug", tmp_path / "raw", 9, "Aug")
    splits = json.loads((exported / SPLITS_FILE).read_text())
    cases = sorted(DatasetReader(tmp_path / "aug").case_ids())
    assert len(splits) == 5 and sorted(c for f in splits for c in f["val"]) == cases
    for fold in splits:
        assert not set(fold["train"]) & set(fold["val"]) and sorted(fold["train"] + fold["val"]) == cases
        assert fold["val"]  # every fold validates something
        val_maps = {c.split("_")[0] for c in fold["val"]}
        assert not val_maps & {c.split("_")[0] for c in fold["train"]}  # a map's CTs stay together
    assert check_nnunet_dataset(exported) == []
    plain = export_nnunet(_plain_set(tmp_path), tmp_path / "raw2", 10, "Plain")
    assert not (plain / SPLITS_FILE).exists()
    # three maps: three folds, still grouped; one map: no split can separate anything
    few = DatasetReader(tmp_path / "aug")
    three = [c for c in few.case_ids() if c.split("_")[0] in ("map0", "map1", "map2")]
    splits = grouped_splits(few, three)
    assert len(splits) == 3 and sorted(c for f in splits for c in f["val"]) == sorted(three)
    with pytest.raises(GuideGenError, match="come from one label map"):
        grouped_splits(few, [c for c in few.case_ids() if c.startswith("map2_")])


def _plain_set(tmp_path):
    return write_phantom_dataset(tmp_path / "plain", n=6, grid=(16, 16, 24), seed=1, previews=False, progress=False)
