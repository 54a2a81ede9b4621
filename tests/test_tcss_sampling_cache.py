"""benchmarks/tcss_sampling.py: the per-batch volume cache lets shards share and resume the slow arm."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmarks_common  # noqa: E402
import tcss_sampling  # noqa: E402

from guidegen.labels import load_label_set  # noqa: E402


class CountingGenerator:
    """Stands in for LabelMapGenerator: a map whose liver volume is seed * 10 + prompt index."""

    def __init__(self):
        self.label_set = load_label_set()
        self.meta = {"train_steps": 7}
        self.cfg = SimpleNamespace(tcss=SimpleNamespace(size_guidance_pool=3, timesteps=1000))
        self.site_gate, self.size_guidance, self.temperature, self.site_gate_lesion_scale = 1.0, 1.0, 0.35, True
        self.churn, self.temper_prior_only, self.host_refill = 0.0, False, False
        self.window_t, self.window_share = 0, 0.0
        self.device = "cpu"
        self.calls: list[tuple[list[str], int, int]] = []

    def __call__(self, prompts, findings, seed, steps, guidance, progress=False):
        self.calls.append((list(prompts), seed, steps))
        maps = np.zeros((len(prompts), 4, 4, 4), np.uint8)
        liver = self.label_set.id_of("liver")
        for i in range(len(prompts)):
            maps[i].reshape(-1)[: seed * 10 + i] = liver
        return maps

    def affine(self):
        return np.diag([10.0, 10.0, 10.0, 1.0])  # 1 ml voxels


PROMPTS = ["a", "b", "c", "d"]


def test_shards_share_the_cache_and_a_final_run_samples_nothing(tmp_path):
    gen = CountingGenerator()
    liver = gen.label_set.id_of("liver")
    vols, _ = tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=1, cache=tmp_path, shard=(0, 2))
    assert vols is None  # batches 1 and 3 belong to the other shard
    assert [(c[0], c[1]) for c in gen.calls] == [(["a"], 0), (["c"], 2)]

    vols, _ = tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=1, cache=tmp_path, shard=(1, 2))
    assert [c[1] for c in gen.calls[2:]] == [1, 3]  # its own batches only; 0 and 2 read back
    np.testing.assert_allclose(vols[:, liver], [0, 10, 20, 30])

    gen.calls.clear()
    again, seconds = tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=1, cache=tmp_path)
    assert gen.calls == [] and np.isfinite(seconds)
    np.testing.assert_array_equal(again, vols)
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == [f"{benchmarks_common.sampler_tag(gen, 1000, 1.0)}_batch1_seed{j}.json" for j in range(4)]
    assert sorted(p.name for p in tmp_path.glob("*.maps.npz")) == [n.replace(".json", ".maps.npz") for n in names]
    assert "tcss7_steps1000_g1.0_gate1.0_vol1.0_pool3_temp0.35_lesionscale" in names[0]


def test_batches_keep_their_seed_and_other_settings_do_not_share_a_file(tmp_path):
    gen = CountingGenerator()
    liver = gen.label_set.id_of("liver")
    vols, _ = tcss_sampling.sample_volumes(gen, PROMPTS, 25, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    np.testing.assert_allclose(vols[:, liver], [50, 51, 60, 61])  # batch j is seeded offset + j
    gen.temperature = 1.0
    tcss_sampling.sample_volumes(gen, PROMPTS, 25, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 4 and len(list(tmp_path.glob("*.json"))) == 4
    # churn names the few-step arm's files, not those of the full (every-step) sampler
    tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    gen.churn = 0.3
    tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 6
    tcss_sampling.sample_volumes(gen, PROMPTS, 25, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 8 and len(list(tmp_path.glob("*_churn0.3_*.json"))) == 2
    # so does the early window of the visit list
    gen.churn, gen.window_t, gen.window_share = 0.0, 850, 0.6
    tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 8
    tcss_sampling.sample_volumes(gen, PROMPTS, 25, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 10 and len(list(tmp_path.glob("*_window850x0.6_*.json"))) == 2
    gen.window_t, gen.window_share = 0, 0.0
    # tempering the prior alone is another sampler (at temperature 1 the same one)
    gen.temper_prior_only = True
    tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 10  # temperature 1.0 here: nothing to temper
    gen.temperature = 0.35
    tcss_sampling.sample_volumes(gen, PROMPTS, 1000, 1.0, batch=2, seed_offset=5, cache=tmp_path)
    assert len(gen.calls) == 12 and len(list(tmp_path.glob("*_temp0.35prior_*.json"))) == 2


def test_a_cache_of_other_prompts_is_refused_by_name(tmp_path):
    gen = CountingGenerator()
    tcss_sampling.sample_volumes(gen, PROMPTS[:1], 25, 1.0, batch=1, cache=tmp_path)
    (path,) = tmp_path.glob("*.json")
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prompts": ["other"]}))
    with pytest.raises(SystemExit, match=f"{path.name}: cached for other prompts"):
        tcss_sampling.sample_volumes(gen, PROMPTS[:1], 25, 1.0, batch=1, cache=tmp_path)


@pytest.mark.parametrize("text", ["2", "2/2", "-1/2", "a/b"])
def test_parse_shard_rejects_malformed(text):
    with pytest.raises(Exception, match="--shard"):
        tcss_sampling.parse_shard(text)


def test_parse_shard():
    assert tcss_sampling.parse_shard("1/3") == (1, 3)


def test_volume_shift_line_is_the_paired_difference():
    ref = np.array([[0.0, 100.0], [0.0, 200.0]])
    other = np.array([[0.0, 130.0], [0.0, 200.0]])
    line = tcss_sampling.volume_shift_line(ref, other, 1, "urinary_bladder")
    # means 165 vs 150; SDs 49.5 (= 70/sqrt 2) vs 70.7 (= 100/sqrt 2); differences 30 and 0 of the reference mean 150:
    # +10 % ± (std 14.1 % / sqrt 2 = 10 %)
    assert line == ("urinary_bladder: mean 165.0 ml vs 150.0 ml, SD 49.5 vs 70.7 ml; same prompt, this arm minus the reference: "
                    "+10.0% ± 10.0% (SE) of the reference mean")


def test_strided_only_caches_the_few_step_arm_and_samples_no_reference(tmp_path, monkeypatch, capsys):
    import torch

    from guidegen.pipeline import GuideGenPipeline

    gen = CountingGenerator()
    gen.cfg.tcss.timesteps, gen.cfg.tcss.guidance = 1000, 1.0
    pipe = SimpleNamespace(labels=gen, label_set=gen.label_set, checkpoint_root=tmp_path)
    monkeypatch.setattr(GuideGenPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    argv = ["tcss_sampling.py", "--n", "4", "--batch", "2", "--steps", "25", "--cache", str(tmp_path / "c"),
            "--threads", str(torch.get_num_threads())]
    monkeypatch.setattr(sys, "argv", argv + ["--strided-only"])
    tcss_sampling.main()
    assert [c[1:] for c in gen.calls] == [(0, 25), (1, 25)]
    assert sorted(p.name for p in (tmp_path / "c").glob("*.json")) == [
        f"{benchmarks_common.sampler_tag(gen, 25, 1.0)}_batch2_seed{j}.json" for j in (0, 1)]
    assert "run again without --strided-only" in capsys.readouterr().out

    monkeypatch.setattr(sys, "argv", argv)  # the comparison run samples only the reference
    tcss_sampling.main()
    assert [c[1:] for c in gen.calls[2:]] == [(0, 1000), (1, 1000)]
    assert "organ-volume relative W1, strided 25 vs ancestral" in capsys.readouterr().out


def test_cleaned_volumes_come_from_the_kept_maps_and_old_batches_are_redrawn(tmp_path, monkeypatch):
    """A lone spleen voxel in the background is what generate's cleanup relabels."""
    import guidegen.postprocess

    class Speckled(CountingGenerator):
        def __call__(self, *args, **kwargs):
            maps = super().__call__(*args, **kwargs)
            maps[:, 3, 3, 3] = self.label_set.id_of("spleen")
            self.last = maps
            return maps

    gen = Speckled()
    liver, spleen = gen.label_set.id_of("liver"), gen.label_set.id_of("spleen")
    raw, _ = tcss_sampling.sample_volumes(gen, PROMPTS[:2], 25, 1.0, batch=2, seed_offset=1, cache=tmp_path)
    np.testing.assert_allclose(raw[:, liver], [10, 11])   # seed 1: 10 and 11 liver voxels in a row
    np.testing.assert_allclose(raw[:, spleen], [1, 1])
    (path,) = tmp_path.glob("*.json")
    with np.load(tcss_sampling.maps_file(path)) as kept:
        np.testing.assert_array_equal(kept["maps"], gen.last)
    clean, _ = tcss_sampling.sample_volumes(gen, PROMPTS[:2], 25, 1.0, batch=2, seed_offset=1, cache=tmp_path, cleaned=True)
    assert len(gen.calls) == 1                            # read back, not drawn again
    np.testing.assert_allclose(clean[:, spleen], [0, 0])  # the lone voxel took its neighbours' class
    np.testing.assert_allclose(clean[:, liver], raw[:, liver])

    # another cleanup is measured on the kept maps, without sampling again
    monkeypatch.setattr(guidegen.postprocess, "clean_label_map", lambda lab, *a: (lab.copy(), {}))
    unchanged, _ = tcss_sampling.sample_volumes(gen, PROMPTS[:2], 25, 1.0, batch=2, seed_offset=1, cache=tmp_path, cleaned=True)
    assert len(gen.calls) == 1
    np.testing.assert_array_equal(unchanged, raw)
    monkeypatch.undo()

    tcss_sampling.maps_file(path).unlink()                # a batch cached by an earlier version
    again, _ = tcss_sampling.sample_volumes(gen, PROMPTS[:2], 25, 1.0, batch=2, seed_offset=1, cache=tmp_path, cleaned=True)
    assert len(gen.calls) == 2
    np.testing.assert_array_equal(again, clean)
    assert tcss_sampling.maps_file(path).is_file()


