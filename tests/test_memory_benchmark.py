"""benchmarks/memory.py: exact model-state bytes and the scaling of probed activations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory  # noqa: E402
from helpers_tiny import TINY  # noqa: E402

from guidegen.config import config_from_dict  # noqa: E402


@pytest.fixture(scope="module")
def tiny_cfg():
    raw = {**TINY, "data": {"grid": [32, 32, 32]}}
    return config_from_dict(raw)


def test_classify_scales_each_growth_class_hand_case():
    # probe runs of N and 2N voxels: a constant, a linear and a quadratic tensor, one misfit (×6)
    small = [memory.Saved(10, ""), memory.Saved(100, "down"), memory.Saved(50, "mid"), memory.Saved(8, "")]
    big = [memory.Saved(10, ""), memory.Saved(200, "down"), memory.Saved(200, "mid"), memory.Saved(48, "")]
    acts = memory.classify(small, big, scale=4.0)  # target = 4 × probe voxels
    assert acts.const == 10 and acts.quadratic == 50 * 16
    assert acts.linear == 100 * 4 + 8 * 4  # the misfit is counted as linear, and reported
    assert acts.misfit == 1 and acts.blocks == {"down": 400.0, "mid": 800.0}
    assert acts.total(2) == 10 + 2 * (432 + 800)


def test_state_memory_is_exact(tiny_cfg, label_set):
    modules = memory.build_stage("autoencoder", tiny_cfg, label_set, (32, 32, 32))
    n_model = sum(p.numel() for p in modules["model"].parameters())
    n_all = n_model + sum(p.numel() for p in modules["disc"].parameters())
    single = memory.state_memory(modules, ("model",), world_size=1)
    ddp = memory.state_memory(modules, ("model",), world_size=8)
    assert single.params == n_all and single.total == 16 * n_all + 4 * n_model
    assert ddp.total - single.total == 4 * n_all


@pytest.mark.parametrize("stage", ["tcss", "ldm"])
def test_scaled_probe_matches_a_direct_measurement(tiny_cfg, label_set, stage):
    """Activations predicted at 32³ from 16³ probes equal those measured at 32³ (incl. attention²)."""
    target = tiny_cfg.data.grid
    est = memory.estimate_activations(stage, tiny_cfg, label_set, (16, 16, 16), bf16=False, gc=False)
    direct = sum(s.nbytes for s in memory.probe_run(stage, tiny_cfg, label_set, target, target, bf16=False))
    assert est.misfit == 0
    assert est.total(1) == pytest.approx(direct, rel=0.02)
    # both UNets use the fused attention kernel, which keeps no (L, L) matrix for backward
    assert est.quadratic == 0
    gc = memory.estimate_activations(stage, tiny_cfg, label_set, (16, 16, 16), bf16=False, gc=True, no_gc=est)
    assert 0 < gc.total(1) < est.total(1)
