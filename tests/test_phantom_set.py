"""Phantom datasets record the phantom version; benchmarks re-render a reference set written by another."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmarks_common  # noqa: E402

from guidegen.data.phantom_dataset import phantom_digest, write_phantom_dataset  # noqa: E402

GRID = (24, 24, 32)


def test_dataset_json_records_the_phantom_digest(tmp_path):
    write_phantom_dataset(tmp_path / "d", n=1, grid=GRID, seed=3, previews=False, progress=False)
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["phantom_digest"] == phantom_digest()
    assert len(phantom_digest()) == 12 and int(phantom_digest(), 16) >= 0


def test_phantom_set_keeps_a_current_set_and_rerenders_a_stale_one(tmp_path, capsys):
    root = tmp_path / "ref"
    benchmarks_common.phantom_set(root, 2, GRID, seed=5)
    ct = root / "ct" / "phantom_000005.nii.gz"
    marker = root / "cache" / "derived.txt"  # something computed from the old cases
    marker.parent.mkdir()
    marker.write_text("x")
    stamp = ct.stat().st_mtime_ns

    benchmarks_common.phantom_set(root, 2, GRID, seed=5)  # current: untouched
    assert ct.stat().st_mtime_ns == stamp and marker.exists()
    assert capsys.readouterr().out == ""

    info = root / "dataset.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"phantom_digest": "000000000000"}))  # an older phantom
    benchmarks_common.phantom_set(root, 2, GRID, seed=5)
    assert "rendering it again" in capsys.readouterr().out
    assert json.loads(info.read_text())["phantom_digest"] == phantom_digest()
    assert not marker.exists() and ct.is_file()  # derived data of the old cases is gone with them
    assert sorted(p.name for p in (root / "ct").iterdir()) == ["phantom_000005.nii.gz", "phantom_000006.nii.gz"]

    benchmarks_common.phantom_set(root, 2, GRID, seed=8)  # same folder, other seeds: not the set asked for
    assert "rendering it again" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "ct").iterdir()) == ["phantom_000008.nii.gz", "phantom_000009.nii.gz"]
