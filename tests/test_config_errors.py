"""Config errors name every problem on one line, suggest the key meant and list the presets."""

from __future__ import annotations

import pytest

from guidegen.config import load_config, preset_names
from guidegen.errors import GuideGenError


def _error(source) -> str:
    with pytest.raises(GuideGenError) as info:
        load_config(source)
    return str(info.value)


def test_every_problem_is_named_with_the_closest_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tcss:\n  sitegate: 1.0\n  train:\n    lr: fast\n")
    msg = _error(bad)
    assert "\n" not in msg  # the CLI prints one line per error
    assert msg.startswith("bad.yaml: 2 problems: ")
    assert "tcss.train.lr: Input should be a valid number" in msg and "'fast'" in msg
    assert "unknown key 'tcss.sitegate' (did you mean 'tcss.site_gate'?)" in msg


def test_unknown_keys_across_sections(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("autoencoder:\n  Label_Readout: true\n  texture_bin: 20\n"
                   "tcss:\n  lr: 1.0e-4\nldm:\n  guidance: -1\n  xyzzy: 2\n")
    msg = _error(bad)
    assert msg.startswith("bad.yaml: 5 problems: ")
    assert "unknown key 'autoencoder.Label_Readout' (did you mean 'autoencoder.label_readout'?)" in msg
    assert "unknown key 'autoencoder.texture_bin' (did you mean 'autoencoder.texture_bins'?)" in msg
    # a key in the wrong section: the same name where it belongs, nearest first
    assert "unknown key 'tcss.lr' (did you mean 'tcss.train.lr'?)" in msg
    assert "ldm.guidance: Input should be greater than or equal to 0 (got -1)" in msg
    assert "unknown key 'ldm.xyzzy'" in msg and "'ldm.xyzzy' (did you mean" not in msg  # nothing close
    assert msg.count("; ") == 4


def test_a_single_problem_keeps_the_one_problem_form(tmp_path):
    bad = tmp_path / "one.yaml"
    bad.write_text("data:\n  grid: [48, 48, 60]\n")
    # the validator's message shows the value already: not repeated as "(got ...)"
    assert _error(bad) == "one.yaml: data.grid: every grid axis must be a multiple of 8 and >= 8, got [48, 48, 60]"


def test_unknown_preset_lists_the_presets_and_the_closest():
    msg = _error("torso128")
    assert "unknown config preset 'torso128'" in msg
    assert "(did you mean 'torso-128'?)" in msg
    assert "available presets: demo, torso-128, torso-256" in msg
    assert preset_names()[:1] == ["demo"] and {"torso-128", "torso-256"} <= set(preset_names())
    far = _error("xyzzy")
    assert "did you mean" not in far and "available presets: " + ", ".join(preset_names()) in far


def test_unet_level_settings_are_checked_when_the_config_loads(tmp_path):
    """Before any data is cached or a model built, for every stage's section (not only the one trained)."""
    bad = tmp_path / "bad2.yaml"
    bad.write_text("tcss:\n  channels: [8, 16]\n  attention_levels: [false, true, true]\n"
                   "ldm:\n  channels: [32, 48]\n  attention_levels: [false, true]\n")
    msg = _error(bad)
    assert msg.startswith("bad2.yaml: 2 problems: ")
    assert "tcss: channels has 2 levels but attention_levels has 3" in msg
    assert "ldm: num_head_channels (32) must divide the channels of every attention level and the last level, got channels [32, 48]" in msg


def test_a_negative_training_seed_is_a_config_error(tmp_path):
    bad = tmp_path / "seed.yaml"
    bad.write_text("autoencoder:\n  train:\n    seed: -1\n")
    assert "autoencoder.train.seed: Input should be greater than or equal to 0 (got -1)" in _error(bad)
