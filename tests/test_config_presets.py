"""The GPU presets carry the demo preset's method settings; only the sizes differ.

Every field where demo.yaml and a GPU preset differ must be a size (``SCALE``, kept at the
preset's value) or a voxel count scaled with the grid (``VOXEL_SCALED``); every method field
(``METHOD``) must equal the demo's. A change to demo.yaml's method settings therefore fails here
until the GPU presets mirror it, and a new field that differs has to be classified.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from guidegen.config import load_config

GPU_PRESETS = ("torso-128", "torso-256")

# Method choices: equal to the demo's in every GPU preset. The first group differed before the
# presets were aligned with the demo (2026-11-29); the rest were already equal and are pinned so
# that turning one on in the demo has to be mirrored.
METHOD = (
    "tcss.t_power",
    "tcss.input_evidence",
    "tcss.class_weights",
    "tcss.site_gate",
    "tcss.site_gate_lesion_scale",
    "tcss.size_guidance",
    "tcss.guidance",
    "tcss.temperature",
    "tcss.temper_prior_only",
    "autoencoder.focus_crop_prob",
    "autoencoder.class_l1_weight",
    "autoencoder.class_mean_weight",
    "autoencoder.label_readout",
    "autoencoder.texture_bins",
    "autoencoder.texture_quantiles",
    "autoencoder.texture_depths",
    "autoencoder.window_class_balanced",
    "autoencoder.class_window_prob",
    # already equal
    "text.encoder",
    "text.encode_text",
    "text.cond_drop_prob",
    "tcss.timesteps",
    "tcss.schedule",
    "tcss.aux_ce_weight",
    "tcss.size_guidance_host_refill",
    "tcss.sample_churn",
    "tcss.sample_window_t",
    "tcss.sample_window_share",
    "autoencoder.hu_range",
    "autoencoder.inject_labels",
    "autoencoder.norm",
    "autoencoder.label_depth",
    "autoencoder.texture_grain",
    "autoencoder.p_random_window",
    "autoencoder.kl_weight",
    "autoencoder.window_weight",
    "autoencoder.ssim_weight",
    "autoencoder.full_range_weight",
    "autoencoder.class_distribution_weight",
    "autoencoder.class_l1_weights",
    "autoencoder.adv_weight",
    "ldm.timesteps",
    "ldm.prediction",
    "ldm.sampler",
    "ldm.guidance",
    "ldm.label_fractions",
)

# Counts of voxels of the demo's 48×48×64 grid: the demo's value × the grid ratio (geometric
# mean over the axes), rounded to the nearest odd number.
VOXEL_SCALED = ("tcss.size_guidance_pool",)

# Sizes: grid, widths, depths, batches, step counts and schedules, paths; the preset's own value.
# A dotted name covers the fields below it.
SCALE = (
    "name",
    "data.grid",
    "text.max_tokens",
    "text.num_queries",
    "text.context_dim",
    "text.injection_layers",
    "text.trainable_dim",
    "tcss.channels",
    "tcss.attention_levels",
    "tcss.num_res_blocks",
    "tcss.num_head_channels",
    "tcss.patch_size",
    "tcss.sample_steps",
    "tcss.train",
    "autoencoder.channels",
    "autoencoder.latent_channels",
    "autoencoder.num_res_blocks",
    "autoencoder.label_embed_dim",
    "autoencoder.disc_start",
    "autoencoder.train_crop",
    "autoencoder.train",
    "ldm.channels",
    "ldm.attention_levels",
    "ldm.num_res_blocks",
    "ldm.num_head_channels",
    "ldm.sample_steps",
    "ldm.label_encoder_channels",
    "ldm.autoencoder_checkpoint",
    "ldm.train",
)


def _flat(model: BaseModel, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _covered(field: str, names: tuple[str, ...]) -> bool:
    return any(field == n or field.startswith(n + ".") for n in names)


def _scaled_voxels(demo_value: int, demo_grid, grid) -> int:
    ratio = 1.0
    for n, d in zip(grid, demo_grid):
        ratio *= n / d
    raw = demo_value * ratio ** (1 / 3)
    return 2 * round((raw - 1) / 2) + 1


def test_the_classification_is_consistent():
    fields = _flat(load_config("demo"))
    for group in (METHOD, VOXEL_SCALED, SCALE):
        for name in group:
            assert any(_covered(f, (name,)) for f in fields), f"{name} is not a config field"
    assert len(set(METHOD)) == len(METHOD)
    assert not [f for f in fields if sum(_covered(f, g) for g in (METHOD, VOXEL_SCALED, SCALE)) > 1]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_mirrors_the_demo_method_settings(preset):
    demo, gpu = _flat(load_config("demo")), _flat(load_config(preset))
    wrong = {f: (gpu[f], demo[f]) for f in METHOD if gpu[f] != demo[f]}
    assert not wrong, f"{preset}: method settings differ from demo.yaml (preset, demo): {wrong}"


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_gpu_preset_scales_the_demo_voxel_counts(preset):
    demo, gpu = load_config("demo"), load_config(preset)
    d, g = _flat(demo), _flat(gpu)
    for f in VOXEL_SCALED:
        assert g[f] == _scaled_voxels(d[f], demo.data.grid, gpu.data.grid), f"{preset}: {f}"
    assert g["tcss.size_guidance_pool"] == {"torso-128": 7, "torso-256": 15}[preset]


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_every_difference_from_the_demo_is_a_size(preset):
    demo, gpu = _flat(load_config("demo")), _flat(load_config(preset))
    unclassified = sorted(f for f in demo if demo[f] != gpu[f] and not _covered(f, SCALE + VOXEL_SCALED))
    assert not unclassified, f"{preset} differs from demo.yaml in {unclassified}: a method setting to mirror, or add it to SCALE"
