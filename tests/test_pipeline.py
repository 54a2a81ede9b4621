"""End-to-end `guidegen generate` on tiny checkpoints of all three stages trained here for a few steps."""

import json
import subprocess
import sys

import numpy as np
import pytest

from guidegen.data.layout import DatasetReader
from guidegen.io import load_nifti, ras_affine, save_nifti

from helpers_tiny import GRID, build_tiny_checkpoints  # noqa: E402  (tests/ is on sys.path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "guidegen", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    """Checkpoint root with tcss/, autoencoder/, ldm/ exported from 2-step training runs."""
    return build_tiny_checkpoints(tmp_path_factory.mktemp("e2e"))


PROMPT = "62-year-old man, 4 cm mass in the left kidney, portal venous phase"


def test_generate_writes_a_paired_sample(ckpt_root, tmp_path, label_set):
    out = tmp_path / "out"
    res = run_cli("generate", PROMPT, "--checkpoint", ckpt_root, "--out", out, "--seed", 3)
    assert res.returncode == 0, res.stderr
    reader = DatasetReader(out)
    (case,) = reader.case_ids()
    rec = reader.load_case(case)
    assert rec.labels.shape == GRID and rec.ct.shape == GRID
    lab_img, lab_aff = load_nifti(reader.labels_path(case), reorient_to_ras=False)
    ct_img, ct_aff = load_nifti(reader.ct_path(case), reorient_to_ras=False)
    assert lab_img.dtype == np.uint8 and ct_img.dtype == np.int16
    np.testing.assert_allclose(lab_aff, ct_aff)
    assert rec.findings["tumors"] == [{"site": "kidney", "side": "left", "size_mm": 40.0}]
    meta = reader.meta(case)
    assert meta["seed"] == 3 and {"labels_s", "ct_s", "total_s"} <= set(meta["timings"])
    assert meta["settings"]["tcss_site_gate"] == 1.0  # the tiny config's gate strength, recorded
    assert meta["settings"]["tcss_size_guidance"] == 1.0 and meta["settings"]["tcss_size_guidance_pool"] == 3
    assert meta["settings"]["tcss_temperature"] == 0.5 and meta["settings"]["tcss_site_gate_lesion_scale"] is True
    assert meta["settings"]["tcss_churn"] == 0.0  # the default: off
    assert (meta["settings"]["tcss_window_t"], meta["settings"]["tcss_window_share"]) == (0, 0.0)  # default: even grid
    assert meta["settings"]["tcss_temper_prior_only"] is False  # the tiny config's default
    assert meta["settings"]["ct_texture"] is True  # the tiny AE's export measured texture tables
    assert set(meta["models"]) == {"tcss", "autoencoder", "ldm"}
    # a textured CT is checked as medians, against the ranges the AE's export recorded (qc.py)
    assert "passed" in meta["qc"] and meta["qc"]["hu"]["statistic"] == "median" and "air" in meta["qc"]["hu"]["levels"]
    ae_meta = json.loads((ckpt_root / "autoencoder" / "meta.json").read_text())
    assert ae_meta["texture_cases"] >= 1 and "liver" in ae_meta["hu_reference_median"]
    # the export measured the residuals' grain (texture_grain on by default) and stored it with the tables
    assert len(ae_meta["texture_grain"]) == 3 and all(-1 <= g <= 1 for g in ae_meta["texture_grain"])
    reference = json.loads((ckpt_root / "ldm" / "meta.json").read_text())["hu_reference"]  # QC compares against it
    assert reference["air"][0] <= reference["air"][1] < -500 and "liver" in reference
    assert (out / "previews" / f"{case}.png").is_file()
    # the output spacing is the training data's (stored in the checkpoint), not 1 mm
    tcss_meta = json.loads((ckpt_root / "tcss" / "meta.json").read_text())
    np.testing.assert_allclose(np.diag(lab_aff)[:3], tcss_meta["spacing_mm"], rtol=1e-4)


def test_same_prompt_and_seed_is_bitwise_identical(ckpt_root, tmp_path):
    from guidegen.pipeline import GuideGenPipeline

    pipe = GuideGenPipeline.from_pretrained(ckpt_root)
    a = pipe(PROMPT, seed=11)
    b = pipe(PROMPT, seed=11)
    c = pipe(PROMPT, seed=12)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.ct, b.ct)
    assert not (np.array_equal(a.labels, c.labels) and np.array_equal(a.ct, c.ct))
    assert pipe.ct.texture  # the texture draw is seeded too: part of the bitwise check above


