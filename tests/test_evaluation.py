"""End-to-end ``guidegen evaluate`` on tiny phantom sets: metric ordering, outputs, errors."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from guidegen.data.layout import DatasetReader, DatasetWriter
from guidegen.data.phantom_dataset import write_phantom_dataset
from guidegen.errors import GuideGenError
from guidegen.evaluation import EvalConfig, evaluate
from guidegen.evaluation.attributes import AttributeConfig
from guidegen.evaluation.degrade import write_degraded_copy
from guidegen.evaluation import runner
from guidegen.evaluation.runner import pick_threads, split_real
from guidegen.evaluation.features import FeatureNetConfig
from guidegen.evaluation.report import SECTIONS
from guidegen.models.segmenter import SegmenterConfig

GRID = (24, 24, 32)
CFG = EvalConfig(grid=GRID, segmenter=SegmenterConfig(steps=60), features=FeatureNetConfig(steps=40),
                 attributes=AttributeConfig(steps=30), downstream_steps=30, montage_cases=2)
REQUIRED_KEYS = ("frechet_distance", "precision", "recall", "organ_volume_w1", "tumor_placement_rate", "alignment_dice_mean",
                 "alignment_dice", "attribute_accuracy", "downstream_dice_synthetic", "downstream_dice_real")


def _record_calls(mp: pytest.MonkeyPatch, seen: list) -> None:
    """Wrap the runner's training and scoring entry points to record (call, set root, case ids)."""
    for name, arg in (("train_feature_net", 0), ("train_attribute_classifier", 0), ("trained_segmenter", 0),
                      ("extract_features", 1), ("attribute_accuracy", 2)):
        orig = getattr(runner, name)

        def wrapped(*a, _orig=orig, _name=name, _arg=arg, **k):
            ds = a[_arg]
            seen.append((_name, Path(ds.root).resolve(), list(ds.cases)))
            return _orig(*a, **k)

        mp.setattr(runner, name, wrapped)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """real (8 cases), good = real phantom with other seeds (6), bad = degraded copy of good.

    ``good.calls`` / ``bad.calls``: (function, set root, case ids) of every network training and
    real/synthetic scoring call the run made (see :func:`_record_calls`)."""
    root = tmp_path_factory.mktemp("eval")
    write_phantom_dataset(root / "real", n=8, grid=GRID, seed=0, previews=False, progress=False)
    write_phantom_dataset(root / "good", n=6, grid=GRID, seed=100, previews=False, progress=False)
    write_degraded_copy(root / "good", root / "bad", noise_hu=80.0, shift_voxels=3, wrong_site=True)
    threads = torch.get_num_threads()
    results = []
    for name in ("good", "bad"):
        seen: list = []
        with pytest.MonkeyPatch.context() as mp:
            _record_calls(mp, seen)
            res = evaluate(root / "real", root / name, root / f"out_{name}", CFG, threads=1)
        res.calls = seen
        results.append(res)
    good, bad = results
    assert torch.get_num_threads() == threads  # restored
    return root, good, bad


def test_metrics_rank_real_above_degraded(runs):
    _, good, bad = runs
    g, b = good.metrics, bad.metrics
    assert g["frechet_distance"] < b["frechet_distance"]
    assert g["alignment_dice_mean"] > b["alignment_dice_mean"]
    assert g["tumor_placement_rate"] > b["tumor_placement_rate"]
    # label shift and noise leave label-map statistics alone: same volumes, same order checks
    assert g["organ_volume_w1"] == pytest.approx(b["organ_volume_w1"])
    assert g["anatomy_order_pass_rate"] == 1.0


def test_metrics_json_keys_and_ranges(runs):
    _, good, _ = runs
    m = json.loads(good.metrics_path.read_text())
    for key in REQUIRED_KEYS:
        assert key in m, key
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert "liver" in m["alignment_dice"] and "background" not in m["alignment_dice"]
    assert all(0.0 <= v <= 1.0 for v in m["alignment_dice"].values())
    # the real ceiling averages the same classes as the synthetic mean
    scored = [k for k, v in m["alignment_dice"].items() if v is not None]
    assert m["alignment_dice_classes"] == len(scored)
    ref = [m["alignment_dice_real_reference"][k] for k in scored if m["alignment_dice_real_reference"].get(k) is not None]
    assert m["alignment_dice_real_reference_mean"] == pytest.approx(np.mean(ref), abs=1e-3)
    assert m["downstream"]["n_train"] == 6 and m["downstream"]["n_test_real"] == 2
    assert any("Slice-wise FID/LPIPS skipped" in n for n in m["notes"])
    assert any("The real reference has 2 case(s): Fréchet distance, precision and recall" in n for n in m["notes"])


