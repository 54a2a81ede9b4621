"""Stage 3 training: Gaussian latent diffusion on cached AE latents, conditioned on labels + text.

Loss step (METHOD §5, with CFG dropout added): z_0 from the latent cache, ε ~ N(0, I),
t ~ U{0..T−1}, z_t = sqrt(ab_t)·z_0 + sqrt(1−ab_t)·ε, the text condition of a row replaced by
the learned null context with probability ``text.cond_drop_prob`` (the label map is never
dropped), MSE between the network output and ε or v. The sample hook draws latents for one or
two training label maps (DDIM, guided), decodes them with the AE and writes previews next to
the real CT.

Cost at the demo grid (48×48×64 → latents 4×12×12×16, batch 1, default ``ldm`` section: UNet
(32, 64, 64), attention at the two lowest levels, 4.3 M parameters with knowledge injection):
about 0.5 CPU-seconds per optimizer step on one core of the development machine (measured on a
loaded machine: ~0.95 s wall per step with one torch thread; (64, 128, 128) costs ~1.0 CPU-s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from guidegen.config import GuideGenConfig
from guidegen.diffusion import gaussian
from guidegen.errors import GuideGenError
from guidegen.labels import LabelSet
from guidegen.models.ldm_unet import LatentDenoiser, LatentUNet
from guidegen.text.knowledge import TextConditioner, sample_drop_mask
from guidegen.training.common import batch_condition, launch_rank, warn_run
from guidegen.training.trainer import StageTask, StepContext

PREVIEW_CASES = 2
PREVIEW_MAX_STEPS = 25  # DDIM steps of the periodic training previews
AUTOENCODER_RECORD = "autoencoder.json"  # in an LDM run directory: the AE (latent space) the run started on


def build_ldm_model(cfg: GuideGenConfig, label_set: LabelSet, text_dim: int, latent_channels: int,
                    factor: int) -> LatentDenoiser:
    """Knowledge injection + latent UNet sized from the config, the label set and the AE."""
    from guidegen.text.knowledge import KnowledgeInjection

    injector = KnowledgeInjection.from_config(cfg.text, text_dim, len(cfg.ldm.channels))
    unet = LatentUNet.from_config(cfg.ldm, label_set.num_classes, cfg.text.context_dim, latent_channels, factor)
    return LatentDenoiser(injector, unet)


@torch.no_grad()
def sample_latents(model: LatentDenoiser, cond: dict, labels: torch.Tensor, latent_shape: tuple[int, ...], *,
                   timesteps: int, prediction: str, sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
                   generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Scaled latents ``(B, *latent_shape)`` for label maps ``labels`` (B, X, Y, Z) and prepared ``cond``.

    Classifier-free guidance on the text only: both passes see the same label map.
    """
    context = model.context(cond["tokens"], cond["mask"], cond["findings_vec"])

    def net(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        reps = z.shape[0] // labels.shape[0]  # 2 under CFG: conditional and null rows share the label map
        return model.net(z, t, labels.repeat(reps, 1, 1, 1), c)

    denoise = gaussian.guided(net, context, model.null_context(1), guidance)
    shape = (labels.shape[0], *latent_shape)
    return gaussian.sample_latent(denoise, shape, sampler=sampler, steps=steps, timesteps=timesteps,
                                  prediction=prediction, generator=generator, device=labels.device, progress=progress)


class LDMTask(StageTask):
    """MSE(ε or v) latent diffusion with text-condition dropout; previews decode with the frozen AE.

    Args:
        cfg: the full config (``ldm``, ``text`` sections).
        label_set: the label set.
        conditioner: text → tokens / findings vector (shared with TCSS).
        latent_shape: (C, x, y, z) of the cached latents.
        factor: the AE's downsampling factor.
        autoencoder: the frozen AE (only for previews; not trained, not saved).
        previews: up to a few items of the CT dataset (``labels`` (X,Y,Z), ``ct`` (1,X,Y,Z) HU,
            ``text``, ``findings_json``, ``case``) to sample for in :meth:`sample`.
        hu_range: the AE's HU normalisation range.
    """

    def __init__(self, cfg: GuideGenConfig, label_set: LabelSet, conditioner: TextConditioner,
                 latent_shape: tuple[int, ...], factor: int, autoencoder: nn.Module | None = None,
                 previews: list[dict] | None = None, hu_range: tuple[float, float] = (-1024.0, 2048.0),
                 ae_info: dict | None = None) -> None:
        self.cfg, self.label_set, self.conditioner = cfg, label_set, conditioner
        self.latent_shape, self.factor = tuple(latent_shape), factor
        self.autoencoder, self.previews, self.hu_range = autoencoder, list(previews or []), hu_range
        self.ae_info = dict(ae_info or {})
        self.scheduler = gaussian.make_train_scheduler(cfg.ldm)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": build_ldm_model(self.cfg, self.label_set, self.conditioner.text_dim,
                                         self.latent_shape[0], self.factor)}

    def training_step(self, batch: dict[str, Any], step: int, ctx: StepContext) -> Mapping[str, torch.Tensor]:
        z0, labels = batch["latent"], batch["labels"]  # (B, C, x, y, z) scaled latent; (B, X, Y, Z) long
        b = z0.shape[0]
        cond = batch_condition(self.conditioner, batch, ctx.device)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.cfg.ldm.timesteps, (b,), device=z0.device)
        zt = gaussian.add_noise(self.scheduler, z0, noise, t)
        target = gaussian.training_target(self.scheduler, z0, noise, t, self.cfg.ldm.prediction)
        drop = sample_drop_mask(b, self.cfg.text.cond_drop_prob, device=ctx.device)
        pred = ctx.modules["model"](zt, t, labels, cond["tokens"], cond["mask"], cond["findings_vec"], drop)
        loss = F.mse_loss(pred.float(), target)
        with torch.no_grad():  # how well z_0 itself is recovered (comparable across ε / v)
            x0 = gaussian.predict_x0(pred.float(), zt, t, self.scheduler.alphas_cumprod, self.cfg.ldm.prediction)
            x0_mse = F.mse_loss(x0, z0)
        return {"loss": loss, "x0_mse": x0_mse}

    def sample(self, modules: Mapping[str, nn.Module], step: int, out_dir: Path) -> None:
        if not self.previews or self.autoencoder is None:
            return
        from guidegen.models.autoencoder import norm_to_hu
        from guidegen.viz import save_case_preview

        model = modules["model"]
        device = next(model.parameters()).device
        items = self.previews
        labels = torch.stack([it["labels"] for it in items]).to(device)
        cond = batch_condition(self.conditioner, {"text": [it["text"] for it in items],
                                                  "findings_json": [it["findings_json"] for it in items]}, device)
        gen = torch.Generator(device=device).manual_seed(step)
        steps = min(PREVIEW_MAX_STEPS, self.cfg.ldm.sample_steps)
        z = sample_latents(model, cond, labels, self.latent_shape, timesteps=self.cfg.ldm.timesteps,
                           prediction=self.cfg.ldm.prediction, sampler="ddim", steps=steps,
                           guidance=self.cfg.ldm.guidance, generator=gen)
        ae = self.autoencoder.to(device)
        ct = norm_to_hu(ae.decode_latent(z, labels), self.hu_range)[:, 0].float().cpu().numpy()
        for i, it in enumerate(items):
            lab = it["labels"].numpy().astype("uint8")
            spacing = tuple(float(s) for s in it.get("spacing", torch.ones(3)).tolist())
            save_case_preview(out_dir / f"step{step:07d}_case{i}_generated.png", lab, ct[i], self.label_set,
                              title=f"step {step}: generated, {it['case']}", spacing=spacing)
            real = out_dir / f"case{i}_real.png"
            if not real.exists():  # the real CT does not change: write it once
                save_case_preview(real, lab, it["ct"][0].numpy(), self.label_set, title=f"real {it['case']}",
                                  spacing=spacing)

    def export_meta(self, trainer) -> dict:
        """What generation needs besides the weights: the AE it pairs with and the latent geometry."""
        return {**self.ae_info, "latent_shape": list(self.latent_shape), "latent_factor": self.factor,
                "prediction": self.cfg.ldm.prediction, "timesteps": self.cfg.ldm.timesteps,
                "schedule": {"kind": gaussian.SCHEDULE, "beta_start": gaussian.BETA_START, "beta_end": gaussian.BETA_END}}