def test_no_texture_renders_the_deterministic_decoder(ckpt_root, tmp_path):
    from guidegen.pipeline import run_generate_command

    cts = {}
    for texture in (True, False):
        out = tmp_path / str(texture)
        (cid,) = run_generate_command(prompt=PROMPT, out=out, prompts_file=None, n=1, seed=5, steps=None, guidance=None,
                                      ct_steps=None, ct_guidance=None, checkpoint=ckpt_root, device="cpu", labels_only=False,
                                      labels_path=None, qc_retries=0, texture=texture)
        meta = json.loads((out / "meta" / f"{cid}.json").read_text())
        reader = DatasetReader(out)
        cts[texture] = (meta["settings"]["ct_texture"], reader.load_case(cid))
    assert cts[True][0] is True and cts[False][0] is False
    assert np.array_equal(cts[True][1].labels, cts[False][1].labels)  # the same map, the same latent
    assert not np.array_equal(cts[True][1].ct, cts[False][1].ct)
    from guidegen.pipeline import GuideGenPipeline

    assert not GuideGenPipeline.from_pretrained(ckpt_root, texture=False).ct.texture  # the Python API's switch


def test_sampled_maps_get_the_cleanup_unless_raw(ckpt_root):
    from guidegen.evaluation.metrics import isolated_fraction
    from guidegen.pipeline import GuideGenPipeline
    from guidegen.postprocess import clean_label_map, isolated_voxels

    raw_pipe = GuideGenPipeline.from_pretrained(ckpt_root, labels_only=True, clean_labels=False)
    clean_pipe = GuideGenPipeline.from_pretrained(ckpt_root, labels_only=True)
    raw, clean = raw_pipe(PROMPT, seed=5), clean_pipe(PROMPT, seed=5)
    assert raw.settings["label_cleanup_voxels"] is None and raw.settings["stray_tumor_voxels"] is None
    assert raw.settings["organ_part_voxels"] is None
    # same seed: same sampled map before cleanup; the prompt asks for one tumour
    expected, changed = clean_label_map(raw.labels, raw.affine, clean_pipe.label_set, raw.findings.to_dict()["tumors"])
    assert len(raw.findings.tumors) == 1
    np.testing.assert_array_equal(clean.labels, expected)
    assert clean.settings["label_cleanup_voxels"] == changed["isolated_voxels"] > 0  # a 2-step model leaves plenty of speckle
    assert clean.settings["stray_tumor_voxels"] == changed["stray_tumor_voxels"]
    assert clean.settings["organ_part_voxels"] == changed["organ_part_voxels"]
    assert isolated_voxels(clean.labels).sum() < isolated_voxels(raw.labels).sum()
    assert isolated_fraction(clean.labels) < isolated_fraction(raw.labels)


