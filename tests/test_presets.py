"""Every shipped config preset loads and its grids fit every network's downsampling."""

from __future__ import annotations

from importlib import resources

import pytest

from guidegen.config import load_config

PRESETS = sorted(p.name.removesuffix(".yaml") for p in (resources.files("guidegen") / "configs").iterdir()
                 if p.name.endswith(".yaml"))


def test_the_paper_scale_presets_ship():
    assert {"demo", "torso-128", "torso-256"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_grids_divide(name):
    cfg = load_config(name)
    assert cfg.name == name
    grid = cfg.data.grid
    tcss_factor = cfg.tcss.patch_size * 2 ** (len(cfg.tcss.channels) - 1)
    ae_factor = 2 ** (len(cfg.autoencoder.channels) - 1)
    ldm_factor = ae_factor * 2 ** (len(cfg.ldm.channels) - 1)
    for factor, what in ((tcss_factor, "tcss"), (ae_factor, "autoencoder"), (ldm_factor, "ldm")):
        assert all(n % factor == 0 for n in grid), f"{name}: data.grid {grid} not divisible by the {what} factor {factor}"
    crop = cfg.autoencoder.train_crop or grid
    assert all(c % ae_factor == 0 and c <= n for c, n in zip(crop, grid))
    # the constraints the UNet constructors check (heads divide attention widths and the middle block)
    for sec in (cfg.tcss, cfg.ldm):
        assert len(sec.channels) == len(sec.attention_levels)
        widths = [c for c, a in zip(sec.channels, sec.attention_levels) if a] + [sec.channels[-1]]
        assert all(c % sec.num_head_channels == 0 for c in widths)


@pytest.mark.parametrize("name", ["torso-128", "torso-256"])
def test_gpu_presets_are_paper_scale(name):
    cfg = load_config(name)
    grid = cfg.data.grid
    # self-attention only on small token grids (16³ and 8³): explicit attention is tokens² per head
    for sec, top in ((cfg.tcss, grid[0] // cfg.tcss.patch_size), (cfg.ldm, grid[0] // 2 ** (len(cfg.autoencoder.channels) - 1))):
        sizes = [top // 2**i for i, a in enumerate(sec.attention_levels) if a]
        assert sizes and max(sizes) <= 16, f"{name}: attention at {sizes}³"
    assert grid[0] // cfg.tcss.patch_size == 128  # the TCSS UNet's first level runs at 128³ in both presets
    for stage in ("tcss", "autoencoder", "ldm"):
        train = getattr(cfg, stage).train
        assert train.mixed_precision == "bf16"
    assert cfg.tcss.train.gradient_checkpointing and cfg.ldm.train.gradient_checkpointing
    assert cfg.text.encoder == "minilm"
    assert cfg.autoencoder.train_crop == (128, 128, 128)
