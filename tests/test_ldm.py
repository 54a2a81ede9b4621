"""Stage 3 (latent diffusion): latent UNet, latent cache, LDM training through `run_training`.

Tiny everything: phantom cases on a 16×16×24 training grid, an AE with random weights (×4,
4 latent channels → latents 4×4×6), a two-level latent UNet, the dependency-free text encoder.
"""

import json

import numpy as np
import pytest
import torch
import yaml

from guidegen.config import config_from_dict
from guidegen.errors import GuideGenError
from guidegen.models.autoencoder import AnatomyAwareAutoencoder
from guidegen.models.ldm_unet import LabelToLatent, LatentUNet
from guidegen.training.trainer import StageTask, Trainer, export_checkpoint

GRID = (16, 16, 24)
LATENT = (4, 4, 4, 6)

TINY = {
    "name": "tiny-ldm",
    "data": {"grid": list(GRID)},
    "text": {"encoder": "trainable", "trainable_dim": 16, "context_dim": 16, "num_queries": 4,
             "injection_layers": 1, "max_tokens": 16},
    "autoencoder": {"channels": [4, 4, 8], "label_embed_dim": 2},
    "ldm": {"timesteps": 100, "channels": [16, 32], "attention_levels": [False, True], "num_head_channels": 16,
            "label_encoder_channels": 4, "sample_steps": 4, "guidance": 2.0,
            "train": {"max_steps": 3, "log_every": 1, "sample_every": 1000, "checkpoint_every": 1000}},
}


def tiny_cfg(**ldm):
    raw = json.loads(json.dumps(TINY))
    raw["ldm"].update(ldm)
    return config_from_dict(raw)


class _Holder(StageTask):
    """Wraps a ready module so export_checkpoint can write it (no training)."""

    ema_modules = ()

    def __init__(self, module):
        self.module = module

    def modules(self):
        return {"model": self.module}

    def training_step(self, batch, step, ctx):  # pragma: no cover - never trained
        raise AssertionError


def export_random_ae(out, cfg, label_set, seed=0, scale=0.5):
    torch.manual_seed(seed)
    ae = AnatomyAwareAutoencoder.from_config(cfg.autoencoder, label_set.num_classes)
    ae.latent_scale.fill_(scale)
    trainer = Trainer(out.parent / f"{out.name}-run", cfg.autoencoder.train, _Holder(ae), [{"x": 0}], progress=False, cpu=True)
    trainer.modules["model"].latent_scale.fill_(scale)
    return export_checkpoint(trainer, out, "autoencoder", cfg)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, label_set):
    from guidegen.data.phantom_dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("ldm")
    data = write_phantom_dataset(root / "data", n=2, grid=(32, 32, 40), seed=3, previews=False, progress=False)
    cfg = tiny_cfg()
    ae_dir = export_random_ae(root / "ae", cfg, label_set)
    return {"root": root, "data": data, "ae": ae_dir, "cfg": cfg}


