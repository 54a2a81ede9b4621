"""Shared benchmark helpers: sampler-option overrides and the HU-range report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmarks_common  # noqa: E402

from guidegen.labels import load_label_set  # noqa: E402


def test_sampler_options_override_only_what_was_given_with_and_without_a_prefix():
    names = ["temperature", "temper", "lesion-scale", "window-t", "window-share"]
    for prefix in ("", "tcss-"):
        ap = argparse.ArgumentParser()
        benchmarks_common.add_sampler_options(ap, names, prefix=prefix)
        gen = SimpleNamespace(temperature=0.6, temper_prior_only=True, site_gate_lesion_scale=True,
                              window_t=0, window_share=0.0)
        args = ap.parse_args([f"--{prefix}temper", "all", f"--{prefix}lesion-scale", "0", f"--{prefix}window-t", "850"])
        benchmarks_common.apply_sampler_options(gen, args, names, prefix=prefix)
        assert gen.temper_prior_only is False and gen.site_gate_lesion_scale is False and gen.window_t == 850
        assert gen.temperature == 0.6 and gen.window_share == 0.0  # not given: the checkpoint's stays
    ap = argparse.ArgumentParser()
    benchmarks_common.add_sampler_options(ap, ["temperature"])
    try:
        ap.parse_args(["--churn", "1"])  # only the named options exist
    except SystemExit:
        pass
    else:
        raise AssertionError("--churn should not be an option here")


def test_hu_outside_is_signed_distance_to_the_real_range_and_lines_count_misses():
    ls = load_label_set("guidegen22")
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[:2] = ls.id_of("liver")
    lab[2:] = ls.id_of("spleen")
    ct = np.where(lab == ls.id_of("liver"), 60.0, 130.0).astype(np.float32)
    ref = {"liver": [50.0, 70.0], "spleen": [100.0, 110.0], "air": [-1000.0, -990.0]}
    out = benchmarks_common.hu_outside(ct, lab, ls, ref, "median")
    assert out == {"liver": 0.0, "spleen": 20.0}  # organs only: no air; spleen 20 HU above its maximum
    text = benchmarks_common.hu_lines([out, {"liver": -3.0, "spleen": 0.0}], "median")
    assert "within the real range: 50%" in text and "spleen: 1 (+20)" in text and "liver: 1 (-3)" in text
    assert "(QC's tolerance): 100.0%" in text


def test_textured_adds_one_seeded_draw_in_hu_and_nothing_without_tables():
    import torch

    from guidegen.models.autoencoder import AnatomyAwareAutoencoder

    ae = AnatomyAwareAutoencoder(3, channels=(4, 8), label_embed_dim=2, texture_bins=1, texture_quantiles=2)
    rec = np.full((4, 4, 4), 100.0, np.float32)
    labels = np.full((4, 4, 4), 1)
    assert np.allclose(benchmarks_common.textured(ae, rec, labels, (-1024.0, 2048.0), 0), 100.0)  # tables not measured
    ae.texture.table[1, 0] = torch.tensor([-0.1, 0.1])  # ±153.6 HU at the 25 % / 75 % levels
    a = benchmarks_common.textured(ae, rec, labels, (-1024.0, 2048.0), 0)
    assert np.array_equal(a, benchmarks_common.textured(ae, rec, labels, (-1024.0, 2048.0), 0))
    assert not np.array_equal(a, benchmarks_common.textured(ae, rec, labels, (-1024.0, 2048.0), 1))
    assert a.min() >= 100 - 153.6 - 1e-3 and a.max() <= 100 + 153.6 + 1e-3 and a.std() > 10
