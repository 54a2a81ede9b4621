"""The foundation issue's end-to-end checks of `guidegen phantom` (through the real CLI)."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from guidegen.data.layout import DatasetReader
from guidegen.io import load_nifti


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "guidegen", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted((root / "ct").glob("*.nii.gz")) + sorted((root / "labels").glob("*.nii.gz")) + [root / "reports.jsonl"]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "D"
    res = run_cli("phantom", "--n", 4, "--size", 64, "--seed", 1, "--out", out, "--workers", 2)
    assert res.returncode == 0, res.stderr
    return out


def test_phantom_writes_the_layout(phantom_dir, label_set):
    d = phantom_dir
    info = json.loads((d / "dataset.json").read_text())
    assert info["num_cases"] == 4 and info["format_version"] == 1
    cts = sorted((d / "ct").glob("*.nii.gz"))
    labs = sorted((d / "labels").glob("*.nii.gz"))
    assert len(cts) == 4 and len(labs) == 4
    for ct_path, lab_path in zip(cts, labs):
        ct, ct_aff = load_nifti(ct_path, reorient_to_ras=False)
        lab, lab_aff = load_nifti(lab_path, reorient_to_ras=False)
        assert ct.dtype == np.int16 and lab.dtype == np.uint8
        assert ct.shape == lab.shape == (64, 64, 64)
        np.testing.assert_allclose(ct_aff, lab_aff)
        assert lab.max() <= 21
        present = set(np.unique(lab).tolist())
        assert sum(i in present for i in label_set.organ_ids) >= 18
        assert label_set.body_id in present
    lines = [json.loads(x) for x in (d / "reports.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert all({"case", "text", "findings"} <= set(x) and x["text"] for x in lines)
    assert len(list((d / "previews").glob("*.png"))) == 4


def test_hu_medians_are_realistic(phantom_dir, label_set):
    reader = DatasetReader(phantom_dir)
    for case in reader.case_ids():
        rec = reader.load_case(case)
        med = lambda name: float(np.median(rec.ct[rec.labels == label_set.id_of(name)]))  # noqa: E731
        assert med("lung") < -600
        assert 20 <= med("liver") <= 200
        assert med("vertebrae") > 150 and med("rib") > 150
        assert np.median(rec.ct[rec.labels == 0]) < -900  # air outside the body
        body = rec.ct[rec.labels == label_set.body_id]
        fat = body[(body > -200) & (body < 0)]
        assert -140 < np.median(fat) < -60  # subcutaneous/visceral fat
        muscle = body[(body > 0) & (body < 150)]
        assert 20 <= np.median(muscle) <= 200


def test_same_seed_is_bitwise_identical_and_seeds_differ(phantom_dir, tmp_path):
    again = tmp_path / "again"
    assert run_cli("phantom", "--n", 4, "--size", 64, "--seed", 1, "--out", again, "--no-previews").returncode == 0
    assert _digest(again) == _digest(phantom_dir)
    other = tmp_path / "other"
    assert run_cli("phantom", "--n", 4, "--size", 64, "--seed", 2, "--out", other, "--no-previews").returncode == 0
    a, _ = load_nifti(phantom_dir / "labels" / "phantom_000002.nii.gz")
    b, _ = load_nifti(other / "labels" / "phantom_000002.nii.gz")  # same seed 2 in both runs
    np.testing.assert_array_equal(a, b)
    c, _ = load_nifti(other / "labels" / "phantom_000005.nii.gz")
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", ["abc", "3", "48,48", "0", "9999"])
def test_bad_size_is_one_line_error(tmp_path, size):
    res = run_cli("phantom", "--n", 1, "--size", size, "--out", tmp_path / "x")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: --size") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_negative_seed_is_one_line_error_and_writes_nothing(tmp_path):
    res = run_cli("phantom", "--n", 1, "--size", 16, "--seed", -3, "--out", tmp_path / "x")
    assert res.returncode == 2 and res.stderr.strip() == "error: --seed must be >= 0, got -3" and not (tmp_path / "x").exists()


def test_non_empty_out_refused_unless_overwrite(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = run_cli("phantom", "--n", 1, "--size", 16, "--out", out, "--no-previews")
    assert res.returncode == 2 and "holds no guidegen dataset (use --overwrite" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("phantom", "--n", 1, "--size", 16, "--out", out, "--no-previews", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert DatasetReader(out).case_ids() == ["phantom_000000"]


def test_unwritable_out(tmp_path):
    res = run_cli("phantom", "--n", 1, "--size", 16, "--out", "/proc/guidegen_cannot_write_here")
    assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr


def test_preview_and_info_commands(phantom_dir, tmp_path):
    png = tmp_path / "one.png"
    res = run_cli("preview", "--data", phantom_dir, "--case", "phantom_000001", "--out", png)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same picture as the dataset writer's: the phantom's anisotropic voxels drawn to scale
    from PIL import Image

    written = np.asarray(Image.open(phantom_dir / "previews" / "phantom_000001.png"))
    assert np.array_equal(np.asarray(Image.open(png)), written)
    res = run_cli("preview", "--data", phantom_dir, "--out", tmp_path / "all.png")
    assert res.returncode == 2 and "a PNG path takes one case (give --case)" in res.stderr and not (tmp_path / "all.png").exists()
    res = run_cli("preview", "--data", phantom_dir, "--case", "nope")
    assert res.returncode == 2 and "--case 'nope': no complete case of that id" in res.stderr and "phantom_000001" in res.stderr
    res = run_cli("info")
    assert res.returncode == 0 and "guidegen22" in res.stdout and "torch" in res.stdout


@pytest.mark.parametrize("args, message", [
    (("generate", "--bogus", "x"), "error: No such option: --bogus"),
    (("generate", "--n", "abc", "x"), "error: Invalid value for '--n'"),
    (("bogus",), "error: No such command 'bogus'"),
    (("generate", "--labels"), "error: Option '--labels' requires an argument"),
])
def test_usage_errors_are_one_line_exit_2(args, message):
    """typer >= 0.29 raises its bundled click's exceptions, which are not click's: still one line."""
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message) and "Traceback" not in res.stderr


def test_ctrl_c_exits_130(monkeypatch, capsys):
    """typer hands Ctrl-C back as a return value (not an exception) without standalone mode."""
    import guidegen.text.findings as findings
    from helpers_cli import run_cli_inprocess

    def interrupted(text):
        raise KeyboardInterrupt

    monkeypatch.setattr(findings, "parse_findings", interrupted)
    code, _, err = run_cli_inprocess(monkeypatch, capsys, "parse", "liver mass")
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted"


def test_rerun_resumes_or_extends_a_phantom_set_and_refuses_other_settings(tmp_path):
    out = tmp_path / "ph"
    assert run_cli("phantom", "--n", 2, "--size", 16, "--out", out, "--no-previews").returncode == 0
    first = (out / "ct" / "phantom_000000.nii.gz").read_bytes()
    (out / "meta" / "phantom_000001.json").unlink()  # as if killed before case 1 was committed
    stamp = (out / "meta" / "phantom_000000.json").stat().st_mtime_ns
    res = run_cli("phantom", "--n", 3, "--size", 16, "--out", out, "--no-previews")
    assert res.returncode == 0, res.stderr
    reader = DatasetReader(out)
    assert reader.case_ids() == ["phantom_000000", "phantom_000001", "phantom_000002"]
    assert (out / "meta" / "phantom_000000.json").stat().st_mtime_ns == stamp  # kept, not redone
    assert (out / "ct" / "phantom_000000.nii.gz").read_bytes() == first
    assert reader.info["status"] == "complete" and reader.info["seeds"] == [0, 2] and reader.info["num_cases"] == 3
    for args, message in ((("--n", 3, "--size", 24), "grid: [16, 16, 16] -> [24, 24, 24]"),
                          (("--n", 3, "--size", 16, "--seed", 5), "first seed: 0 -> 5"),
                          (("--n", 2, "--size", 16), "--n: 3 -> 2 (fewer cases)")):
        res = run_cli("phantom", *args, "--out", out, "--no-previews")
        assert res.returncode == 2 and message in res.stderr and "--overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert DatasetReader(out).case_ids() == ["phantom_000000", "phantom_000001", "phantom_000002"]


def test_sigterm_leaves_through_finally_and_the_rerun_finishes(tmp_path):
    """A scheduler's SIGTERM: one line, exit 143, complete cases kept, no temporary files; the
    re-run resumes."""
    import signal
    import time

    out = tmp_path / "ph"
    proc = subprocess.Popen([sys.executable, "-m", "guidegen", "phantom", "--n", "40", "--size", "32", "--out", str(out), "--no-previews"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((out / "meta").glob("*.json")):  # the first case is complete
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().endswith("terminated") and "Traceback" not in err
    assert not [p for p in out.rglob(".*")]
    kept = DatasetReader(out).case_ids()
    assert 1 <= len(kept) < 40 and DatasetReader(out).info["status"] == "incomplete"
    assert run_cli("phantom", "--n", 40, "--size", 32, "--out", out, "--no-previews").returncode == 0
    assert len(DatasetReader(out).case_ids()) == 40