def test_data_w1_compares_each_arm_with_the_datasets_label_maps(tmp_path, capsys):
    """``--data``: liver volumes 10 and 20 ml in the dataset (1 ml voxels); an arm drawing 15 and
    25 ml is 5 ml off everywhere: W1 5 / 15 = 33.3 %; an arm drawing the data's volumes is at 0."""
    from guidegen.data.layout import CaseRecord, DatasetWriter

    ls = load_label_set()
    liver = ls.id_of("liver")
    writer = DatasetWriter(tmp_path / "data", name="t", label_set=ls.name)
    for i, n in enumerate((10, 20)):
        lab = np.zeros((4, 4, 4), np.uint8)
        lab.reshape(-1)[:n] = liver
        writer.write_case(CaseRecord(case=f"c{i}", labels=lab, affine=np.diag([10.0, 10.0, 10.0, 1.0])))
    writer.finalize()
    arm = np.zeros((2, ls.num_classes))
    arm[:, liver] = (15.0, 25.0)
    same = np.zeros((2, ls.num_classes))
    same[:, liver] = (10.0, 20.0)
    w1 = tcss_sampling.data_w1_lines({"strided 50": arm, "ancestral": same}, tmp_path / "data", ls)
    assert w1["strided 50"] == {"liver": pytest.approx(1 / 3)} and w1["ancestral"] == {"liver": pytest.approx(0.0, abs=1e-9)}
    out = capsys.readouterr().out
    assert "against the data (2 cases), strided 50: mean 33.3%; farthest liver 33.3% (20.0 vs 15.0 ml)" in out
