"""benchmarks/tcss_decision_window.py: expected organ volumes under q(x_t | x_0) and their readability."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tcss_decision_window as tdw  # noqa: E402

from guidegen.diffusion.categorical import cosine_schedule  # noqa: E402

K = 4


def _maps() -> torch.Tensor:
    maps = torch.zeros(3, 6, 6, 6, dtype=torch.long)
    for i in range(3):
        maps[i].view(-1)[: 20 * (i + 1)] = 1  # class 1: 20, 40, 60 voxels
        maps[i].view(-1)[100:110] = 2  # class 2: 10 voxels everywhere
    return maps


def test_identity_denoiser_at_t1_reads_the_true_volumes():
    """A network that returns x_t as x_0 gives the volumes of x_t, which at t = 1 is x_0 up to abar_1."""
    ab = cosine_schedule(1000)
    identity = lambda xt, t, ctx: 50.0 * xt  # noqa: E731  (one-hot x_t as near-certain logits)
    maps = _maps()
    e = tdw.expected_volumes(identity, maps, torch.zeros(3, 1, 1), 1, ab, K, [1, 2], torch.Generator().manual_seed(0))
    # a voxel keeps its class with probability abar_1 + (1 - abar_1) / K: tiny flips only
    np.testing.assert_allclose(e[:, 0].numpy(), [20, 40, 60], atol=2)
    np.testing.assert_allclose(e[:, 1].numpy(), [10, 10, 10], atol=2)


def test_uninformed_denoiser_says_nothing_about_size():
    ab = cosine_schedule(1000)
    uniform = lambda xt, t, ctx: torch.zeros_like(xt)  # noqa: E731
    e = tdw.expected_volumes(uniform, _maps(), torch.zeros(3, 1, 1), 500, ab, K, [1], torch.Generator().manual_seed(0))
    np.testing.assert_allclose(e[:, 0].numpy(), [216 / K] * 3, rtol=1e-6)  # every voxel 1/K, whatever the map
    r, sd = tdw.readability(e[:, 0].numpy(), np.array([20.0, 40.0, 60.0]))
    assert np.isnan(r) and sd == 0


def test_readability_hand_cases():
    true = np.array([10.0, 20.0, 30.0, 40.0])
    assert tdw.readability(true * 0.5 + 7, true) == pytest.approx((1.0, 0.5))
    r, sd = tdw.readability(np.array([40.0, 30.0, 20.0, 10.0]), true)
    assert r == pytest.approx(-1.0) and sd == pytest.approx(1.0)


def test_missing_maps_is_one_clear_exit(tmp_path):
    (tmp_path / "arm_seed0.json").write_text('{"prompts": ["a"]}')
    with pytest.raises(SystemExit, match="no kept maps"):
        tdw.load_cached_maps(tmp_path, "arm", 1)