def test_a_synthetic_set_made_from_the_real_maps_is_flagged_and_kept_out_of_the_test(runs, tmp_path):
    """A mask → CT set from the real set's own maps: the shared maps are counted and noted, and
    the usefulness arm never trains on a held-out case's anatomy."""
    root, _, _ = runs
    shutil.copytree(root / "real", tmp_path / "copy")
    res = evaluate(root / "real", tmp_path / "copy", tmp_path / "out", replace(CFG, downstream_steps=5), threads=1)
    m = res.metrics
    held = set(m["real_split"]["held_out_ids"])
    assert m["synthetic_label_maps_from_real"] == {"cases": 8, "of": 8, "from_held_out": 2, "real_cases": DatasetReader(root / "real").case_ids()}
    assert any("8 of 8 synthetic cases have a real case's label map" in n for n in m["notes"])
    assert len(m["downstream"]["synthetic_cases"]) == 6 and not held & set(m["downstream"]["synthetic_cases"])
    # a set of other anatomies shares none
    good = json.loads((root / "out_good" / "metrics.json").read_text())
    assert good["synthetic_label_maps_from_real"]["cases"] == 0


def test_real_reference_is_held_out_from_every_network(runs):
    root, good, bad = runs
    real_ids = DatasetReader(root / "real").case_ids()
    assert len(real_ids) == 8
    _, held_i = split_real(8, CFG.held_out_fraction, CFG.split_seed)
    held = [real_ids[i] for i in held_i]
    assert held != real_ids[-2:]  # a seeded random draw, not the sorted tail
    for res in (good, bad):
        split = json.loads(res.metrics_path.read_text())["real_split"]
        assert split["seed"] == CFG.split_seed and split["in_sample"] is False
        assert split["held_out_ids"] == held and split["train_cases"] == 6 and split["held_out_cases"] == 2
        assert split["figures"]["attribute_accuracy_real"] == {"part": "held_out", "cases": 2}
        assert split["figures"]["frechet_precision_recall_real_features"] == {"part": "held_out", "cases": 2}
        assert split["figures"]["feature_net"] == {"part": "train", "cases": 6}
        real_calls = [(name, cases) for name, r, cases in res.calls if r == (root / "real").resolve()]
        trained = {name for name, _ in real_calls if name in ("train_feature_net", "train_attribute_classifier", "trained_segmenter")}
        assert trained == {"train_feature_net", "train_attribute_classifier", "trained_segmenter"}
        for name, cases in real_calls:
            if name in ("train_feature_net", "train_attribute_classifier", "trained_segmenter"):
                assert not set(cases) & set(held), name  # no network ever sees a held-out case
            else:  # the real reference figures: features and attribute accuracy on the held-out cases only
                assert cases == held, name
        assert [n for n, _ in real_calls].count("attribute_accuracy") == 1
        assert [n for n, _ in real_calls].count("extract_features") == 1
        assert res.metrics["feature_space"]["real_reference_cases"] == 2
        assert res.metrics["attribute_classifier"]["real_accuracy_cases"] == 2
    assert "held-out" in good.report_path.read_text()


