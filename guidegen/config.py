"""Typed configuration: one pydantic model per stage, loaded from YAML with readable errors.

``load_config("demo")`` loads the shipped preset ``guidegen/configs/demo.yaml``;
``load_config("my.yaml")`` a user's file. A YAML file only has to name what it changes: the
defaults below fill the rest. Every unknown key and every value of the wrong type is reported,
all on one line naming the file and each dotted key, an unknown key with the closest known one
(``my.yaml: 2 problems: tcss.train.lr: Input should be a valid number ...; unknown key
'tcss.sitegate' (did you mean 'tcss.site_gate'?)``); an unknown preset name lists the presets.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from guidegen.errors import GuideGenError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def unet_levels_problem(channels: tuple[int, ...], attention_levels: tuple[bool, ...], num_head_channels: int) -> str | None:
    """What is wrong with a diffusion UNet's level settings (None: nothing): one attention flag
    per level, and the head width dividing every attention level's channels and the last level's
    (its middle block always has attention). Keys are named relative to the section."""
    if len(channels) != len(attention_levels):
        return f"channels has {len(channels)} levels but attention_levels has {len(attention_levels)}"
    if any(a and c % num_head_channels for c, a in zip(channels, attention_levels)) or channels[-1] % num_head_channels:
        return (f"num_head_channels ({num_head_channels}) must divide the channels of every attention level and the "
                f"last level, got channels {list(channels)}")
    return None


class _DiffusionUNetSection(_Strict):
    """A stage whose denoiser is a diffusion UNet (``channels``, ``attention_levels``,
    ``num_head_channels`` in the subclass): its level settings are checked when the config loads."""

    @model_validator(mode="after")
    def _unet_levels(self):
        problem = unet_levels_problem(self.channels, self.attention_levels, self.num_head_channels)
        if problem:
            raise ValueError(problem)
        return self


class TrainConfig(_Strict):
    """Optimisation loop settings shared by the three trainers."""

    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(2000, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(250, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = Field(0, ge=0)  # numpy SeedSequence takes no negative entropy
    num_workers: int = Field(0, ge=0)


class DataConfig(_Strict):
    """Training grid and label set (shared by all stages)."""

    grid: tuple[int, int, int] = (48, 48, 64)  # (X, Y, Z) voxels, RAS; every axis divisible by 8
    label_set: str = "guidegen22"

    @field_validator("grid")
    @classmethod
    def _grid_divisible(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(n < 8 or n % 8 for n in v):
            raise ValueError(f"every grid axis must be a multiple of 8 and >= 8, got {list(v)}")
        return v


class TextConfig(_Strict):
    """Text encoder and knowledge-injection settings (DESIGN §5)."""

    encoder: Literal["minilm", "hf", "trainable"] = "minilm"
    hf_path: str | None = None  # local Hugging Face encoder directory when encoder == "hf"
    max_tokens: int = Field(64, ge=4)
    num_queries: int = Field(16, ge=1)  # learnable queries of the knowledge-injection module
    context_dim: int = Field(128, ge=8)  # width of the context tokens the UNets cross-attend to
    cond_drop_prob: float = Field(0.1, ge=0, le=1)  # classifier-free guidance training dropout
    # what the encoder reads: the canonical prompt from the parsed findings, the raw report, or
    # both (canonical first, then the raw text as a second segment; see guidegen.text.knowledge)
    encode_text: Literal["both", "canonical", "raw"] = "both"
    trainable_dim: int = Field(128, ge=8)  # token width of the 'trainable' fallback encoder
    injection_layers: int = Field(2, ge=1)  # transformer-decoder blocks in KnowledgeInjection
    # the paper's layer-wise responses: one context per UNet level instead of one for all
    # (guidegen.text.knowledge); off in the shipped demo checkpoints
    layerwise_injection: bool = False


class TCSSConfig(_DiffusionUNetSection):
    """Stage 1: categorical diffusion over label maps (DESIGN §6)."""

    timesteps: int = Field(1000, ge=2)
    schedule: Literal["cosine"] = "cosine"
    t_power: float = Field(1.5, ge=0)  # training t sampled with probability ∝ t^t_power
    # add log q(x_t | x_0) to the predicted x_0 logits (voxel-evidence skip, see
    # guidegen.models.tcss_unet); off = the paper's plain x_0 network
    input_evidence: bool = False
    aux_ce_weight: float = Field(0.0, ge=0)
    # extra loss weight per class name (e.g. {"tumor": 4.0}): tumours are a tiny fraction of
    # the voxels, so without it the denoiser under-learns exactly what the prompt asks for
    class_weights: dict[str, float] = {}
    # strength of the tumour-site gate on the x_0 logits (diffusion.categorical.site_gated_logits):
    # tumour outside every organ the findings name keeps ~p_tumour^(1+gate) of its odds; 0 = off
    site_gate: float = Field(0.0, ge=0)
    # sampling only: the gate also reads how deep a voxel lies in the requested organ at the
    # requested lesion's size, and lets the lesion bulge into the surrounding fat
    # (diffusion.categorical.lesion_depth); off = the voxel-scale gate alone
    site_gate_lesion_scale: bool = False
    # sampling only: shift the tumour x_0 logit so the predicted tumour volume equals the
    # report's sizes (diffusion.categorical.volume_matched_logits); 1 = exact, 0 = off
    size_guidance: float = Field(0.0, ge=0)
    # sampling only: the probability volume matching takes off the tumour goes to the requested
    # organ, not to the network's next belief (often bladder or fat inside a lesion), so a large
    # lesion no longer leaves its organ without tissue around it
    # (diffusion.categorical.host_refilled_logits). On in the demo and the shipped TCSS: on
    # tcss_eval's 50 prompts at 50 steps placement rose from 92 / 90 % to 98 / 96 % (raw / cleaned);
    # off here like the other findings constraints (0 = the paper's plain sampler).
    size_guidance_host_refill: bool = False
    # box width (voxels, odd) over which the tumour evidence is pooled before the volume is
    # matched, so the threshold cuts one compact lesion rather than a porous cloud
    size_guidance_pool: int = Field(3, ge=1)
    channels: tuple[int, ...] = (32, 64, 96, 128)
    attention_levels: tuple[bool, ...] = (False, False, True, True)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(32, ge=1)
    # p > 1: the denoiser folds p×p×p voxel blocks into channels and runs its UNet at 1/p
    # resolution (full-resolution 3D conv backward dominates the CPU step time)
    patch_size: int = Field(1, ge=1)
    sample_steps: int = Field(50, ge=1)
    # few-step sampling only, experimental: each jump overshoots by churn × its length and is
    # re-noised back (diffusion.categorical.sample_strided); 0 = off
    sample_churn: float = Field(0.0, ge=0)
    # few-step sampling only: this share of the visits lies evenly above sample_window_t, the
    # rest evenly below (diffusion.categorical.strided_timesteps): small early jumps, where the
    # organs' sizes are decided, keep their spread; 0 = an even grid
    sample_window_t: int = Field(0, ge=0)
    sample_window_share: float = Field(0.0, ge=0, lt=1)
    guidance: float = Field(1.5, ge=0)
    # sampling only: the predicted x_0 distribution is sharpened to p^(1/temperature) before
    # the findings' constraints and each step's posterior; < 1 trades diversity for organ
    # shapes closer to the data (an under-trained denoiser's diffuse x_0 beliefs otherwise
    # leave ragged, intermixed organ borders); 1 = the model's own distribution
    temperature: float = Field(1.0, gt=0)
    # sampling only: the temperature sharpens the network's prior alone and leaves the
    # voxel-evidence term log q(x_t | x_0) exact (training/tcss.py prior_tempered); false: it
    # divides both, which overweights the noisy observation by 1/temperature
    temper_prior_only: bool = False
    train: TrainConfig = TrainConfig()

    @field_validator("size_guidance_pool")
    @classmethod
    def _odd_pool(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"must be an odd number of voxels, got {v}")
        return v

    @model_validator(mode="after")
    def _window_inside_schedule(self) -> "TCSSConfig":
        if self.sample_window_t >= self.timesteps:
            raise ValueError(f"sample_window_t must be below timesteps ({self.timesteps}), got {self.sample_window_t}")
        return self


class AutoencoderConfig(_Strict):
    """Stage 2: anatomy-aware HDR KL autoencoder (DESIGN §6)."""

    hu_range: tuple[float, float] = (-1024.0, 2048.0)  # mapped linearly to [-1, 1]
    channels: tuple[int, ...] = (16, 32, 64)  # ×2 downsampling between levels → ×4 in all
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    label_embed_dim: int = Field(8, ge=1)
    inject_labels: bool = True  # label pyramid at every level; False = "w/o anatomy" ablation
    norm: Literal["channel", "group"] = "channel"  # per-voxel norm keeps tiled decoding exact
    # per-class 1×1 readout at the decoder's output (models.autoencoder.LabelReadout): borders as
    # sharp as the label map. Zero-initialised, so it can be added to a trained AE by --init-from
    # (with freeze_encoder the latent space, and so the LDM, stays valid).
    label_readout: bool = False
    # the readout also reads each voxel's depth inside its own structure, up to this many voxels
    # (models.autoencoder.LabelReadout, one more map per class and depth): layered structures (heart
    # chambers inside the myocardium, kidney medulla, vertebral marrow) get their layers from the
    # label map instead of blurred. Zero-initialised, decoder only: addable by a freeze_encoder
    # --init-from run, which keeps the latent space and the LDM. Off in the demo: 2000 decoder-only
    # steps at depth 5 left the heart medians of 20 reconstructions where they were (17 outside the
    # real range, +31 HU; the maps barely moved from zero), docs/measurements.md.
    label_depth: int = Field(0, ge=0, le=8)
    # Voxel texture (models.texture): per class, the decoded level cut into this many ranges, and
    # for each the residuals (target - decoded) of training reconstructions kept as
    # texture_quantiles quantiles; generate draws every voxel's residual from its table. The
    # latent cannot say whether a rib voxel is cortex or marrow, so a deterministic decoder keeps
    # either the ribs' mean or their median, never both. Measured at export (no training);
    # 0 = off (no tables, deterministic CT).
    texture_bins: int = Field(0, ge=0, le=64)
    texture_quantiles: int = Field(32, ge=2, le=256)
    # texture_depths > 1: separate tables by the voxel's depth inside its structure (0 = border,
    # ..., texture_depths - 1 and deeper). A border voxel's residual mixes the neighbouring
    # tissue, an interior one's does not (the heart's wall against its chambers).
    texture_depths: int = Field(1, ge=1, le=8)
    # Grain: draw the texture's probabilities from a Gaussian copula whose lag-1 correlation
    # along each axis is measured at export on the training residuals (models.texture), so
    # neighbouring voxels' residuals correlate as in real CT; false = independent (white) draws.
    texture_grain: bool = True
    p_random_window: float = Field(0.25, ge=0, le=1)  # share of fully random HU windows in the loss
    kl_weight: float = Field(1e-6, ge=0)
    window_weight: float = Field(1.0, ge=0)
    # average the random-window L1 per label class (like class_l1) instead of per voxel: a voxel
    # mean is mostly air and body, so the window term pulled against the small structures
    window_class_balanced: bool = False
    # share of the loss windows centred on the mean HU of a random present class, 100-500 HU
    # wide (training.ae_losses.class_window): the tumour-vs-host contrast gets a steep window
    class_window_prob: float = Field(0.0, ge=0, le=1)
    ssim_weight: float = Field(0.2, ge=0)
    full_range_weight: float = Field(1.0, ge=0)
    # full-range L1 averaged per label class, so small structures (tumour, ribs) weigh like organs
    class_l1_weight: float = Field(0.0, ge=0)
    # |mean recon - mean target| per label class (training.ae_losses.class_mean_l1): the voxel-wise
    # L1 terms pull a skewed class (ribs) to its median; this one keeps every structure's mean HU
    class_mean_weight: float = Field(0.0, ge=0)
    # 1-D Wasserstein distance between recon and target HU inside each label class
    # (training.ae_losses.class_distribution_l1): keeps two-tissue classes (rib cortex and
    # marrow) bimodal instead of blurred between the modes, so their medians stay right.
    # Off in the demo: a decoder-only fine-tune at 10 moved the tumour error 18.5 -> 17-18 HU and
    # the rib median halfway to the real one, but pushed the ribs' trimmed mean out of range
    # (docs/measurements.md, autoencoder rows)
    class_distribution_weight: float = Field(0.0, ge=0)
    # per-class weights inside the class-balanced L1, the class-mean and the distribution terms (class name → weight, others 1), e.g. {"tumor": 4.0}
    class_l1_weights: dict[str, float] = {}
    adv_weight: float = Field(0.05, ge=0)
    disc_start: int = Field(1000, ge=0)
    # Train on random crops of this size (voxels; multiples of 4) instead of the whole grid: the
    # network is convolutional with per-voxel norms, so crops teach the same mapping at a
    # fraction of the cost (the paper trains its AE on 128³ crops). None = whole volumes.
    train_crop: tuple[int, int, int] | None = None
    # Share of crops centred on a voxel of a class drawn uniformly among those present (background
    # and body excluded); the rest are uniform. Small structures then appear in crops often.
    focus_crop_prob: float = Field(0.0, ge=0, le=1)
    # Fine-tune the decoder only (needs --init-from): the encoder, the shared label embedding and
    # the latent scale stay bit-identical, so the latent space - and every latent generator
    # trained on it - stays valid (checked by the latent-space digest, guidegen.data.latents).
    freeze_encoder: bool = False
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _readout_reads_labels(self) -> AutoencoderConfig:
        if self.label_readout and not self.inject_labels:
            raise ValueError("label_readout needs inject_labels: true (the readout reads the label map)")
        if self.label_depth and not self.label_readout:
            raise ValueError("label_depth needs label_readout: true (the depth maps are part of the readout)")
        if self.texture_bins and not self.inject_labels:
            raise ValueError("texture_bins needs inject_labels: true (the texture tables are per class)")
        return self


class LDMConfig(_DiffusionUNetSection):
    """Stage 3: Gaussian latent diffusion conditioned on labels and text (DESIGN §6)."""

    timesteps: int = Field(1000, ge=2)
    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    sampler: Literal["ddim", "ddpm"] = "ddim"
    sample_steps: int = Field(50, ge=1)
    guidance: float = Field(1.5, ge=0)
    # CPU-demo size (latent 12×12×16 at the demo grid; ~0.5 CPU-s per step on one core, see
    # guidegen/training/ldm.py); the paper's LFG is 128 channels [1, 2, 4] with 2 res blocks
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = Field(1, ge=1)
    num_head_channels: int = Field(32, ge=1)
    # label map → latent grid: K class-fraction channels (exact, no parameters) and/or a small
    # trainable strided-conv encoder with this many output channels (see guidegen.models.ldm_unet)
    label_fractions: bool = True
    label_encoder_channels: int = Field(8, ge=0)
    # exported autoencoder checkpoint directory whose latents this stage learns; None: the
    # shipped guidegen/weights/demo/autoencoder
    autoencoder_checkpoint: str | None = None
    train: TrainConfig = TrainConfig()


class GuideGenConfig(_Strict):
    name: str = "custom"
    data: DataConfig = DataConfig()
    text: TextConfig = TextConfig()
    tcss: TCSSConfig = TCSSConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    ldm: LDMConfig = LDMConfig()


def preset_path(name: str) -> Path:
    """Path of a shipped preset (``demo``, ``torso-128``, ...)."""
    return Path(str(resources.files("guidegen") / "configs" / f"{name}.yaml"))


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted (``["demo", "torso-128", "torso-256"]``)."""
    return sorted(p.name.removesuffix(".yaml") for p in (resources.files("guidegen") / "configs").iterdir()
                  if p.name.endswith(".yaml"))


