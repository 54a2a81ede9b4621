"""Gaussian diffusion in the autoencoder's latent space (stage 3), thin over MONAI's schedulers.

Forward process (DDPM): ``z_t = sqrt(ab_t)·z_0 + sqrt(1 − ab_t)·ε``, ``ε ~ N(0, I)``, with
``ab_t = Π_{s≤t}(1 − β_s)`` for t = 0..T−1 (MONAI's 0-based timestep index). The schedule is the
latent-diffusion one (METHOD §5): β linear in √β from 0.0015 to 0.0195 (MONAI's
``"scaled_linear_beta"``), T = 1000, so ``ab_{T-1} ≈ 1.4e-4`` (almost, not exactly, pure
noise; the sampler starts from N(0, I) at t = T−1 as LDM does).

The network predicts either ε (``"epsilon"``) or the velocity ``v = sqrt(ab)·ε − sqrt(1 − ab)·z_0``
(``"v_prediction"``); the loss is MSE to that target. Latents are the AE's *scaled* latents (about
unit variance), so the samplers never clip the predicted z_0 (MONAI clips to [-1, 1] by default,
which is right for images and wrong here).

Samplers (deterministic given ``generator``):
- DDIM, η = 0 by default: deterministic given the initial noise; ``steps`` evenly spaced
  timesteps starting at T−1 (``T−1, T−1−s, ...`` with stride ``s = T // steps``), so MONAI's
  "previous timestep" ``t − s`` is exactly the next timestep of the list, and the result is the
  last step's predicted z_0 (the DDIM step to ab = 1).
- DDPM: MONAI's ancestral step with the fixed-small posterior variance over all T steps.

Classifier-free guidance acts on the model output: ``uncond + g·(cond − uncond)``; g = 1 is the
plain conditional model (and costs one forward pass instead of two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import Tensor
from tqdm import tqdm

from guidegen.diffusion.categorical import classifier_free_guidance as _categorical_cfg
from guidegen.diffusion.categorical import guided_logits

if TYPE_CHECKING:
    from guidegen.config import LDMConfig

Prediction = Literal["epsilon", "v_prediction"]
SamplerKind = Literal["ddim", "ddpm"]
# (z_t (B, C, x, y, z), t (B,) long) -> model output (B, C, x, y, z): ε or v per the prediction type
DenoiseFn = Callable[[Tensor, Tensor], Tensor]

BETA_START, BETA_END = 0.0015, 0.0195  # the LDM "linear" schedule (linear in sqrt(beta))
SCHEDULE = "scaled_linear_beta"


def _schedule_kwargs(timesteps: int, prediction: Prediction) -> dict:
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction type {prediction!r}")
    return dict(num_train_timesteps=timesteps, schedule=SCHEDULE, beta_start=BETA_START, beta_end=BETA_END,
                prediction_type=prediction, clip_sample=False)


def make_scheduler(kind: SamplerKind, timesteps: int = 1000, prediction: Prediction = "epsilon"):
    """A MONAI ``DDPMScheduler`` or ``DDIMScheduler`` with the LDM schedule and no z_0 clipping."""
    if kind == "ddpm":
        return DDPMScheduler(**_schedule_kwargs(timesteps, prediction), variance_type="fixed_small")
    if kind == "ddim":
        return DDIMScheduler(**_schedule_kwargs(timesteps, prediction), set_alpha_to_one=True, steps_offset=0)
    raise ValueError(f"unknown sampler {kind!r}; choose ddim or ddpm")


def make_train_scheduler(cfg: LDMConfig) -> DDPMScheduler:
    """The training-time forward process for the ``ldm`` config section (T, prediction type)."""
    return make_scheduler("ddpm", cfg.timesteps, cfg.prediction)


def alphas_cumprod(scheduler) -> Tensor:
    """(T,) float32 ab_t of a MONAI scheduler (a copy on CPU)."""
    return scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()


def _bcast(v: Tensor, ndim: int) -> Tensor:
    return v.view(-1, *([1] * (ndim - 1)))


def add_noise(scheduler, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """``z_t = sqrt(ab_t)·z0 + sqrt(1 − ab_t)·noise`` for per-sample timesteps ``t`` (B,) long."""
    return scheduler.add_noise(z0, noise, t)


def training_target(scheduler, z0: Tensor, noise: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
    """What the network regresses: ``noise`` (ε) or ``v = sqrt(ab_t)·noise − sqrt(1 − ab_t)·z0``."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"unknown prediction type {prediction!r}")


