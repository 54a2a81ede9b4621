import pytest

from guidegen.config import GuideGenConfig, config_from_dict, load_config
from guidegen.errors import GuideGenError
from guidegen.labels import load_label_set


def test_guidegen22_has_paper_classes_plus_body(label_set):
    assert label_set.num_classes == 22
    assert label_set.names[:4] == ["background", "spleen", "kidney", "liver"]
    assert label_set.tumor_id == 20 and label_set.body_id == 21
    assert len(label_set.organ_ids) == 19 and 0 not in label_set.organ_ids
    assert label_set.colors().shape == (22, 3)


@pytest.mark.parametrize(
    "source,version,expected",
    [("kidney_left", 2, "kidney"), ("lung_middle_lobe_right", 2, "lung"), ("vertebrae_T12", 2, "vertebrae"), ("rib_left_7", 2, "rib"),
     ("heart_ventricle_left", 1, "heart"), ("heart", 2, "heart"), ("portal_vein_and_splenic_vein", 2, "portal_splenic_vein"), ("femur_left", 2, None)],
)
def test_totalsegmentator_names_map_to_groups(label_set, source, version, expected):
    got = label_set.class_for_source(source, version=version)
    assert (label_set.name_of(got) if got is not None else None) == expected


def test_unknown_label_set_is_one_clear_error():
    with pytest.raises(GuideGenError, match="unknown label set 'nope'"):
        load_label_set("nope")


def test_user_label_set_file_with_bad_ids(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nclasses:\n  - {id: 0, name: background}\n  - {id: 5, name: liver}\n")
    with pytest.raises(GuideGenError, match="entry 1 has id 5"):
        load_label_set(str(p))


def test_parts_are_anatomy_counts_and_validated(label_set, tmp_path):
    parts = {n: label_set.classes[label_set.id_of(n)].parts for n in ("liver", "kidney", "lung", "adrenal_gland", "rib", "colon", "tumor")}
    assert parts == {"liver": 1, "kidney": 2, "lung": 2, "adrenal_gland": 2, "rib": None, "colon": None, "tumor": None}
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nclasses:\n  - {id: 0, name: background}\n  - {id: 1, name: liver, parts: 0}\n")
    with pytest.raises(GuideGenError, match=r"mine\.yaml: class 'liver' has parts 0"):
        load_label_set(str(p))
    p.write_text("name: mine\nclasses:\n  - {id: 0, name: background}\n  - {id: 1, name: liver, parts: one}\n")
    with pytest.raises(GuideGenError, match=r"mine\.yaml: class entry 1 is malformed"):
        load_label_set(str(p))


def test_demo_preset_loads_and_defaults_fill_in():
    cfg = load_config("demo")
    assert isinstance(cfg, GuideGenConfig)
    assert cfg.name == "demo" and cfg.data.grid == (48, 48, 64)
    assert cfg.tcss.timesteps == 1000 and cfg.tcss.schedule == "cosine"  # not in demo.yaml: defaults
    assert cfg.tcss.t_power == 0.5 and cfg.tcss.input_evidence  # demo.yaml's own choices
    assert GuideGenConfig().tcss.t_power == 1.5 and not GuideGenConfig().tcss.input_evidence  # the paper's


def test_unknown_key_is_named():
    with pytest.raises(GuideGenError, match=r"x\.yaml: unknown key 'tcss\.train\.learning_rate'"):
        config_from_dict({"tcss": {"train": {"learning_rate": 1}}}, "x.yaml")


def test_wrong_type_is_named():
    with pytest.raises(GuideGenError, match=r"x\.yaml: autoencoder\.latent_channels"):
        config_from_dict({"autoencoder": {"latent_channels": "four"}}, "x.yaml")


def test_grid_must_be_divisible_by_8():
    with pytest.raises(GuideGenError, match="multiple of 8"):
        config_from_dict({"data": {"grid": [48, 48, 60]}}, "x.yaml")


def test_size_guidance_pool_must_be_odd():
    with pytest.raises(GuideGenError, match=r"x\.yaml: tcss\.size_guidance_pool.*odd"):
        config_from_dict({"tcss": {"size_guidance_pool": 4}}, "x.yaml")
    assert config_from_dict({"tcss": {"size_guidance_pool": 5}}, "x.yaml").tcss.size_guidance_pool == 5


def test_sampling_window_must_lie_inside_the_schedule():
    with pytest.raises(GuideGenError, match=r"x\.yaml: .*sample_window_t must be below timesteps \(1000\), got 1000"):
        config_from_dict({"tcss": {"sample_window_t": 1000, "sample_window_share": 0.6}}, "x.yaml")
    with pytest.raises(GuideGenError, match=r"x\.yaml: tcss\.sample_window_share"):
        config_from_dict({"tcss": {"sample_window_share": 1.0}}, "x.yaml")
    cfg = config_from_dict({"tcss": {"sample_window_t": 850, "sample_window_share": 0.6}}, "x.yaml").tcss
    assert (cfg.sample_window_t, cfg.sample_window_share) == (850, 0.6)


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  grid: [48, 48\n  label_set: x\n")
    with pytest.raises(GuideGenError, match=r"bad\.yaml: malformed YAML at line"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(GuideGenError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