def perturb(module, seed=0, std=0.05):
    """MONAI zero-initialises output and attention projections; make every path matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


# ------------------------------------------------------------------------------ the network
def test_label_to_latent_fractions_are_exact(label_set):
    k, tumor = label_set.num_classes, label_set.tumor_id
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[0, 5, 1, 2] = tumor  # one voxel: vanishes under nearest ×4 downsampling
    enc = LabelToLatent(k, factor=4, encoder_channels=3, fractions=True)
    with torch.no_grad():
        out = enc(labels)
    assert out.shape == (1, k + 3, 2, 2, 2) and enc.out_channels == k + 3
    frac = out[:, :k]
    torch.testing.assert_close(frac.sum(1), torch.ones(1, 2, 2, 2))
    assert frac[0, tumor, 1, 0, 0].item() == pytest.approx(1 / 64)
    assert frac[0, tumor].sum().item() == pytest.approx(1 / 64)
    assert LabelToLatent(k, 4, encoder_channels=5, fractions=False)(labels).shape == (1, 5, 2, 2, 2)
    with pytest.raises(GuideGenError, match="label_fractions"):
        LabelToLatent(k, 4, encoder_channels=0, fractions=False)


def test_latent_unet_shapes_and_errors(label_set):
    net = LatentUNet(4, label_set.num_classes, 16, factor=4, channels=(16, 32), attention_levels=(False, True),
                     num_head_channels=16, label_encoder_channels=4)
    z = torch.randn(2, *LATENT)
    labels = torch.randint(0, label_set.num_classes, (2, *GRID))
    out = net(z, torch.tensor([3, 90]), labels, torch.randn(2, 5, 16))
    assert out.shape == z.shape
    assert torch.count_nonzero(out) == 0  # MONAI zero-inits the output conv: a fresh model predicts 0
    with pytest.raises(GuideGenError, match="label map shape"):
        net(z, torch.tensor([3, 90]), labels[:, :8], torch.randn(2, 5, 16))
    with pytest.raises(GuideGenError, match="divisible by 2"):
        net(torch.randn(2, 4, 4, 4, 5), torch.tensor([3, 90]), torch.zeros(2, 16, 16, 20, dtype=torch.long),
            torch.randn(2, 5, 16))
    with pytest.raises(GuideGenError, match="attention_levels"):
        LatentUNet(4, label_set.num_classes, 16, channels=(16, 32), attention_levels=(True,))


def test_label_map_changes_the_prediction(label_set):
    net = perturb(LatentUNet(4, label_set.num_classes, 16, channels=(16, 32), attention_levels=(False, True),
                             num_head_channels=16, label_encoder_channels=4)).eval()
    z, t, ctx = torch.randn(1, *LATENT), torch.tensor([50]), torch.randn(1, 4, 16)
    a = torch.zeros(1, *GRID, dtype=torch.long)
    b = a.clone()
    b[0, 4:8, 4:8, 4:8] = label_set.tumor_id
    with torch.no_grad():
        assert not torch.allclose(net(z, t, a, ctx), net(z, t, b, ctx))


# ------------------------------------------------------------------------------ latent cache
def test_latent_cache_written_once_and_reused(workspace, monkeypatch):
    from guidegen.data import latents as L

    ds = L.LatentDataset(workspace["data"], GRID, workspace["ae"], progress=False)
    assert ds.dir.parent.name == f"latents-{L.latent_space_sha256(workspace['ae'])[:16]}"
    assert sorted(p.name for p in ds.dir.glob("*.npz")) == sorted(f"{c}.npz" for c in ds.cases)
    item = ds[0]
    assert item["latent"].shape == LATENT and item["latent"].dtype == torch.float32
    assert item["labels"].shape == GRID and item["labels"].dtype == torch.int64
    assert isinstance(item["text"], str) and item["text"] and item["case"] == ds.cases[0]
    info = ds.info
    assert info["latent_scale"] == pytest.approx(0.5) and info["latent_shape"] == list(LATENT)

    # the cached latent is the AE's scaled posterior mode of the preprocessed case
    ae, ae_cfg, _ = L.load_autoencoder(workspace["ae"])
    src = ds.source[0]
    z = L.encode_case(ae, src["ct"][None], src["labels"][None], tuple(ae_cfg.autoencoder.hu_range))[0]
    torch.testing.assert_close(item["latent"], z, rtol=1e-5, atol=1e-5)
    assert torch.equal(item["labels"], src["labels"])

    def boom(*a, **k):
        raise AssertionError("the encoder must not run again")

    monkeypatch.setattr(L, "encode_case", boom)
    monkeypatch.setattr(L, "load_autoencoder", boom)
    again = L.LatentDataset(workspace["data"], GRID, workspace["ae"], progress=False)
    assert torch.equal(again[1]["latent"], ds[1]["latent"])


def test_other_autoencoder_gets_its_own_cache(workspace, label_set):
    from guidegen.data.latents import LatentDataset

    other = export_random_ae(workspace["root"] / "ae2", workspace["cfg"], label_set, seed=1)
    a = LatentDataset(workspace["data"], GRID, workspace["ae"], progress=False)
    b = LatentDataset(workspace["data"], GRID, other, progress=False)
    assert a.dir != b.dir
    assert not torch.allclose(a[0]["latent"], b[0]["latent"])


def test_missing_autoencoder_is_one_line_error(workspace, tmp_path):
    from guidegen.data.latents import LatentDataset
    from guidegen.training.ldm import resolve_autoencoder_checkpoint

    with pytest.raises(GuideGenError, match="model.safetensors"):
        LatentDataset(workspace["data"], GRID, tmp_path / "nope")
    with pytest.raises(GuideGenError, match="ldm.autoencoder_checkpoint"):
        resolve_autoencoder_checkpoint(tiny_cfg(autoencoder_checkpoint=str(tmp_path / "nope")))


def _cache_arrays(ds):
    out = {}
    for c in ds.cases:
        with np.load(ds.path(c)) as z:
            out[c] = {k: z[k].copy() for k in z.files}
    return out


def test_latent_cache_sharded_over_ranks_matches_single_process(workspace, tmp_path, monkeypatch, label_set):
    """Under torchrun each rank encodes the missing cases i with i % world == rank, then waits at a
    barrier; the result is the single-process cache, bit for bit (a stub barrier here: the rank
    then encodes the others' cases itself, as on a dataset directory the ranks do not share)."""
    import shutil

    from guidegen.data import latents as L
    from guidegen.data.phantom_dataset import write_phantom_dataset
    from guidegen.training import common as common_mod
    from guidegen.training import ldm as ldm_mod

    data = write_phantom_dataset(tmp_path / "data", n=3, grid=(32, 32, 40), seed=5, previews=False, progress=False)
    single = L.LatentDataset(data, GRID, workspace["ae"], progress=False)
    ref, ref_info = _cache_arrays(single), single.info
    assert len(single.cases) == 3

    for rank in (0, 1):
        shutil.rmtree(single.dir)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        seen = []

        def fake_barrier_factory():
            return lambda: seen.append(sorted(p.stem for p in single.dir.glob("*.npz")))

        monkeypatch.setattr(common_mod, "distributed_barrier", fake_barrier_factory)
        if rank == 0:
            ds = L.LatentDataset(data, GRID, workspace["ae"], build=False, progress=False)
            common_mod.build_cache_on_ranks(ds, progress=False)
        else:  # through the stage setup: the same sharding, on resolve_device("auto") (cpu here)
            cfg = tiny_cfg(autoencoder_checkpoint=str(workspace["ae"]))
            _, ds, _ = ldm_mod.ldm_setup(cfg, label_set, data)
        assert seen == [sorted(c for i, c in enumerate(single.cases) if i % 2 == rank)]
        got = _cache_arrays(ds)
        assert got.keys() == ref.keys()
        for c in ref:
            for k in ref[c]:
                assert np.array_equal(got[c][k], ref[c][k]), (rank, c, k)
        assert ds.info == ref_info


def test_single_process_cache_needs_no_process_group(workspace, monkeypatch):
    from guidegen.data import latents as L
    from guidegen.training import common as common_mod

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def boom():
        raise AssertionError("no barrier in a single process")

    monkeypatch.setattr(common_mod, "distributed_barrier", boom)
    ds = L.LatentDataset(workspace["data"], GRID, workspace["ae"], build=False, progress=False)
    common_mod.build_cache_on_ranks(ds, progress=False)
    assert ds.missing() == []


def test_fallback_and_interrupted_autoencoder_warn(workspace, tmp_path, monkeypatch, capsys, label_set):
    """No ldm.autoencoder_checkpoint: the shipped demo AE is used, with a warning (stderr and the
    run's train.log); an AE exported by an interrupted run is used with a warning too."""
    import shutil

    import guidegen.checkpoints
    from guidegen.training.ldm import ldm_setup

    shipped = tmp_path / "shipped"
    shutil.copytree(workspace["ae"], shipped / "demo" / "autoencoder")
    meta_path = shipped / "demo" / "autoencoder" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "interrupted": True}))
    monkeypatch.setattr(guidegen.checkpoints, "shipped_root", lambda: shipped)
    out = tmp_path / "run"
    capsys.readouterr()
    ldm_setup(tiny_cfg(), label_set, workspace["data"], out)
    text = capsys.readouterr().err
    assert "warning: ldm.autoencoder_checkpoint is not set" in text and "shipped:demo/autoencoder" in text
    assert "interrupted" in text
    log = (out / "train.log").read_text()
    assert "[warning] ldm.autoencoder_checkpoint is not set" in log and "interrupted: true" in log

    # an explicitly configured, complete AE: no warning
    ldm_setup(tiny_cfg(autoencoder_checkpoint=str(workspace["ae"])), label_set, workspace["data"])
    assert "warning:" not in capsys.readouterr().err