def _closest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``word`` (difflib, case-insensitive), or None when none is close."""
    lowered = {c.lower(): c for c in candidates}
    hit = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return lowered[hit[0]] if hit else None


def _known_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every dotted key path of ``model``, nested sections included."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + (name,))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _known_keys(field.annotation, prefix + (name,))
    return out


def _suggest_key(loc: tuple[str, ...]) -> str | None:
    """For an unknown key at ``loc``, the dotted path of the known key meant, or None.

    First the closest sibling (``tcss.sitegate`` -> ``tcss.site_gate``); failing that, the same
    name in another section, nearest first (``tcss.lr`` -> ``tcss.train.lr``).
    """
    model: type[BaseModel] = GuideGenConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    parent, key = tuple(str(p) for p in loc[:-1]), str(loc[-1])
    sibling = _closest(key, list(model.model_fields))
    if sibling is not None:
        return ".".join(parent + (sibling,))
    elsewhere = [k for k in _known_keys(GuideGenConfig) if k[-1].lower() == key.lower()]

    def shared(k: tuple[str, ...]) -> int:
        n = 0
        while n < min(len(k), len(parent)) and k[n] == parent[n]:
            n += 1
        return n

    return ".".join(max(elsewhere, key=shared)) if elsewhere else None


def _format_problem(err: dict) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        hint = _suggest_key(loc) if loc else None
        return f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = repr(value)
    if isinstance(value, dict) or f"got {shown}" in msg:  # a section-level check, or the message shows it
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"


def _format_validation_error(origin: str, exc: ValidationError) -> str:
    """One line with every problem, each named by its dotted key, joined by '; '."""
    problems = [_format_problem(err) for err in exc.errors()]
    count = f"{len(problems)} problems: " if len(problems) > 1 else ""
    return (f"{origin}: {count}" + "; ".join(problems)).replace("\n", " ")


def config_from_dict(raw: dict, origin: str = "config") -> GuideGenConfig:
    try:
        return GuideGenConfig.model_validate(raw)
    except ValidationError as exc:
        raise GuideGenError(_format_validation_error(origin, exc)) from None


def load_config(name_or_path: str | Path | None = None) -> GuideGenConfig:
    """Load a preset by name or a YAML file by path; ``None`` gives the ``demo`` preset."""
    source = str(name_or_path) if name_or_path is not None else "demo"
    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = preset_path(source)
        if not path.is_file():
            names = preset_names()
            hint = _closest(source, names)
            raise GuideGenError(f"unknown config preset {source!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                                + f"; available presets: {', '.join(names)}; or give a .yaml path")
    if not path.is_file():
        raise GuideGenError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GuideGenError(f"{path}: malformed YAML{where} ({getattr(exc, 'problem', None) or 'parse error'})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise GuideGenError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    return config_from_dict(raw, origin=path.name)


def dump_config(cfg: GuideGenConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
