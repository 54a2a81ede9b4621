"""`guidegen train` glue: run config check, --init-from, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

TINY = {
    "name": "tiny-train",
    "data": {"grid": [16, 16, 24]},
    "text": {"encoder": "trainable", "trainable_dim": 16, "context_dim": 16, "num_queries": 4, "injection_layers": 1, "max_tokens": 16},
    "tcss": {"timesteps": 20, "channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
             "train": {"max_steps": 2, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000}},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from guidegen.data.phantom_dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("train")
    data = write_phantom_dataset(root / "data", n=2, grid=(24, 24, 32), seed=1, previews=False, progress=False)
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    return root, data, cfg


def test_init_from_starts_a_new_run_from_exported_weights(setup, label_set):
    from safetensors.torch import load_file

    from guidegen.config import load_config
    from guidegen.training.run import _tcss_setup, init_from_checkpoint, run_training
    from guidegen.training.trainer import Trainer

    root, data, cfg_path = setup
    first = run_training("tcss", cfg_path, data, root / "a", progress=False)
    cfg = load_config(cfg_path)
    task, dataset, _ = _tcss_setup(cfg, label_set, data)
    trainer = Trainer(root / "b", cfg.tcss.train, task, dataset, progress=False)
    exported = load_file(str(first / "model.safetensors"))
    before = {k: v.clone() for k, v in trainer.modules["model"].state_dict().items()}
    init_from_checkpoint(trainer, first)
    after = trainer.modules["model"].state_dict()
    ema = trainer.ema["model"].module.state_dict()
    changed = [k for k in exported if exported[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert changed  # the fresh initialisation was replaced ...
    for k, v in exported.items():  # ... by the exported (fp16) weights, in the model and its EMA
        torch.testing.assert_close(after[k].float(), v.float(), atol=1e-3, rtol=0)
        torch.testing.assert_close(ema[k].float(), v.float(), atol=1e-3, rtol=0)


def test_continued_runs_record_their_lineage(setup):
    from guidegen.training.run import run_training

    root, data, cfg_path = setup
    first = run_training("tcss", cfg_path, data, root / "lin1", max_steps=2, progress=False)
    second = run_training("tcss", cfg_path, data, root / "lin2", max_steps=3, progress=False, init_from=first)
    third = run_training("tcss", cfg_path, data, root / "lin3", max_steps=1, progress=False, init_from=second)
    m1, m2, m3 = (json.loads((p / "meta.json").read_text()) for p in (first, second, third))
    assert "init_from" not in m1 and m1["train_steps"] == 2
    assert m2["train_steps"] == 3 and m2["init_from"]["train_steps"] == 2 and m2["total_train_steps"] == 5
    assert m3["train_steps"] == 1 and m3["init_from"]["train_steps"] == 5 and m3["total_train_steps"] == 6


def test_resumed_run_keeps_its_lineage(setup):
    """A run started with --init-from and resumed without it still exports its parent and total."""
    from guidegen.training.run import run_training

    root, data, cfg_path = setup
    parent = run_training("tcss", cfg_path, data, root / "res1", max_steps=2, progress=False)
    run_training("tcss", cfg_path, data, root / "res2", max_steps=1, progress=False, init_from=parent)
    resumed = run_training("tcss", cfg_path, data, root / "res2", max_steps=3, progress=False)
    meta = json.loads((resumed / "meta.json").read_text())
    assert meta["train_steps"] == 3 and meta["init_from"]["train_steps"] == 2 and meta["total_train_steps"] == 5
    scratch = run_training("tcss", cfg_path, data, root / "res3", max_steps=1, progress=False)
    again = run_training("tcss", cfg_path, data, root / "res3", max_steps=2, progress=False, init_from=parent)
    meta = json.loads((again / "meta.json").read_text())  # resumed from its own scratch weights: no parent
    assert meta["train_steps"] == 2 and "init_from" not in meta and scratch == again
    stale = root / "res4"  # an attempt from `parent` stopped before its first checkpoint, then a run from scratch
    stale.mkdir()
    (stale / "lineage.json").write_text(json.dumps({"train_steps": 2, "created": None}))
    meta = json.loads((run_training("tcss", cfg_path, data, stale, max_steps=1, progress=False) / "meta.json").read_text())
    assert "init_from" not in meta and not (stale / "lineage.json").exists()


def test_changed_config_on_resume_is_refused(setup):
    from guidegen.errors import GuideGenError
    from guidegen.training.run import run_training

    root, data, cfg = setup
    run_training("tcss", cfg, data, root / "d", max_steps=1, progress=False)
    other = root / "other.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["tcss"]["timesteps"] = 30
    raw["tcss"].setdefault("train", {})["lr"] = 1e-3
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(GuideGenError, match=r"different config \(tcss\.timesteps, tcss\.train\.lr changed; only train\.max_steps"):
        run_training("tcss", other, data, root / "d", max_steps=2, progress=False)
    # cadences do not touch the weights: a resume may change them
    cadence = yaml.safe_load(cfg.read_text())
    cadence["tcss"].setdefault("train", {}).update(log_every=7, checkpoint_every=5, sample_every=9)
    other.write_text(yaml.safe_dump(cadence))
    meta = json.loads((run_training("tcss", other, data, root / "d", max_steps=2, progress=False) / "meta.json").read_text())
    assert meta["train_steps"] == 2


@pytest.mark.parametrize("stage", ["tcss", "autoencoder"])
def test_missing_data_is_one_line(tmp_path, stage):
    res = subprocess.run([sys.executable, "-m", "guidegen", "train", stage, "--data", tmp_path / "nope", "--out", tmp_path / "run"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "dataset directory not found" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("steps,message", [("0", "--max-steps 0 re-exports the checkpoint given by --init-from"),
                                           ("-1", "--max-steps must be at least 0")])
def test_zero_steps_needs_init_from_and_negative_steps_are_refused(setup, steps, message):
    root, data, cfg = setup
    res = subprocess.run([sys.executable, "-m", "guidegen", "train", "autoencoder", "--data", data, "--out", root / "zero",
                          "--config", cfg, "--max-steps", steps], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (root / "zero").exists()


def test_autoencoder_trains_on_crops_and_samples_whole_volumes(setup):
    """Crops for the loss, whole volumes for the sample montage (they once disagreed)."""
    from guidegen.training.run import run_training

    root, data, cfg_path = setup
    raw = yaml.safe_load(cfg_path.read_text())
    raw["autoencoder"] = {"channels": [4, 4, 8], "label_embed_dim": 2, "train_crop": [8, 8, 8], "disc_start": 1,
                          "train": {"max_steps": 2, "log_every": 1, "sample_every": 1, "checkpoint_every": 1}}
    cfg = root / "ae_crop.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    export = run_training("autoencoder", cfg, data, root / "ae", progress=False)
    assert (export / "model.safetensors").is_file()
    assert sorted(p.name for p in (root / "ae" / "samples").glob("*.png"))


def test_tcss_trains_with_the_site_gate_and_condition_dropout(setup):
    # The site gate in training leaves dropped rows alone; with dropped and kept rows in one
    # batch its backward pass was NaN (the trainer now skips such steps and notes them).
    import math

    from guidegen.training.run import run_training

    root, data, _ = setup
    raw = json.loads(json.dumps(TINY))
    raw["text"]["cond_drop_prob"] = 0.5
    raw["tcss"]["site_gate"] = 1.0
    raw["tcss"]["train"].update(batch_size=2, max_steps=4, seed=3)
    cfg = root / "gated.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run_training("tcss", cfg, data, root / "gated", progress=False)
    log = (root / "gated" / "train.log").read_text()
    assert "non-finite" not in log
    rows = [json.loads(line) for line in (root / "gated" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)


def test_tcss_sample_previews_ask_for_the_prompts_tumours_as_generate_does(setup, label_set, monkeypatch, tmp_path):
    """The training preview samples with the prompts' sides, volumes and lesion boxes on the
    training grid's spacing, and the config's lesion-scale gate (it once passed sites only)."""
    import guidegen.training.tcss as tcss_mod
    from guidegen.config import load_config
    from guidegen.training.run import _tcss_setup

    root, data, cfg_path = setup
    cfg = load_config(cfg_path)
    cfg.tcss.site_gate_lesion_scale = True
    task, _, meta = _tcss_setup(cfg, label_set, data)
    seen = {}

    def fake_sampler(model, cond, grid, alphas_bar, ls, **kw):
        seen.update(kw)
        return torch.zeros(len(tcss_mod.SAMPLE_PROMPTS), *grid, dtype=torch.long)

    monkeypatch.setattr(tcss_mod, "sample_label_maps", fake_sampler)
    task.sample({"model": task.modules()["model"]}, 7, tmp_path)
    req = seen["requests"]
    voxel_mm3 = float(torch.tensor(meta["spacing_mm"]).prod())
    want = torch.tensor([tcss_mod.sphere_volume_mm3(40.0), tcss_mod.sphere_volume_mm3(30.0)]) / voxel_mm3
    torch.testing.assert_close(req.volume_voxels, want.float())
    kidney = label_set.id_of("kidney")
    assert req.sites[1, kidney].tolist() == [True, False]  # the left kidney only
    assert req.lesion_boxes[0, label_set.id_of("liver")].tolist() == tcss_mod.lesion_box(40.0, meta["spacing_mm"])
    assert seen["site_gate_lesion_scale"] is True
    assert len(list(tmp_path.glob("step0000007_prompt*.png"))) == 2


@pytest.mark.parametrize("stop_signal, code", [("SIGTERM", 143), ("SIGINT", 130), (None, 0)])
def test_an_interrupted_run_exits_non_zero(tmp_path, monkeypatch, capsys, stop_signal, code):
    """A chain (`train autoencoder && train ldm`) or a preemption script must tell a stopped run
    from a finished one: 128 + the signal, and a line saying how to resume."""
    import guidegen.training.run as run_module
    from helpers_cli import run_cli_inprocess

    def fake_run_training(stage, config, data, out, **_):
        export = out / "export"
        export.mkdir(parents=True)
        (export / "meta.json").write_text(json.dumps({"train_steps": 7, "interrupted": stop_signal is not None, "stop_signal": stop_signal}))
        return export

    monkeypatch.setattr(run_module, "run_training", fake_run_training)
    got, out, err = run_cli_inprocess(monkeypatch, capsys, "train", "tcss", "--data", tmp_path, "--out", tmp_path / "run")
    assert got == code
    if stop_signal:
        assert "interrupted after step 7" in err and "re-run the same command to resume" in err and "inference checkpoint" not in out
    else:
        assert "inference checkpoint:" in out


def test_resume_on_other_or_incomplete_data_is_warned_and_exports_record_their_data(setup, capsys):
    import shutil

    from guidegen.training.run import run_training

    root, data, cfg = setup
    run = root / "data_run"
    meta = json.loads((run_training("tcss", cfg, data, run, max_steps=1, progress=False) / "meta.json").read_text())
    assert meta["data"]["cases"] == 2 and meta["data"]["name"] == data.name and len(meta["data"]["digest"]) == 16
    assert "[warning]" not in (run / "train.log").read_text()
    other = root / "data_other"
    shutil.copytree(data, other)
    first = sorted((other / "meta").glob("*.json"))[0]
    first.unlink()  # one case fewer, and the set marked as an interrupted write
    info = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**info, "status": "incomplete"}))
    capsys.readouterr()
    meta = json.loads((run_training("tcss", cfg, other, run, max_steps=2, progress=False) / "meta.json").read_text())
    log = (run / "train.log").read_text()
    assert "not the dataset this run started on (data, 2 cases; now data_other, 1 cases)" in log
    assert "dataset.json says status 'incomplete'" in log and "training on its 1 complete case(s)" in log
    assert "warning: --data" in capsys.readouterr().err
    assert meta["data"]["cases"] == 1 and meta["train_steps"] == 2