# ------------------------------------------------------------------------------ training + sampling
@pytest.fixture(scope="module")
def trained(workspace):
    from guidegen.training.run import run_training

    raw = json.loads(json.dumps(TINY))
    raw["ldm"]["autoencoder_checkpoint"] = str(workspace["ae"])
    cfg_path = workspace["root"] / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = workspace["root"] / "run"
    export = run_training("ldm", cfg_path, workspace["data"], out, max_steps=3, progress=False)
    return {"export": export, "out": out, "cfg_path": cfg_path}


def test_training_through_run_training_exports(trained, workspace):
    from guidegen.data.latents import checkpoint_sha256, latent_space_sha256

    export = trained["export"]
    assert sorted(p.name for p in export.iterdir()) == ["config.yaml", "meta.json", "model.safetensors"]
    meta = json.loads((export / "meta.json").read_text())
    assert meta["stage"] == "ldm" and meta["train_steps"] == 3
    assert meta["autoencoder_sha256"] == checkpoint_sha256(workspace["ae"])
    assert meta["autoencoder_latent_sha256"] == latent_space_sha256(workspace["ae"])
    assert meta["latent_scale"] == pytest.approx(0.5) and meta["latent_shape"] == list(LATENT)
    assert meta["prediction"] == "v_prediction" and meta["label_set"] == "guidegen22"
    logs = [json.loads(line) for line in (trained["out"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs][-1] == 3 and all(np.isfinite(r["loss"]) for r in logs)
    # the final sample hook decoded generated latents next to the real CT
    samples = sorted(p.name for p in (trained["out"] / "samples").glob("*.png"))
    assert "step0000003_case0_generated.png" in samples and "case0_real.png" in samples


def test_ldm_run_records_and_keeps_its_autoencoder(trained, workspace, tmp_path, label_set):
    """A run records the AE latent space it starts on; resuming after the AE was re-exported
    (same path, other latent space) is refused before any encoding."""
    import shutil

    from guidegen.data.latents import checkpoint_sha256, latent_space_sha256
    from guidegen.training.ldm import AUTOENCODER_RECORD
    from guidegen.training.run import run_training

    record = json.loads((trained["out"] / AUTOENCODER_RECORD).read_text())
    assert record["autoencoder_latent_sha256"] == latent_space_sha256(workspace["ae"])
    assert record["autoencoder_sha256"] == checkpoint_sha256(workspace["ae"])
    assert record["autoencoder_checkpoint"] == str(workspace["ae"])

    ae = tmp_path / "ae"
    shutil.copytree(workspace["ae"], ae)
    raw = json.loads(json.dumps(TINY))
    raw["ldm"]["autoencoder_checkpoint"] = str(ae)
    raw["ldm"]["train"]["sample_every"] = 1000
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    run_training("ldm", cfg_path, workspace["data"], out, max_steps=1, progress=False)
    run_training("ldm", cfg_path, workspace["data"], out, max_steps=2, progress=False)  # same AE: resumes

    old = latent_space_sha256(ae)
    shutil.rmtree(ae)
    export_random_ae(ae, workspace["cfg"], label_set, seed=7)
    new = latent_space_sha256(ae)
    assert new != old
    with pytest.raises(GuideGenError, match="re-exported since this run started") as err:
        run_training("ldm", cfg_path, workspace["data"], out, max_steps=3, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and old[:16] in msg and new[:16] in msg and str(ae) in msg
    assert not list((workspace["data"] / "cache").glob(f"latents-{new[:16]}"))  # refused before encoding
    assert json.loads((out / AUTOENCODER_RECORD).read_text())["autoencoder_latent_sha256"] == old


def _load_exported(trained, label_set):
    from guidegen.config import load_config
    from guidegen.text.knowledge import TextConditioner
    from guidegen.training.ldm import build_ldm_model
    from guidegen.training.trainer import load_model_weights

    cfg = load_config(trained["export"] / "config.yaml")
    cond = TextConditioner(cfg.text)
    model = build_ldm_model(cfg, label_set, cond.text_dim, latent_channels=4, factor=4)
    load_model_weights(model, trained["export"])
    return cfg, cond, perturb(model.eval())


def test_decoder_only_finetune_keeps_the_latent_space(trained, workspace, label_set):
    """autoencoder.freeze_encoder: the encoder side and latent scale stay bit-identical while the
    decoder trains, so the LDM trained on the parent's latents accepts the child (and still
    rejects an autoencoder with another encoder)."""
    from safetensors.torch import load_file

    from guidegen.data.latents import checkpoint_sha256, latent_space_sha256
    from guidegen.models.autoencoder import LATENT_SPACE_KEYS
    from guidegen.pipeline import CTGenerator
    from guidegen.training.run import run_training

    raw = json.loads(json.dumps(TINY))
    raw["autoencoder"].update(freeze_encoder=True, train={"max_steps": 2, "log_every": 1, "sample_every": 1000,
                                                          "checkpoint_every": 1000})
    cfg_path = workspace["root"] / "tiny_decoder_ft.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(GuideGenError, match="--init-from"):
        run_training("autoencoder", cfg_path, workspace["data"], workspace["root"] / "ft0", max_steps=1, progress=False)
    child = run_training("autoencoder", cfg_path, workspace["data"], workspace["root"] / "ft", max_steps=2,
                         progress=False, init_from=workspace["ae"])
    parent_w, child_w = load_file(str(workspace["ae"] / "model.safetensors")), load_file(str(child / "model.safetensors"))
    space = [k for k in parent_w if k.startswith(LATENT_SPACE_KEYS)]
    assert any(k.startswith("encoder.") for k in space) and "latent_scale" in space
    assert all(torch.equal(parent_w[k], child_w[k]) for k in space)
    assert any(not torch.equal(parent_w[k], child_w[k]) for k in parent_w if k.startswith("decoder."))
    assert checkpoint_sha256(child) != checkpoint_sha256(workspace["ae"])
    assert latent_space_sha256(child) == latent_space_sha256(workspace["ae"])
    meta = json.loads((child / "meta.json").read_text())
    assert meta["latent_scale_kept"] and meta["latent_scale"] == pytest.approx(0.5)
    assert meta["total_train_steps"] == 2  # the random parent was exported with 0 steps
    # resuming the decoder fine-tune needs no --init-from: its own checkpoint and lineage carry it
    resumed = run_training("autoencoder", cfg_path, workspace["data"], workspace["root"] / "ft", max_steps=3, progress=False)
    assert json.loads((resumed / "meta.json").read_text())["total_train_steps"] == 3
    CTGenerator(child, trained["export"], torch.device("cpu"), label_set)  # same latent space: accepted
    other = export_random_ae(workspace["root"] / "ae3", workspace["cfg"], label_set, seed=2)
    with pytest.raises(GuideGenError, match="latent space"):
        CTGenerator(other, trained["export"], torch.device("cpu"), label_set)


def test_zero_step_reexport_adds_texture_tables_that_generate_draws(trained, workspace, label_set):
    """``--max-steps 0 --init-from AE``: the weights stay bit-identical, the export measures the
    texture tables (autoencoder.texture_bins, split by depth: texture_depths) on --data, and the
    CT stage then draws them: seeded, and the drawn CT differs from the deterministic decoder's."""
    from safetensors.torch import load_file

    from guidegen.data.latents import LatentDataset
    from guidegen.pipeline import CTGenerator
    from guidegen.text.findings import Findings
    from guidegen.training.run import run_training

    raw = json.loads(json.dumps(TINY))
    raw["autoencoder"].update(freeze_encoder=True, texture_bins=2, texture_quantiles=8, texture_depths=2)
    cfg_path = workspace["root"] / "tiny_texture.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    child = run_training("autoencoder", cfg_path, workspace["data"], workspace["root"] / "tex", max_steps=0,
                         progress=False, init_from=workspace["ae"])
    parent_w, child_w = load_file(str(workspace["ae"] / "model.safetensors")), load_file(str(child / "model.safetensors"))
    assert set(child_w) - set(parent_w) == {"texture.edges", "texture.table", "texture.grain"}
    assert all(torch.equal(parent_w[k], child_w[k]) for k in parent_w)
    assert child_w["texture.grain"].shape == (3,)  # measured with the tables (texture_grain on by default)
    assert child_w["texture.table"].abs().sum() > 0 and child_w["texture.table"].shape == (2 * label_set.num_classes, 2, 8)
    meta = json.loads((child / "meta.json").read_text())
    assert meta["texture_cases"] == 2 and meta["train_steps"] == 0 and meta["latent_scale_kept"]
    assert meta["texture_grain"] == pytest.approx(child_w["texture.grain"].float().tolist(), abs=1e-3)
    assert meta["hu_reference_median"]["air"][1] < -500  # the real medians' ranges, for generate's QC

    gen = CTGenerator(child, trained["export"], torch.device("cpu"), label_set)
    assert gen.texture
    lab = LatentDataset(workspace["data"], GRID, workspace["ae"], progress=False)[0]["labels"].numpy()
    f = Findings()
    a, settings = gen(lab, "a torso", f, seed=3, steps=2)
    b, _ = gen(lab, "a torso", f, seed=3, steps=2)
    gen.texture = False
    smooth, smooth_settings = gen(lab, "a torso", f, seed=3, steps=2)
    assert settings["ct_texture"] and not smooth_settings["ct_texture"]
    assert np.array_equal(a, b) and not np.array_equal(a, smooth)

def test_ddim_sampling_deterministic_and_cfg1_is_conditional(trained, workspace, label_set):
    from guidegen.data.latents import LatentDataset
    from guidegen.diffusion import gaussian
    from guidegen.training.ldm import sample_latents

    cfg, conditioner, model = _load_exported(trained, label_set)
    ds = LatentDataset(workspace["data"], GRID, workspace["ae"], progress=False)
    labels = torch.stack([ds[0]["labels"], ds[1]["labels"]])
    cond = conditioner.prepare([ds[0]["text"], ds[1]["text"]])

    def run(seed, guidance):
        return sample_latents(model, cond, labels, LATENT, timesteps=cfg.ldm.timesteps, prediction=cfg.ldm.prediction,
                              steps=5, guidance=guidance, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0, 2.0), run(0, 2.0), run(1, 2.0)
    assert a.shape == (2, *LATENT) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, run(0, 1.0))  # guidance changes the sample

    # guided output at scale 1 is the conditional output; at scale g the extrapolation
    with torch.no_grad():
        ctx = model.context(cond["tokens"], cond["mask"], cond["findings_vec"])
        null = model.null_context(1)
        z, t = torch.randn(2, *LATENT), torch.tensor([40, 40])

        def net(zz, tt, cc):
            return model.net(zz, tt, labels.repeat(zz.shape[0] // 2, 1, 1, 1), cc)

        cond_out, uncond_out = net(z, t, ctx), net(z, t, null.expand(2, -1, -1))
        assert not torch.allclose(cond_out, uncond_out)
        torch.testing.assert_close(gaussian.guided(net, ctx, null, 1.0)(z, t), cond_out)
        torch.testing.assert_close(gaussian.guided(net, ctx, null, 2.0)(z, t), uncond_out + 2.0 * (cond_out - uncond_out),
                                   rtol=1e-4, atol=1e-5)


def test_layerwise_injection_trains_and_samples_with_guidance(workspace, label_set):
    """text.layerwise_injection: (B, levels, Q, C) contexts through training, export, load and CFG sampling."""
    from guidegen.training.ldm import sample_latents
    from guidegen.training.run import run_training

    raw = json.loads(json.dumps(TINY))
    raw["text"]["layerwise_injection"] = True
    raw["ldm"]["autoencoder_checkpoint"] = str(workspace["ae"])
    cfg_path = workspace["root"] / "tiny-layerwise.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    export = run_training("ldm", cfg_path, workspace["data"], workspace["root"] / "run-layerwise", max_steps=2,
                          progress=False)
    cfg, conditioner, model = _load_exported({"export": export}, label_set)
    assert model.injector.num_levels == len(cfg.ldm.channels) == 2
    cond = conditioner.prepare(["arterial phase, liver mass 3 cm"])
    assert model.context(cond["tokens"], cond["mask"], cond["findings_vec"]).shape == (1, 2, 4, 16)
    labels = torch.zeros(1, *GRID, dtype=torch.long)
    z = sample_latents(model, cond, labels, LATENT, timesteps=cfg.ldm.timesteps, prediction=cfg.ldm.prediction,
                       steps=3, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, *LATENT) and torch.isfinite(z).all()