def test_batch_prompts_resume_and_labels_only(ckpt_root, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "liver mass 3 cm"}\n{"id": "b", "prompt": "55 yo woman, normal CT"}\n')
    out = tmp_path / "batch"
    res = run_cli("generate", "--prompts", prompts, "--n", 2, "--labels-only", "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 0, res.stderr
    reader = DatasetReader(out)
    assert reader.case_ids() == ["a_s0", "a_s1", "b_s0", "b_s1"]
    assert not (out / "ct").exists()
    before = {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in reader.case_ids()}
    (out / "meta" / "b_s1.json").unlink()  # as if killed before b_s1 was committed
    res = run_cli("generate", "--prompts", prompts, "--n", 2, "--labels-only", "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 0, res.stderr
    after = {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in DatasetReader(out).case_ids()}
    assert set(after) == set(before)
    assert all(after[c] == before[c] for c in ("a_s0", "a_s1", "b_s0"))  # finished samples were not redone
    lines = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    assert sorted(x["case"] for x in lines) == ["a_s0", "a_s1", "b_s0", "b_s1"]


def test_rerun_refuses_finished_samples_of_another_request(ckpt_root, tmp_path):
    """A re-run into the same --out skips its own finished samples and refuses ones made with
    other settings or an edited prompt (same ids, other content), naming the sample's meta."""
    from guidegen.errors import GuideGenError
    from guidegen.pipeline import run_generate_command

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "liver mass 3 cm"}\n')
    out = tmp_path / "o"

    def run(steps=2, guidance=None):
        return run_generate_command(prompt=None, out=out, prompts_file=prompts, n=1, seed=0, steps=steps, guidance=guidance,
                                    ct_steps=None, ct_guidance=None, checkpoint=ckpt_root, device="cpu",
                                    labels_only=True, labels_path=None, qc_retries=0)

    assert run() == ["a"]
    meta = json.loads((out / "meta" / "a.json").read_text())
    assert meta["request"]["tcss_steps"] == 2 and meta["request"]["prompt"] == "liver mass 3 cm"
    assert run() == []  # the same request: finished, skipped
    with pytest.raises(GuideGenError, match=r"a\.json: this sample was generated with other settings \(tcss_steps: 2 -> 3\)"):
        run(steps=3)
    # the checkpoint's default (4 steps, guidance 1.5 in the tiny config) spelled out or left
    # out is one request, also against a meta that spelled it out before requests were normalised
    second = tmp_path / "p2.jsonl"
    second.write_text('{"id": "d", "prompt": "liver mass 3 cm"}\n')
    prompts, kept = second, prompts
    assert run(steps=None) == ["d"]
    assert json.loads((out / "meta" / "d.json").read_text())["request"]["tcss_steps"] is None
    assert run(steps=4, guidance=1.5) == []
    spelled = json.loads((out / "meta" / "d.json").read_text())
    spelled["request"]["tcss_steps"] = 4
    (out / "meta" / "d.json").write_text(json.dumps(spelled))
    assert run(steps=None) == []
    with pytest.raises(GuideGenError, match=r"tcss_steps: the default \(4\) -> 3"):
        run(steps=3)
    prompts = kept
    prompts.write_text('{"id": "a", "prompt": "spleen mass 3 cm"}\n')
    with pytest.raises(GuideGenError, match="prompt: 'liver mass 3 cm' -> 'spleen mass 3 cm'"):
        run()
    # a sample written before requests were recorded is kept as it is
    del meta["request"]
    (out / "meta" / "a.json").write_text(json.dumps(meta))
    assert run() == []
    # every finished sample is checked before a new one is drawn: a new prompt above an edited
    # one writes nothing, and the dataset stays complete
    prompts.write_text('{"id": "new", "prompt": "liver mass 2 cm"}\n{"id": "a", "prompt": "liver mass 3 cm"}\n')
    meta["request"] = {"prompt": "kidney mass"}
    (out / "meta" / "a.json").write_text(json.dumps(meta))
    with pytest.raises(GuideGenError, match="prompt: 'kidney mass' -> 'liver mass 3 cm'"):
        run()
    assert DatasetReader(out).case_ids() == ["a", "d"] and json.loads((out / "dataset.json").read_text())["status"] == "complete"


def test_a_prompt_without_findings_is_warned_about(ckpt_root, tmp_path, capsys):
    from guidegen.pipeline import run_generate_command

    run_generate_command(prompt="55-jährige Frau, 3 cm Tumor im Pankreas", out=tmp_path / "o", prompts_file=None, n=1, seed=0,
                         steps=2, guidance=None, ct_steps=None, ct_guidance=None, checkpoint=ckpt_root, device="cpu",
                         labels_only=True, labels_path=None, qc_retries=0)
    err = capsys.readouterr().err
    assert "warning: no findings (sex, age, tumour, stage, phase) read from prompt gen_" in err and "English" in err


def test_resolve_device_gives_each_torchrun_rank_its_gpu(monkeypatch):
    import torch

    from guidegen.errors import GuideGenError
    from guidegen.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda")  # no torchrun: torch's current device
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # explicit: as given
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(GuideGenError, match="LOCAL_RANK 4: this node has only 4 CUDA device"):
        resolve_device("cuda")


def test_temperature_option_reaches_the_sampler_and_the_meta(ckpt_root, tmp_path):
    from guidegen.pipeline import GuideGenPipeline, run_generate_command

    default = GuideGenPipeline.from_pretrained(ckpt_root, labels_only=True).labels.temperature
    written = {}
    for name, temperature in (("default", None), ("hot", 3.0)):
        out = tmp_path / name
        (cid,) = run_generate_command(prompt=PROMPT, out=out, prompts_file=None, n=1, seed=4, steps=None, guidance=None,
                                      ct_steps=None, ct_guidance=None, checkpoint=ckpt_root, device="cpu",
                                      labels_only=True, labels_path=None, qc_retries=0, temperature=temperature)
        meta = json.loads((out / "meta" / f"{cid}.json").read_text())
        written[name] = (meta["settings"]["tcss_temperature"], load_nifti(DatasetReader(out).labels_path(cid))[0])
    assert written["default"][0] == default and written["hot"][0] == 3.0
    assert not np.array_equal(written["default"][1], written["hot"][1])  # same seed, another distribution


def test_upsampling_the_ct_reads_each_voxel_from_its_own_class():
    """On a finer map each voxel's HU is a mix of its own class's model-grid HU only (within
    that class's range), a one-class map gives plain trilinear resampling, and a class the model
    grid lost is read from the plain CT."""
    from guidegen.data.cache import resize_ct, resize_labels
    from guidegen.pipeline import upsample_ct_by_class

    rng = np.random.default_rng(0)
    small = rng.integers(0, 4, (6, 5, 7)).astype(np.uint8)
    ct_small = (small * 300.0 + rng.normal(0, 20, small.shape)).astype(np.float32)  # class levels 300 HU apart
    big = resize_labels(small, (17, 13, 19))
    big[0, 0, 0] = 9  # a class absent from the model grid
    up = upsample_ct_by_class(ct_small, small, big)
    plain = resize_ct(ct_small, big.shape)
    for c in range(4):
        lo, hi = ct_small[small == c].min(), ct_small[small == c].max()
        assert lo - 1e-3 <= up[big == c].min() and up[big == c].max() <= hi + 1e-3
    assert up[0, 0, 0] == pytest.approx(plain[0, 0, 0], abs=1e-3)
    assert (np.abs(plain - up) > 100).any()  # plain resampling mixes classes 300 HU apart at their borders
    one = np.zeros_like(small)
    np.testing.assert_allclose(upsample_ct_by_class(ct_small, one, np.zeros((17, 13, 19), np.uint8)), plain, atol=1e-3)


def test_mask_to_ct_on_the_users_grid(ckpt_root, tmp_path, label_set):
    from guidegen.data.phantom import render_phantom

    case = render_phantom(5, (24, 20, 28))
    aff = ras_affine((9.0, 11.0, 13.0), origin=(-100.0, 20.0, 5.0))
    path = tmp_path / "mine.nii.gz"
    save_nifti(path, case.labels, aff, np.uint8)
    out = tmp_path / "m2ct"
    res = run_cli("generate", "--labels", path, "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 0, res.stderr
    reader = DatasetReader(out)
    (cid,) = reader.case_ids()
    ct, ct_aff = load_nifti(reader.ct_path(cid))
    lab, _ = load_nifti(reader.labels_path(cid))
    assert ct.shape == (24, 20, 28) and np.array_equal(lab, case.labels)
    np.testing.assert_allclose(ct_aff, aff)
    meta = json.loads((out / "meta" / f"{cid}.json").read_text())
    assert meta["settings"]["resampled_from_grid"] and meta["qc"]["hu"]["grid"] == "model"  # calibration where it was generated


def test_mask_to_ct_keeps_an_lps_maps_axes_and_fills_beyond_the_torso(ckpt_root, tmp_path, label_set):
    """An LPS map comes back on its own axes and affine, with the CT of the same map given in
    RAS flipped the same way; body voxels beyond the organs' z-range are tissue, not air, and
    QC says so; a file name with a space gives a valid case id."""
    import nibabel as nib

    from guidegen.data.phantom import render_phantom

    case = render_phantom(5, (24, 20, 28))
    labels = np.concatenate([np.full((24, 20, 10), 0, np.uint8), case.labels], axis=2)
    labels[4:20, 4:16, :10] = label_set.body_id  # "legs": body only, below every organ
    aff = ras_affine((9.0, 11.0, 13.0), origin=(-100.0, 20.0, 5.0))
    to_lps = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("LPS"))
    lps = nib.Nifti1Image(labels, aff).as_reoriented(to_lps)
    ras_path, lps_path = tmp_path / "ras.nii.gz", tmp_path / "my case.nii.gz"
    save_nifti(ras_path, labels, aff, np.uint8)
    save_nifti(lps_path, np.asarray(lps.dataobj), lps.affine, np.uint8)
    cts = {}
    for name, path in (("ras", ras_path), ("lps", lps_path)):
        out = tmp_path / name
        res = run_cli("generate", "--labels", path, "--checkpoint", ckpt_root, "--out", out)
        assert res.returncode == 0, res.stderr
        reader = DatasetReader(out)
        (cid,) = reader.case_ids()
        cts[name] = load_nifti(reader.ct_path(cid), reorient_to_ras=False)
        lab, lab_aff = load_nifti(reader.labels_path(cid), reorient_to_ras=False)
        assert np.array_equal(lab, np.asarray(nib.load(path).dataobj)) and np.allclose(lab_aff, nib.load(path).affine)
        assert np.allclose(cts[name][1], lab_aff)
        meta = json.loads((out / "meta" / f"{cid}.json").read_text())
        assert meta["settings"]["labelled_outside_box"]["voxels"] > 0
        assert any("beyond the organs' z-range" in f for f in meta["qc"]["failures"])
        assert "warning: no prompt: the CT is conditioned on the label map alone" in res.stderr
        assert f"warning: {cid}: QC failed" in res.stderr and "Traceback" not in res.stderr
    assert cid == "my_case_seed0"
    assert np.array_equal(cts["lps"][0], cts["ras"][0][::-1, ::-1, :])  # the same CT, on the LPS axes
    legs = cts["ras"][0][:, :, :8][labels[:, :, :8] == label_set.body_id]
    assert legs.min() > -500  # tissue, not air


def test_a_new_tcss_checkpoint_leaves_mask_to_ct_samples_valid(tmp_path):
    """Mask -> CT samples do not depend on stage 1: another TCSS checkpoint (or temperature) does
    not make them another request; another LDM does, and for text -> pair samples so does TCSS."""
    from guidegen.errors import GuideGenError
    from guidegen.pipeline import check_finished_request

    (tmp_path / "meta").mkdir()
    models = {"tcss": {"weights": "a"}, "ldm": {"weights": "l"}, "autoencoder": {"weights": "e"}}
    stored = {"prompt": "", "seed": 0, "labels_file": "m.nii.gz", "labels_digest": "d", "tcss_temperature": 0.6, "models": models}
    (tmp_path / "meta" / "m_seed0.json").write_text(json.dumps({"request": stored}))
    new_tcss = {**stored, "tcss_temperature": 0.4, "models": {**models, "tcss": {"weights": "b"}}}
    check_finished_request(tmp_path, "m_seed0", new_tcss)  # accepted
    with pytest.raises(GuideGenError, match="models: other checkpoints"):
        check_finished_request(tmp_path, "m_seed0", {**stored, "models": {**models, "ldm": {"weights": "x"}}})
    text = {**stored, "labels_file": None, "labels_digest": None}
    (tmp_path / "meta" / "t.json").write_text(json.dumps({"request": text}))
    with pytest.raises(GuideGenError, match="models: other checkpoints"):
        check_finished_request(tmp_path, "t", {**text, "models": {**models, "tcss": {"weights": "b"}}})


def test_mask_to_ct_refuses_before_loading_models(ckpt_root, tmp_path, label_set):
    """An all-background map, an --out that holds something else, and another map under the same
    file name: one line each, nothing created or replaced."""
    from guidegen.data.phantom import render_phantom

    empty = tmp_path / "empty.nii.gz"
    save_nifti(empty, np.zeros((8, 8, 8), np.uint8), np.eye(4), np.uint8)
    res = run_cli("generate", "--labels", empty, "--checkpoint", ckpt_root, "--out", tmp_path / "e")
    assert res.returncode == 2 and "all background" in res.stderr and not (tmp_path / "e").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    seg = tmp_path / "a" / "segmentations.nii.gz"
    seg.parent.mkdir()
    save_nifti(seg, render_phantom(1, (24, 20, 28)).labels, ras_affine((9.0, 11.0, 13.0)), np.uint8)
    res = run_cli("generate", "--labels", seg, "--checkpoint", ckpt_root, "--out", busy)
    assert res.returncode == 2 and "holds no guidegen dataset (choose a new or empty directory)" in res.stderr
    assert "--overwrite" not in res.stderr and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    out = tmp_path / "o"
    assert run_cli("generate", "--labels", seg, "--checkpoint", ckpt_root, "--out", out).returncode == 0
    other = tmp_path / "b" / "segmentations.nii.gz"  # TotalSegmentator's name for every patient
    other.parent.mkdir()
    save_nifti(other, render_phantom(2, (24, 20, 28)).labels, ras_affine((9.0, 11.0, 13.0)), np.uint8)
    res = run_cli("generate", "--labels", other, "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 2 and "segmentations_seed0.json: this sample was generated with other settings (labels_digest" in res.stderr


def test_mask_to_ct_for_a_folder_of_maps_and_for_a_dataset(ckpt_root, tmp_path, label_set):
    """--labels DIR renders --n CTs per map (case ids <stem>_seed<S>), each on its map's own grid;
    a re-run skips them; a bad map among good ones is refused before anything is written; a
    guidegen dataset's maps are rendered with their own report text as the prompt."""
    from guidegen.data.phantom import render_phantom
    from guidegen.data.phantom_dataset import write_phantom_dataset

    maps = tmp_path / "maps"
    maps.mkdir()
    save_nifti(maps / "a.nii.gz", render_phantom(1, (24, 20, 28)).labels, ras_affine((9.0, 11.0, 13.0)), np.uint8)
    save_nifti(maps / "b.nii", render_phantom(2, (20, 20, 24)).labels, ras_affine((10.0, 10.0, 14.0)), np.uint8)
    (maps / "notes.txt").write_text("not a map")
    out = tmp_path / "o"
    res = run_cli("generate", "arterial phase", "--labels", maps, "--n", 2, "--seed", 3, "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 0, res.stderr
    reader = DatasetReader(out)
    assert reader.case_ids() == ["a_seed3", "a_seed4", "b_seed3", "b_seed4"] and reader.info["status"] == "complete"
    for case, shape in (("a_seed3", (24, 20, 28)), ("b_seed4", (20, 20, 24))):
        ct, _ = load_nifti(reader.ct_path(case))
        meta = json.loads((out / "meta" / f"{case}.json").read_text())
        assert ct.shape == shape and meta["request"]["prompt"] == "arterial phase" and meta["seed"] == int(case[-1])
    a3, a4 = (load_nifti(reader.ct_path(c))[0] for c in ("a_seed3", "a_seed4"))
    assert not np.array_equal(a3, a4)  # two seeds, two CTs of one map
    stamps = {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in reader.case_ids()}
    res = run_cli("generate", "arterial phase", "--labels", maps, "--n", 2, "--seed", 3, "--checkpoint", ckpt_root, "--out", out)
    assert res.returncode == 0 and "4 sample(s) already generated" in res.stdout
    assert stamps == {c: (out / "meta" / f"{c}.json").stat().st_mtime_ns for c in DatasetReader(out).case_ids()}

    save_nifti(maps / "c.nii.gz", np.full((8, 8, 8), 40, np.uint8), np.eye(4), np.uint8)
    res = run_cli("generate", "--labels", maps, "--checkpoint", ckpt_root, "--out", tmp_path / "o2")
    assert res.returncode == 2 and "c.nii.gz: label ids [40] are outside label set" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
    for inside in (maps, maps / "sub", tmp_path):  # the folder itself, below it, above it
        res = run_cli("generate", "--labels", maps, "--checkpoint", ckpt_root, "--out", inside)
        assert res.returncode == 2 and "the input --labels" in res.stderr and "choose an --out outside the inputs" in res.stderr
    assert not (maps / "sub").exists()
    (tmp_path / "none").mkdir()
    res = run_cli("generate", "--labels", tmp_path / "none", "--checkpoint", ckpt_root, "--out", tmp_path / "o3")
    assert res.returncode == 2 and "holds no label maps (.nii / .nii.gz files) and no guidegen dataset" in res.stderr

    ds = write_phantom_dataset(tmp_path / "ph", n=2, grid=(20, 20, 24), seed=7, previews=False, progress=False)
    res = run_cli("generate", "--labels", ds, "--checkpoint", ckpt_root, "--out", tmp_path / "o4")
    assert res.returncode == 0, res.stderr
    assert "warning: no prompt" not in res.stderr  # the dataset's reports are the prompts
    source = DatasetReader(ds)
    assert DatasetReader(tmp_path / "o4").case_ids() == [f"{c}_seed0" for c in source.case_ids()]
    for c in source.case_ids():
        meta = json.loads((tmp_path / "o4" / "meta" / f"{c}_seed0.json").read_text())
        assert meta["request"]["prompt"] == source.report(c)["text"] != ""


@pytest.mark.parametrize(
    "args,needle",
    [
        (["   "], "prompt is empty"),
        (["liver mass", "--device", "tpu"], "--device"),
        (["liver mass", "--checkpoint", "/nonexistent/ckpt"], "checkpoint directory not found"),
        (["liver mass", "--n", "0"], "--n"),
        (["liver mass", "--temperature", "0"], "--temperature must be a finite number > 0"),
        (["liver mass", "--seed", "-1"], "--seed must be >= 0"),
        (["liver mass", "--seed", str(2**62)], "--seed must be >= 0 and < 2**62"),
        (["liver mass", "--ct-steps", "0"], "--ct-steps must be an integer >= 1, got 0"),
        (["liver mass", "--steps", "-2"], "--steps must be an integer >= 1, got -2"),
        (["liver mass", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
        (["liver mass", "--ct-guidance", "inf"], "--ct-guidance must be a finite number >= 0, got inf"),
        (["liver mass", "--temperature", "inf"], "--temperature must be a finite number > 0"),
        ([], "PROMPT"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    out = tmp_path / "o"
    res = run_cli("generate", *args, "--out", out)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any((out / "meta").glob("*.json"))


@pytest.fixture(scope="module")
def tiny_pipe(ckpt_root):
    from guidegen.pipeline import GuideGenPipeline

    return GuideGenPipeline.from_pretrained(ckpt_root, device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "--steps must be an integer >= 1, got 0"),
    ({"steps": 2.5}, "--steps must be an integer >= 1, got 2.5"),
    ({"steps": 21}, "--steps must be at most the checkpoint's 20 diffusion timesteps, got 21"),
    ({"ct_steps": -1}, "--ct-steps must be an integer >= 1, got -1"),
    ({"ct_steps": 21}, "--ct-steps must be at most the checkpoint's 20 diffusion timesteps"),
    ({"seed": None}, "seed must be an integer in [0, 2**63), got None"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": 2**70}, "seed must be an integer in [0, 2**63)"),
    ({"guidance": float("nan")}, "--guidance must be a finite number >= 0, got nan"),
    ({"prompt": 123}, "the prompt must be a string, got int"),
    ({"labels": np.zeros((8, 8), np.uint8)}, "labels: label map must be 3D (X, Y, Z), got shape (8, 8)"),
    ({"labels": np.full((8, 8, 8), 99, np.uint8)}, "labels: label ids [99] are outside label set"),
    ({"labels": np.zeros((8, 8, 8), np.uint8)}, "labels: the label map is all background"),
    ({"labels": np.full((8, 8, 8), 0.5, np.float32)}, "labels: label map must hold integer class ids"),
    ({"labels": np.ones((8, 8, 8), np.uint8), "labels_affine": np.eye(3)}, "labels_affine: must be a finite, invertible 4 x 4 matrix"),
    ({"labels": np.ones((8, 8, 8), np.uint8), "labels_affine": np.zeros((4, 4))}, "labels_affine: must be a finite, invertible"),
    ({"labels": np.ones((8, 8, 8), bool)}, "labels: label map must hold integer class ids, got dtype bool"),
    ({"labels": np.ones((8, 8, 8), np.uint8), "steps": 5}, "steps, guidance: not used with labels"),
])
def test_the_python_api_checks_its_arguments(tiny_pipe, kwargs, message):
    """Every bad argument is one GuideGenError naming it, before any sampling."""
    from guidegen.errors import GuideGenError

    kwargs = {"prompt": "liver mass 3 cm", **kwargs}
    with pytest.raises(GuideGenError) as err:
        tiny_pipe.generate(kwargs.pop("prompt"), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_api_takes_a_float_label_array_as_ids_and_an_lps_map(tiny_pipe):
    from guidegen.data.phantom import render_phantom
    from guidegen.io import from_ras

    labels = render_phantom(3, GRID).labels.astype(np.float32)
    sample = tiny_pipe.generate(None, labels=labels, ct_steps=2, seed=np.int64(0))  # a numpy seed is an int
    assert sample.labels.dtype == np.uint8 and np.array_equal(sample.labels, labels.astype(np.uint8))
    assert sample.ct.shape == labels.shape and sample.ct.dtype == np.int16
    # an LPS copy is rendered on RAS axes (the same CT) and native_axes turns it back
    ras = ras_affine((8.0, 8.0, 8.0))
    lps_affine = ras @ np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:2, 3] = [8.0 * (GRID[0] - 1), 8.0 * (GRID[1] - 1)]
    a = tiny_pipe.generate(None, labels=labels, labels_affine=ras, ct_steps=2)
    b = tiny_pipe.generate(None, labels=labels[::-1, ::-1, :], labels_affine=lps_affine, ct_steps=2)
    np.testing.assert_allclose(b.affine, ras)
    assert np.array_equal(b.ct, a.ct) and np.array_equal(from_ras(b.ct, b.native_axes), a.ct[::-1, ::-1, :])


def test_generate_refuses_to_write_into_a_training_set(ckpt_root, tmp_path):
    """A phantom (or prepared) set is not generate's: synthetic cases would mix into it."""
    from guidegen.data.phantom_dataset import write_phantom_dataset

    ds = write_phantom_dataset(tmp_path / "ph", n=1, grid=(16, 16, 16), previews=False, progress=False)
    before = (ds / "dataset.json").read_text()
    res = run_cli("generate", "liver mass", "--labels-only", "--checkpoint", ckpt_root, "--out", ds)
    assert res.returncode == 2 and "holds a dataset written by guidegen procedural phantom, not by guidegen generate" in res.stderr
    assert (ds / "dataset.json").read_text() == before and DatasetReader(ds).case_ids() == ["phantom_000000"]


def test_bad_label_inputs(ckpt_root, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    save_nifti(bad, np.full((8, 8, 8), 40, np.uint8), np.eye(4), np.uint8)
    res = run_cli("generate", "--labels", bad, "--checkpoint", ckpt_root, "--out", tmp_path / "o1")
    assert res.returncode == 2 and "outside label set" in res.stderr and "Traceback" not in res.stderr
    assert "guidegen prepare" in res.stderr  # how to convert a map of another label set
    good = tmp_path / "good.nii.gz"
    save_nifti(good, np.zeros((8, 8, 8), np.uint8), np.eye(4), np.uint8)
    res = run_cli("generate", "--labels", good, "--steps", 5, "--n", 2, "--checkpoint", ckpt_root, "--out", tmp_path / "o3")
    assert res.returncode == 2 and "--steps: not used with --labels" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o3").exists()
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    res = run_cli("generate", "--labels", junk, "--checkpoint", ckpt_root, "--out", tmp_path / "o2")
    assert res.returncode == 2 and "junk.nii.gz" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o1" / "ct").exists() and not (tmp_path / "o2").exists()


def test_a_foreign_out_is_refused_before_the_models_load(tmp_path, monkeypatch):
    from guidegen.errors import GuideGenError
    from guidegen.pipeline import GuideGenPipeline, run_generate_command

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")

    def no_load(*args, **kwargs):
        raise AssertionError("models loaded before --out was checked")

    monkeypatch.setattr(GuideGenPipeline, "from_pretrained", no_load)
    with pytest.raises(GuideGenError, match=r"busy: directory holds no guidegen dataset \(choose a new or empty directory\)"):
        run_generate_command(prompt="liver mass 3 cm", out=busy, prompts_file=None, n=1, seed=0, steps=None, guidance=None,
                             ct_steps=None, ct_guidance=None, checkpoint=None, device="cpu", labels_only=True, labels_path=None,
                             qc_retries=0)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