def describe_checkpoint_path(path: Path) -> str:
    """How a checkpoint is named in meta files: ``shipped:<preset>/<stage>`` for the package's own
    (no machine path ends up in a shipped meta.json), else the path as configured."""
    from guidegen.checkpoints import shipped_root

    try:
        return f"shipped:{Path(path).resolve().relative_to(shipped_root().resolve()).as_posix()}"
    except ValueError:
        return str(path)


def resolve_autoencoder_checkpoint(cfg: GuideGenConfig) -> Path:
    """The AE checkpoint directory named by ``ldm.autoencoder_checkpoint``, else the shipped demo one."""
    if cfg.ldm.autoencoder_checkpoint:
        path = Path(cfg.ldm.autoencoder_checkpoint).expanduser()
        if not (path / "model.safetensors").is_file():
            raise GuideGenError(f"ldm.autoencoder_checkpoint: {path} is not an exported autoencoder checkpoint "
                                "(no model.safetensors); train one with 'guidegen train autoencoder'")
        return path
    from guidegen.checkpoints import shipped_root

    shipped_ae = shipped_root() / "demo" / "autoencoder"
    if (shipped_ae / "model.safetensors").is_file():
        return shipped_ae
    raise GuideGenError("ldm.autoencoder_checkpoint is not set and no shipped autoencoder checkpoint exists; "
                        "train one with 'guidegen train autoencoder' and set ldm.autoencoder_checkpoint to RUN/export")


