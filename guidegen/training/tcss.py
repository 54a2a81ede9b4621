"""Stage 1 training: the TCSS categorical diffusion loss step and periodic label-map samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from guidegen.config import GuideGenConfig
from guidegen.diffusion import categorical as cat
from guidegen.errors import GuideGenError
from guidegen.evaluation.metrics import sphere_volume_mm3
from guidegen.labels import LabelSet
from guidegen.models.conditioned import ConditionedDenoiser
from guidegen.models.tcss_unet import TCSSUNet, voxel_evidence
from guidegen.text.findings import Findings, parse_findings
from guidegen.text.knowledge import TextConditioner, sample_drop_mask
from guidegen.training.common import batch_condition, class_weight_vector
from guidegen.training.trainer import StageTask, StepContext

SAMPLE_PROMPTS = (
    "65-year-old man, 4 cm mass in the liver, portal venous phase.",
    "48-year-old woman, 3 cm tumour in the left kidney, arterial phase.",
)


def build_tcss_model(cfg: GuideGenConfig, label_set: LabelSet, text_dim: int) -> ConditionedDenoiser:
    """Knowledge injection + TCSS UNet sized from the config and the label set."""
    from guidegen.text.knowledge import KnowledgeInjection

    injector = KnowledgeInjection.from_config(cfg.text, text_dim, len(cfg.tcss.channels))
    unet = TCSSUNet.from_config(cfg.tcss, label_set.num_classes, cfg.text.context_dim)
    return ConditionedDenoiser(injector, unet)


def tumor_site_classes(findings_vec: torch.Tensor, label_set: LabelSet) -> torch.Tensor:
    """(B, K) bool: the label classes the findings put a tumour in, read from the findings vector.

    ``findings_vec`` (B, FINDINGS_DIM) holds one ``site_counts`` entry per organ group of
    :data:`~guidegen.text.findings.ORGAN_SITES`; sites are matched to the label set by name, so a
    custom label set without some group simply never gates on it. All False for a row without a
    tumour site (including the zeroed vector of the no-knowledge ablation).
    """
    from guidegen.text.findings import ORGAN_SITES
    from guidegen.text.prompts import findings_slices

    counts = findings_vec[:, findings_slices()["site_counts"]] > 0  # (B, len(ORGAN_SITES))
    out = torch.zeros(findings_vec.shape[0], label_set.num_classes, dtype=torch.bool, device=findings_vec.device)
    for j, site in enumerate(ORGAN_SITES):
        if site in label_set.names:
            out[:, label_set.id_of(site)] = counts[:, j]
    return out


# Sites whose lesions stay inside the organ: a lung mass replaces parenchyma, it does not grow
# into the chest wall's fat (the phantom's rule too, guidegen.data.phantom._tumor); every other
# site's mass may bulge into the fat around its organ (the body envelope class).
CONFINED_SITES = frozenset({"lung"})


def lesion_box(size_mm: float, spacing_mm: tuple[float, ...]) -> list[int]:
    """Odd box widths (voxels per axis) closest to a lesion of ``size_mm`` diameter, an even
    number of voxels rounding up: 50 mm on 7.5 mm voxels is 7 (6.7 voxels), 20 mm is 3, 40 mm on
    2 mm voxels 21, anything under 2 voxels 1."""
    return [2 * math.floor(size_mm / s / 2) + 1 for s in spacing_mm]


@dataclass
class TumorRequests:
    """What a batch's findings ask of the tumour channel, in the form the sampling constraints take.

    ``sites`` (B, K, 2) bool: per label class, [left side allowed, right side allowed] for a
    requested tumour (both for an unpaired organ or a tumour without side; all False for a case
    without a tumour site). ``volume_voxels`` (B,) float: the requested total tumour volume in
    voxels (equivalent spheres of the stated sizes), 0 when any requested size is unknown.
    ``lesion_boxes`` (B, K, 3) long: per requested class the largest requested lesion's
    diameter as an odd box width in voxels per axis (:func:`lesion_box`; 1 when its size is
    unknown), 0 for the other classes. ``bulge_classes`` (B, K) bool: the body envelope, in rows
    with a tumour site outside :data:`CONFINED_SITES`. The last two feed the lesion-scale site
    gate (:func:`~guidegen.diffusion.categorical.site_gated_logits`); both are empty when the
    requests come from the findings vector (no sizes per site there).
    """

    sites: torch.Tensor
    volume_voxels: torch.Tensor
    lesion_boxes: torch.Tensor | None = None
    bulge_classes: torch.Tensor | None = None

    @classmethod
    def from_vector(cls, findings_vec: torch.Tensor, label_set: LabelSet) -> "TumorRequests":
        """Sites (both sides) from the findings vector; no volume (the vector holds only the largest size)."""
        sites = tumor_site_classes(findings_vec, label_set)
        return cls(sites.unsqueeze(-1).expand(*sites.shape, 2).clone(), torch.zeros(sites.shape[0], device=sites.device))

    @classmethod
    def from_findings(cls, findings: list[Findings], label_set: LabelSet, spacing_mm: tuple[float, float, float]) -> "TumorRequests":
        """Sites with sides, the requested volume and the lesion boxes from parsed findings on a
        grid of ``spacing_mm`` (X, Y, Z) voxels."""
        voxel_mm3 = float(spacing_mm[0] * spacing_mm[1] * spacing_mm[2])
        sites = torch.zeros(len(findings), label_set.num_classes, 2, dtype=torch.bool)
        volume = torch.zeros(len(findings))
        boxes = torch.zeros(len(findings), label_set.num_classes, 3, dtype=torch.long)
        bulge = torch.zeros(len(findings), label_set.num_classes, dtype=torch.bool)
        for b, f in enumerate(findings):
            for t in f.tumors:
                if t.site in label_set.names:
                    k = label_set.id_of(t.site)
                    sides = {"left": [0], "right": [1]}.get(t.side or "", [0, 1])
                    sites[b, k, sides] = True
                    box = torch.tensor(lesion_box(t.size_mm, spacing_mm) if t.size_mm else [1, 1, 1])
                    boxes[b, k] = torch.maximum(boxes[b, k], box)
                    if t.site not in CONFINED_SITES and label_set.body_id is not None:
                        bulge[b, label_set.body_id] = True
            sizes = [t.size_mm for t in f.tumors]
            if sizes and all(d is not None for d in sizes):
                volume[b] = sum(sphere_volume_mm3(d) for d in sizes) / voxel_mm3
        return cls(sites, volume, boxes, bulge)

    def to(self, device) -> "TumorRequests":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TumorRequests(self.sites.to(device), self.volume_voxels.to(device), move(self.lesion_boxes), move(self.bulge_classes))


def tumor_guidance_fn(requests: TumorRequests, label_set: LabelSet, site_gate: float, size_guidance: float = 0.0,
                      drop: torch.Tensor | None = None, pool: int = 1, lesion_scale: bool = False,
                      host_refill: bool = False):
    """``logits -> logits`` applying the findings' tumour constraints, or None when all are off.

    Site gate (:func:`~guidegen.diffusion.categorical.site_gated_logits`, strength ``site_gate``;
    at the requested lesions' scale with ``lesion_scale`` and requests that carry lesion boxes),
    then volume matching (:func:`~guidegen.diffusion.categorical.volume_matched_logits`, strength
    ``size_guidance``, tumour evidence pooled over ``pool`` voxels; sampling only: training
    leaves it at 0), with ``host_refill`` the probability it takes off the tumour going to the
    requested organs (:func:`~guidegen.diffusion.categorical.host_refilled_logits`).
    Rows in ``drop`` (B,) bool are left alone.
    """
    tid = label_set.tumor_id
    if tid is None or (site_gate == 0 and size_guidance == 0):
        return None
    sites, volume = requests.sites, requests.volume_voxels
    boxes = requests.lesion_boxes if lesion_scale else None
    bulge = requests.bulge_classes if boxes is not None else None
    if drop is not None:
        keep = ~drop.to(sites.device)
        sites, volume = sites & keep.view(-1, 1, 1), volume * keep
        boxes = None if boxes is None else boxes * keep.view(-1, 1, 1)
    midline = label_set.id_of("vertebrae") if "vertebrae" in label_set.names else None
    if midline is None:  # no spine to tell the sides by
        sites = sites.any(-1)

    def constrain(logits: torch.Tensor) -> torch.Tensor:
        logits = cat.site_gated_logits(logits, sites, tid, site_gate, midline_class=midline,
                                       lesion_boxes=boxes, bulge_classes=bulge)
        matched = cat.volume_matched_logits(logits, volume, tid, size_guidance, pool=pool)
        if host_refill and size_guidance > 0:
            hosts = sites.any(-1) if sites.dim() == 3 else sites
            return cat.host_refilled_logits(logits, matched, hosts, tid).to(logits.dtype)
        return matched

    return constrain


def _tempered(then, temperature: float):
    """``logits -> then(logits / temperature)`` (``then`` None: the division alone)."""
    if temperature <= 0:
        raise GuideGenError(f"temperature must be > 0, got {temperature}")
    return (lambda logits: logits / temperature) if then is None else (lambda logits: then(logits / temperature))


def prior_tempered(net: TCSSUNet, temperature: float):
    """``(xt_onehot, t, context) -> logits`` of ``net`` with only its prior divided by ``temperature``.

    With the voxel-evidence skip the logits are prior + ``log q(x_t | x_0)``; dividing all of
    them by a temperature below 1 also raises the exact likelihood of the observed noisy voxel
    to the power 1/temperature, as if x_t were less noisy than the schedule says, so noise
    voxels are kept: ``p(x_0 | x_t) ∝ p_prior(x_0)^(1/temperature) · q(x_t | x_0)`` sharpens the
    belief about the clean map and leaves the observation's likelihood exact. Without the skip
    (``net.alphas_bar`` None) it is the plain division.
    """
    if temperature <= 0:
        raise GuideGenError(f"temperature must be > 0, got {temperature}")

    def model_fn(xt_onehot: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        logits = net(xt_onehot, t, context)
        if net.alphas_bar is None:
            return logits / temperature
        evidence = voxel_evidence(xt_onehot, net.alphas_bar[t].to(logits.dtype))
        return evidence + (logits - evidence) / temperature

    return model_fn


@torch.no_grad()
def sample_label_maps(model: ConditionedDenoiser, cond: dict, grid: tuple[int, int, int], alphas_bar: torch.Tensor,
                      label_set: LabelSet, *, steps: int, guidance: float, generator: torch.Generator,
                      site_gate: float = 0.0, size_guidance: float = 0.0, size_guidance_pool: int = 1,
                      site_gate_lesion_scale: bool = False, host_refill: bool = False,
                      requests: TumorRequests | None = None, temperature: float = 1.0,
                      temper_prior_only: bool = False, churn: float = 0.0, window_t: int = 0, window_share: float = 0.0,
                      progress: bool = False) -> torch.Tensor:
    """Sample label maps ``(B, X, Y, Z)`` long for prepared condition tensors ``cond``.

    ``steps`` == T runs the full ancestral sampler; fewer uses the strided sampler (with
    ``churn`` and the visit list's early window ``window_t`` / ``window_share``,
    :func:`~guidegen.diffusion.categorical.sample_strided`). Guidance
    is classifier-free on the x0 logits with the model's learned null context; the guided
    logits are divided by ``temperature`` (config ``tcss.temperature``; with ``temper_prior_only``
    only the network's prior, the voxel evidence stays exact: :func:`prior_tempered`); then the findings'
    tumour constraints (:func:`tumor_guidance_fn`) act on them: ``requests`` (from parsed
    findings: sides and volume) or, when None, the sites of ``cond["findings_vec"]``.
    The constraints come after the temperature so the matched tumour volume is that of the
    distribution actually sampled.
    """
    b, num_classes = cond["tokens"].shape[0], label_set.num_classes
    context = model.context(cond["tokens"], cond["mask"], cond["findings_vec"])
    if requests is None:
        requests = TumorRequests.from_vector(cond["findings_vec"], label_set)
    constrain = tumor_guidance_fn(requests.to(cond["tokens"].device), label_set, site_gate, size_guidance,
                                  pool=size_guidance_pool, lesion_scale=site_gate_lesion_scale, host_refill=host_refill)
    model_fn = model.net
    if temperature != 1.0 and temper_prior_only:
        # identical evidence in both passes: tempering each before guidance = tempering the guided prior
        model_fn = prior_tempered(model.net, temperature)
    elif temperature != 1.0:
        constrain = _tempered(constrain, temperature)
    denoise = cat.classifier_free_guidance(model_fn, context, model.null_context(1), guidance, constrain)
    shape = (b, *grid)
    timesteps = alphas_bar.shape[0] - 1
    if steps >= timesteps:
        return cat.sample_ancestral(denoise, shape, num_classes, alphas_bar, generator, progress=progress)
    return cat.sample_strided(denoise, shape, num_classes, alphas_bar, steps, generator, progress=progress, churn=churn,
                              window_t=window_t, window_share=window_share)


class TCSSTask(StageTask):
    """KL(q(x_{t-1}|x_t,x_0) ‖ p_θ(x_{t-1}|x_t)) (+ optional x0 cross-entropy) with t ∝ t^1.5."""

    def __init__(self, cfg: GuideGenConfig, label_set: LabelSet, conditioner: TextConditioner,
                 spacing_mm: tuple[float, float, float] | None = None):
        """``spacing_mm``: the training grid's voxel size, so the sample previews ask for the
        prompts' tumours as ``generate`` does (sides, volume, lesion boxes); None: sites only."""
        self.cfg, self.label_set, self.conditioner = cfg, label_set, conditioner
        self.spacing_mm = spacing_mm
        self.alphas_bar = cat.cosine_schedule(cfg.tcss.timesteps)
        self.class_weights = class_weight_vector(cfg.tcss.class_weights, label_set)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": build_tcss_model(self.cfg, self.label_set, self.conditioner.text_dim)}

    def training_step(self, batch: dict[str, Any], step: int, ctx: StepContext) -> Mapping[str, torch.Tensor]:
        x0 = batch["labels"]  # (B, X, Y, Z) long
        b, k = x0.shape[0], self.label_set.num_classes
        cond = batch_condition(self.conditioner, batch, ctx.device)
        ab = self.alphas_bar.to(ctx.device)
        t = cat.sample_timesteps(b, self.cfg.tcss.timesteps, self.cfg.tcss.t_power, device=ctx.device)
        xt = cat.q_sample(x0, t, ab, k)
        drop = sample_drop_mask(b, self.cfg.text.cond_drop_prob, device=ctx.device)
        logits = ctx.modules["model"](cat.one_hot(xt, k), t, cond["tokens"], cond["mask"], cond["findings_vec"], drop)
        gate = tumor_guidance_fn(TumorRequests.from_vector(cond["findings_vec"], self.label_set), self.label_set,
                                 self.cfg.tcss.site_gate, drop=drop)
        if gate is not None:
            logits = gate(logits)
        # KL (+ class-weighted auxiliary x0 cross-entropy) is the loss; plain KL/CE are logged
        loss = cat.kl_loss(x0, xt, logits, t, ab, aux_ce_weight=self.cfg.tcss.aux_ce_weight, class_weights=self.class_weights)
        with torch.no_grad():
            kl = cat.kl_loss(x0, xt, logits, t, ab)
            ce = nn.functional.cross_entropy(logits, x0)
            acc = (logits.argmax(1) == x0).float().mean()
        return {"loss": loss, "kl": kl, "ce": ce, "x0_acc": acc}

    def sample(self, modules: Mapping[str, nn.Module], step: int, out_dir: Path) -> None:
        from guidegen.viz import save_case_preview

        model = modules["model"]
        device = next(model.parameters()).device
        findings = [parse_findings(p) for p in SAMPLE_PROMPTS]
        cond = {k: v.to(device) for k, v in self.conditioner.prepare(list(SAMPLE_PROMPTS), findings).items()}
        requests = (None if self.spacing_mm is None else
                    TumorRequests.from_findings(findings, self.label_set, self.spacing_mm).to(device))
        gen = torch.Generator(device=device).manual_seed(step)
        tcss = self.cfg.tcss
        maps = sample_label_maps(model, cond, self.cfg.data.grid, self.alphas_bar.to(device), self.label_set,
                                 steps=min(25, tcss.timesteps), guidance=tcss.guidance, generator=gen,
                                 site_gate=tcss.site_gate, size_guidance=tcss.size_guidance,
                                 size_guidance_pool=tcss.size_guidance_pool, site_gate_lesion_scale=tcss.site_gate_lesion_scale,
                                 host_refill=tcss.size_guidance_host_refill, requests=requests, temperature=tcss.temperature, temper_prior_only=tcss.temper_prior_only,
                                 churn=tcss.sample_churn, window_t=tcss.sample_window_t,
                                 window_share=tcss.sample_window_share)
        for i, lab in enumerate(maps.cpu().numpy().astype("uint8")):
            save_case_preview(out_dir / f"step{step:07d}_prompt{i}.png", lab, None, self.label_set, title=f"step {step}: {SAMPLE_PROMPTS[i]}")