def predict_x0(model_output: Tensor, zt: Tensor, t: Tensor, ab: Tensor, prediction: Prediction) -> Tensor:
    """z_0 implied by a model output at timesteps ``t`` (B,); ``ab`` (T,) the cumulative alphas."""
    a = _bcast(ab.to(zt.device, zt.dtype)[t], zt.ndim)
    if prediction == "epsilon":
        return (zt - (1 - a).sqrt() * model_output) / a.sqrt()
    return a.sqrt() * zt - (1 - a).sqrt() * model_output


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``uncond + scale·(cond − uncond)``: 0 → unconditional, 1 → conditional, > 1 → extrapolate."""
    return guided_logits(cond, uncond, scale)  # the same combination as on TCSS x0 logits


def guided(net: Callable[[Tensor, Tensor, Tensor], Tensor], context: Tensor, null_context: Tensor,
           scale: float) -> DenoiseFn:
    """Wrap ``net(z_t, t, context)`` into a guided ``denoise_fn(z_t, t)``.

    Same doubled-batch wrapper as the categorical process uses (conditional and null-context rows
    in one forward; ``scale == 1`` runs the conditional pass only).
    """
    return _categorical_cfg(net, context, null_context, scale)


def ddim_timesteps(timesteps: int, steps: int) -> Tensor:
    """(steps,) long, descending from T−1 with stride ``T // steps`` (MONAI's DDIM previous-step rule)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"DDIM steps must be in [1, {timesteps}], got {steps}")
    stride = timesteps // steps
    return torch.arange(timesteps - 1, -1, -stride, dtype=torch.long)[:steps]


@torch.no_grad()
def sample_latent(denoise_fn: DenoiseFn, shape: tuple[int, ...], *, sampler: SamplerKind = "ddim", steps: int = 50,
                  timesteps: int = 1000, prediction: Prediction = "epsilon", generator: torch.Generator | None = None,
                  eta: float = 0.0, noise: Tensor | None = None, device: torch.device | str | None = None,
                  progress: bool = False) -> Tensor:
    """Sample scaled latents ``(B, C, x, y, z)`` by reverse diffusion from N(0, I).

    Args:
        denoise_fn: ``(z_t, t (B,) long) -> ε or v`` (e.g. :func:`guided` around the network).
        shape: (B, C, x, y, z) of the latent.
        sampler: ``"ddim"`` (``steps`` steps, η = ``eta``) or ``"ddpm"`` (all ``timesteps`` steps;
            ``steps`` is ignored: MONAI's DDPM step is the one-step ancestral posterior).
        timesteps, prediction: those the network was trained with.
        generator: seeds the initial noise and (DDPM, or DDIM with η > 0) the per-step noise.
        noise: the initial z_{T−1} instead of drawing it (then only the per-step noise uses ``generator``).
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    z = noise.to(device)
    sched = make_scheduler(sampler, timesteps, prediction)
    if sampler == "ddim":
        sched.set_timesteps(steps)
        sched.timesteps = ddim_timesteps(timesteps, steps)  # see the module docstring
    else:
        sched.set_timesteps(timesteps)
    x0 = z
    for t in tqdm(sched.timesteps.tolist(), desc=f"{sampler} sampling", disable=not progress, leave=False):
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        out = denoise_fn(z, tt)
        if sampler == "ddim":
            z, x0 = sched.step(out, t, z, eta=eta, generator=generator)
        else:
            z, x0 = sched.step(out, t, z, generator=generator)
    # DDIM: the last step's z_0 prediction is the DDIM step to ab = 1 (equal to z when T % steps == 0)
    return x0 if sampler == "ddim" else z
