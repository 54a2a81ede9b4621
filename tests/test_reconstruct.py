"""`guidegen reconstruct`: errors per HU window / organ, on the volume's own grid, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from guidegen.io import load_nifti, ras_affine, save_nifti
from guidegen.reconstruct import WINDOWS_HU, windowed_mae


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "guidegen", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_windowed_mae_hand_values():
    a = np.array([-2000.0, 0.0, 100.0, 3000.0])
    b = np.array([-1000.0, 10.0, 300.0, 1000.0])
    # soft tissue window clips to [-160, 240]: |−160−(−160)| + 10 + |100−240| + |240−240| = 150 → 37.5
    assert windowed_mae(a, b, WINDOWS_HU["soft_tissue"]) == pytest.approx(37.5)
    assert windowed_mae(a, b, (-1e9, 1e9), np.array([False, True, True, False])) == pytest.approx(105.0)
    assert windowed_mae(a, b, (0, 1), np.zeros(4, bool)) is None


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    from helpers_tiny import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("rec"), stages=("autoencoder",)) / "autoencoder"


def test_reconstruct_writes_volume_and_errors(ae_ckpt, tmp_path, label_set):
    from guidegen.data.phantom import render_phantom

    case = render_phantom(4, (22, 18, 26))  # not a multiple of 4: padded and cropped back
    aff = ras_affine((8.0, 9.0, 10.0))
    save_nifti(tmp_path / "ct.nii.gz", case.ct, aff, np.int16)
    save_nifti(tmp_path / "lab.nii.gz", case.labels, aff, np.uint8)
    res = run_cli("reconstruct", "--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "lab.nii.gz", "--out", tmp_path / "o", "--checkpoint", ae_ckpt)
    assert res.returncode == 0, res.stderr
    assert "MAE (HU) by window: lung" in res.stdout and "liver" in res.stdout
    rec, rec_aff = load_nifti(tmp_path / "o" / "reconstruction.nii.gz")
    assert rec.shape == case.ct.shape
    np.testing.assert_allclose(rec_aff, aff)
    errors = json.loads((tmp_path / "o" / "errors.json").read_text())
    assert set(errors["mae"]) == set(WINDOWS_HU) and "liver" in errors["classes"]
    # the same volume stored in LPS axes comes back on those axes: the same reconstruction, flipped
    import nibabel as nib

    to_lps = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS"))
    for name, arr, dtype in (("ct", case.ct, np.int16), ("lab", case.labels, np.uint8)):
        img = nib.Nifti1Image(arr.astype(dtype), aff).as_reoriented(to_lps)
        save_nifti(tmp_path / f"{name}_lps.nii.gz", np.asarray(img.dataobj), img.affine, dtype)
    res = run_cli("reconstruct", "--ct", tmp_path / "ct_lps.nii.gz", "--labels", tmp_path / "lab_lps.nii.gz", "--out", tmp_path / "o2",
                  "--checkpoint", ae_ckpt)
    assert res.returncode == 0, res.stderr
    lps, lps_aff = load_nifti(tmp_path / "o2" / "reconstruction.nii.gz", reorient_to_ras=False)
    np.testing.assert_allclose(lps_aff, nib.load(tmp_path / "ct_lps.nii.gz").affine)
    assert np.array_equal(lps, rec[::-1, ::-1, :])


def test_reconstruct_bad_inputs(ae_ckpt, tmp_path):
    save_nifti(tmp_path / "ct.nii.gz", np.zeros((16, 16, 16)), np.eye(4), np.int16)
    save_nifti(tmp_path / "lab.nii.gz", np.zeros((16, 16, 12)), np.eye(4), np.uint8)
    (tmp_path / "x.txt").write_text("hello")
    cases = [
        (["--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "lab.nii.gz"], "differs from the CT"),
        (["--ct", tmp_path / "x.txt", "--labels", tmp_path / "lab.nii.gz"], "not a NIfTI file"),
        (["--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "lab.nii.gz", "--checkpoint", tmp_path / "none"], "checkpoint not found"),
    ]
    save_nifti(tmp_path / "labf.nii.gz", np.full((16, 16, 16), 0.5), np.eye(4), np.float32)
    cases.append((["--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "labf.nii.gz"], "integer class ids"))
    save_nifti(tmp_path / "lab16.nii.gz", np.zeros((16, 16, 16)), np.eye(4), np.uint8)
    for tile in ("32", "50"):
        cases.append((["--ct", tmp_path / "ct.nii.gz", "--labels", tmp_path / "lab16.nii.gz", "--tile", tile],
                      f"--tile must be a multiple of 4 larger than the tiles' 48-voxel overlap, got {tile}"))
    for args, needle in cases:
        extra = [] if "--checkpoint" in args else ["--checkpoint", ae_ckpt]
        res = run_cli("reconstruct", *args, *extra, "--out", tmp_path / "o")
        assert res.returncode == 2 and needle in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