def test_tiny_real_set_falls_back_to_in_sample_with_a_flag(tmp_path, runs):
    root, _, _ = runs
    write_phantom_dataset(tmp_path / "real3", n=3, grid=GRID, seed=5, previews=False, progress=False)
    tiny = EvalConfig(grid=GRID, segmenter=SegmenterConfig(steps=2), features=FeatureNetConfig(steps=2),
                      attributes=AttributeConfig(steps=2), montage_cases=1)
    seen: list = []
    with pytest.MonkeyPatch.context() as mp:
        _record_calls(mp, seen)
        res = evaluate(tmp_path / "real3", root / "good", tmp_path / "out", tiny, threads=1, cache_dir=tmp_path / "cache")
    m = json.loads(res.metrics_path.read_text())
    assert m["real_split"]["in_sample"] is True and m["real_split"]["held_out_ids"] == []
    assert m["real_split"]["figures"]["attribute_accuracy_real"] == {"part": "all", "cases": 3}
    assert any("too few to hold some out" in n for n in m["notes"])
    assert m["downstream_dice_real"] is None and m["alignment_dice_real_reference"] == {}
    assert all(len(cases) == 3 for _, r, cases in seen if r == (tmp_path / "real3").resolve())
    assert "in-sample" in res.report_path.read_text()


def test_networks_are_cached_by_real_set(runs):
    root, good, bad = runs
    assert good.metrics["feature_space"]["cached"] is False
    assert bad.metrics["feature_space"]["cached"] is True and bad.metrics["segmenter"]["cached"] is True
    assert Path(good.metrics["cache_dir"]) == root / "real" / "cache" / "eval"
    assert (root / "real" / "cache" / "eval" / "segmenter_real" / "model.safetensors").is_file()


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.imgs, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")) or (tag == "link" and key == "href"):
                self.external.append(a[key])


def test_report_is_self_contained_with_every_section(runs):
    _, good, _ = runs
    text = good.report_path.read_text()
    p = _Sections()
    p.feed(text)
    assert p.ids == list(SECTIONS)
    assert len(p.imgs) >= 5 and not p.external
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trained by guidegen on the real set" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary for a headless screenshot")
def test_report_renders_in_headless_chromium(runs, tmp_path):
    _, good, _ = runs
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--window-size=1200,4000", f"--screenshot={shot}", good.report_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 4000)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # rendered content (text, plots), not a blank page


# --------------------------------------------------------------------------- bad input
def test_missing_directories(tmp_path, runs):
    root, _, _ = runs
    with pytest.raises(GuideGenError, match=r"^--real: .*not found"):
        evaluate(tmp_path / "nope", root / "good", tmp_path / "out", CFG)
    with pytest.raises(GuideGenError, match=r"^--synthetic: .*not found"):
        evaluate(root / "real", tmp_path / "nope", tmp_path / "out", CFG)


def test_empty_set_and_set_without_ct(tmp_path, runs):
    root, _, _ = runs
    w = DatasetWriter(tmp_path / "empty", name="empty")
    w.finalize()
    with pytest.raises(GuideGenError, match=r"^--synthetic .*no complete cases"):
        evaluate(root / "real", tmp_path / "empty", tmp_path / "out", CFG)
    shutil.copytree(root / "good", tmp_path / "noct", ignore=shutil.ignore_patterns("cache"))
    shutil.rmtree(tmp_path / "noct" / "ct")
    with pytest.raises(GuideGenError, match=r"^--synthetic .*6 of 6 case\(s\) have no CT"):
        evaluate(root / "real", tmp_path / "noct", tmp_path / "out", CFG)


def test_bad_grid_and_weights(tmp_path, runs):
    root, _, _ = runs
    with pytest.raises(GuideGenError, match="--grid"):
        evaluate(root / "real", root / "good", tmp_path / "out", EvalConfig(grid=(30, 24, 32)))
    with pytest.raises(GuideGenError, match="--inception-weights .*file not found"):
        evaluate(root / "real", root / "good", tmp_path / "out", CFG, inception_weights=tmp_path / "w.pth")


def test_pick_threads():
    assert pick_threads(3) == 3
    assert 1 <= pick_threads() <= torch.get_num_threads()
    with pytest.raises(GuideGenError, match="--threads"):
        pick_threads(0)


def test_cli_errors_are_one_line(tmp_path, runs, monkeypatch, capsys):
    from guidegen.cli import main

    root, _, _ = runs
    monkeypatch.setattr(sys, "argv", ["guidegen", "evaluate", "--real", str(tmp_path / "missing"), "--synthetic", str(root / "good"),
                                      "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert re.fullmatch(r"error: --real: .*dataset directory not found\n", capsys.readouterr().err)