def check_autoencoder_record(out: Path, ae_dir: Path, latent_sha256: str, ae_sha256: str) -> None:
    """Tie an LDM run to the latent space it started on (``out/autoencoder.json``).

    A new run (no training checkpoint in ``out``) records the AE; a resumed one must find the
    same latent digest, else it refuses: its weights were trained on the old AE's latents. A run
    started before this record existed records the AE it resumes with.
    """
    from guidegen.io import write_json_atomic
    from guidegen.training.trainer import find_checkpoint

    path = out / AUTOENCODER_RECORD
    if find_checkpoint(out) is not None and path.is_file():
        started = json.loads(path.read_text())
        old = started.get("autoencoder_latent_sha256")
        if old != latent_sha256:
            raise GuideGenError(f"{ae_dir}: this LDM run ({out}) started on autoencoder latent space {str(old)[:16]}, the "
                                f"export there now has {latent_sha256[:16]}: it was re-exported since this run started; "
                                "start a new --out or restore that export")
        return
    if launch_rank()[0] == 0:
        write_json_atomic(path, {"autoencoder_checkpoint": describe_checkpoint_path(ae_dir),
                                 "autoencoder_latent_sha256": latent_sha256, "autoencoder_sha256": ae_sha256})


def ldm_setup(cfg: GuideGenConfig, label_set: LabelSet, data: str | Path, out: str | Path | None = None,
              progress: bool = True):
    """``(task, dataset, meta)`` for ``guidegen train ldm``: encodes the latent cache if needed.

    ``out``: the run directory, whose record of the autoencoder a resumed run must match
    (:func:`check_autoencoder_record`); None skips the check.
    """
    from guidegen.data.latents import LatentDataset, load_autoencoder
    from guidegen.pipeline import resolve_device
    from guidegen.text.knowledge import TextConditioner
    from guidegen.training.common import build_cache_on_ranks, text_cache_dir
    from guidegen.training.run import data_geometry

    out = Path(out) if out is not None else None
    ae_dir = resolve_autoencoder_checkpoint(cfg)
    if not cfg.ldm.autoencoder_checkpoint:
        warn_run(f"ldm.autoencoder_checkpoint is not set: falling back to the shipped demo autoencoder "
                 f"{describe_checkpoint_path(ae_dir)} ({ae_dir}, trained on phantoms); with your own data set "
                 "ldm.autoencoder_checkpoint to your autoencoder's RUN/export", out)
    ae_meta_path = ae_dir / "meta.json"
    if ae_meta_path.is_file() and json.loads(ae_meta_path.read_text()).get("interrupted"):
        warn_run(f"{ae_dir}: this autoencoder export was written by an interrupted run (meta.json interrupted: true); "
                 "its latent space may change when that run is resumed and exported again", out)
    ae, ae_cfg, _ = load_autoencoder(ae_dir)
    if ae_cfg.data.label_set != label_set.name:
        raise GuideGenError(f"{ae_dir}: autoencoder was trained on label set {ae_cfg.data.label_set!r}, "
                            f"the config uses {label_set.name!r}")
    # encode on this process's accelerator (cuda:LOCAL_RANK under torchrun), sharded over the ranks
    dataset = LatentDataset(data, cfg.data.grid, ae_dir, build=False, device=resolve_device("auto"), progress=progress)
    if out is not None:  # before the (possibly long) encoding into a cache the run could not use
        check_autoencoder_record(out, ae_dir, dataset.latent_sha256, dataset.ae_sha256)
    build_cache_on_ranks(dataset, progress=progress)
    latent_shape = tuple(dataset[0]["latent"].shape)
    mean, std = dataset.latent_stats()
    previews = []
    for i in range(min(PREVIEW_CASES, len(dataset))):
        item = dataset.source[i]
        previews.append({k: item[k] for k in ("case", "labels", "ct", "text", "findings_json", "spacing")})
    conditioner = TextConditioner(cfg.text, cache_dir=text_cache_dir(data))
    ae_info = {"autoencoder_checkpoint": describe_checkpoint_path(ae_dir), "autoencoder_sha256": dataset.ae_sha256,
               "autoencoder_latent_sha256": dataset.latent_sha256,
               "latent_scale": float(ae.latent_scale), "latent_mean": round(mean, 4), "latent_std": round(std, 4),
               "latent_cache": str(dataset.dir.relative_to(dataset.reader.root)),
               "hu_range": list(ae_cfg.autoencoder.hu_range)}
    task = LDMTask(cfg, label_set, conditioner, latent_shape, ae.downsample_factor, autoencoder=ae, previews=previews,
                   hu_range=tuple(ae_cfg.autoencoder.hu_range), ae_info=ae_info)
    meta = {"label_set": label_set.name, "text_encoder": conditioner.encoder.encoder_id, **data_geometry(dataset)}
    return task, dataset, meta

