"""Shared bits of the benchmark scripts (run them from the repository root)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompts_for(n: int) -> list[str]:
    """``n`` evaluation prompts unlike the phantom's report templates (see tcss_eval.py)."""
    from tcss_eval import make_prompts

    return [text for text, _ in make_prompts(n)]


def sampler_tag(gen, steps: int, guidance: float) -> str:
    """Name of a TCSS sampler setting for the benchmarks' label-map caches.

    ``gen`` is a :class:`guidegen.pipeline.LabelMapGenerator`; the tag holds everything that
    changes what it samples for a prompt and seed: checkpoint (its training steps), step count,
    guidance, findings constraints, temperature and (few-step only) churn and early window. One helper, so the caches of tcss_eval.py,
    generate.py and tcss_sampling.py stay in step when a sampler setting is added.
    """
    from guidegen.checkpoints import total_train_steps

    return (f"tcss{total_train_steps(gen.meta)}_steps{steps}_g{guidance}_gate{gen.site_gate}"
            f"_vol{gen.size_guidance}_pool{gen.cfg.tcss.size_guidance_pool}_temp{gen.temperature}"
            f"{'prior' if gen.temper_prior_only and gen.temperature != 1.0 else ''}"
            f"{'_lesionscale' if gen.site_gate_lesion_scale else ''}"
            f"{'_hostrefill' if gen.host_refill else ''}"
            f"{f'_churn{gen.churn}' if gen.churn and steps < gen.cfg.tcss.timesteps else ''}"
            f"{f'_window{gen.window_t}x{gen.window_share}' if gen.window_t and gen.window_share and steps < gen.cfg.tcss.timesteps else ''}")


# TCSS sampler settings a benchmark may override, by option name: the LabelMapGenerator attribute,
# the argparse type/choices, how the option's value becomes the attribute's, and the help text.
SAMPLER_OPTIONS: dict[str, tuple[str, dict, object, str]] = {
    "temperature": ("temperature", {"type": float}, float, "x_0 sampling temperature"),
    "temper": ("temper_prior_only", {"choices": ["all", "prior"]}, lambda v: v == "prior",
               "what the temperature divides: all the x_0 logits, or the prior alone (voxel evidence exact)"),
    "lesion-scale": ("site_gate_lesion_scale", {"type": int, "choices": (0, 1)}, bool,
                     "site gate at the requested lesion's scale, 1 on / 0 off"),
    "host-refill": ("host_refill", {"type": int, "choices": (0, 1)}, bool,
                    "volume matching gives what it takes off the tumour to the requested organ, 1 on / 0 off"),
    "churn": ("churn", {"type": float}, float, "few-step sampling's churn (0 = off)"),
    "window-t": ("window_t", {"type": int}, int, "few-step visit list: the early window's lower end (0 = even grid)"),
    "window-share": ("window_share", {"type": float}, float, "few-step visit list: the share of the visits in that window"),
}


def add_sampler_options(ap, names: list[str], prefix: str = "") -> None:
    """Add ``--{prefix}{name}`` for each of ``names`` (keys of :data:`SAMPLER_OPTIONS`) to ``ap``;
    each defaults to None, which keeps the checkpoint's setting."""
    for name in names:
        _, kwargs, _, text = SAMPLER_OPTIONS[name]
        ap.add_argument(f"--{prefix}{name}", default=None, help=f"{text} (default: the checkpoint's)", **kwargs)


def apply_sampler_options(gen, args, names: list[str], prefix: str = "") -> None:
    """Set on ``gen`` (a :class:`guidegen.pipeline.LabelMapGenerator`) every option of ``names``
    that ``args`` (from :func:`add_sampler_options` with the same ``prefix``) holds."""
    for name in names:
        attr, _, convert, _ = SAMPLER_OPTIONS[name]
        value = getattr(args, f"{prefix}{name}".replace("-", "_"))
        if value is not None:
            setattr(gen, attr, convert(value))


def phantom_set(root: Path, n: int, grid: tuple[int, int, int], seed: int) -> Path:
    """A phantom dataset of seeds ``seed..seed+n-1`` at ``root`` that benchmarks keep between runs.

    Written when missing, incomplete, of other seeds or grid, or rendered by another phantom
    version (its ``dataset.json`` ``phantom_digest`` differs from
    :func:`guidegen.data.phantom_dataset.phantom_digest`): a phantom change keeps the seeds and
    case ids, and scoring against the old truth would go unnoticed.
    """
    import json

    from guidegen.data.phantom_dataset import phantom_digest, write_phantom_dataset

    info = root / "dataset.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        digest = phantom_digest()
        wanted = {"status": "complete", "phantom_digest": digest, "num_cases": n, "grid": list(grid), "seeds": [seed, seed + n - 1]}
        if all(meta.get(k) == v for k, v in wanted.items()):
            return root
        print(f"{root}: not a complete set of the current phantom ({digest}); rendering it again")
    return write_phantom_dataset(root, n=n, grid=grid, seed=seed, previews=False, overwrite=True)


def hu_outside(ct, lab, label_set, ref: dict[str, list[float]], statistic: str) -> dict[str, float]:
    """Signed HU by which each organ's level (``statistic``, see :mod:`guidegen.qc`) lies outside
    the real range ``ref`` (``{name: [min, max]}`` from :func:`guidegen.qc.hu_reference`); 0 inside."""
    import numpy as np

    from guidegen.qc import hu_levels

    levels = hu_levels(np.asarray(ct, np.float32), lab, label_set, statistic)
    return {n: float(levels[n] - np.clip(levels[n], *ref[n]))
            for n in levels if n in ref and n in label_set.names and label_set.id_of(n) in label_set.organ_ids}


def hu_lines(outsides: list[dict[str, float]], statistic: str, indent: str = "      ") -> str:
    """Two report lines over samples (each a :func:`hu_outside` dict): the share of organ levels
    inside the real range (issue 8 asks for inside) with the misses (organ: samples, farthest HU),
    and the share within QC's ± HU_MARGIN."""
    import numpy as np

    from guidegen.qc import HU_MARGIN

    inside = np.nanmean([np.mean([d == 0 for d in o.values()]) if o else np.nan for o in outsides])
    margin = np.nanmean([np.mean([abs(d) <= HU_MARGIN for d in o.values()]) if o else np.nan for o in outsides])
    misses: dict[str, list[float]] = {}
    for o in outsides:
        for n, d in o.items():
            if d != 0:
                misses.setdefault(n, []).append(d)
    ranked = sorted(misses.items(), key=lambda kv: -len(kv[1]))
    return (f"{indent}organ HU {statistic} within the real range: {inside:.0%}; outside (organ: samples, farthest HU): "
            + (", ".join(f"{n}: {len(d)} ({max(d, key=abs):+.0f})" for n, d in ranked) or "none")
            + f"\n{indent}... within ± {HU_MARGIN:.0f} HU of the real range (QC's tolerance): {margin:.1%}")


def textured(ae, rec_hu, labels, hu_range: tuple[float, float], seed: int):
    """``rec_hu`` (X, Y, Z) HU with one draw of the autoencoder's texture per voxel (seeded by ``seed``)."""
    import numpy as np
    import torch

    from guidegen.models.autoencoder import hu_to_norm, norm_to_hu

    x = hu_to_norm(torch.from_numpy(rec_hu)[None, None], hu_range)
    lab = torch.from_numpy(labels.astype(np.int64))[None]
    return norm_to_hu(ae.add_texture(x, lab, torch.Generator().manual_seed(seed)), hu_range)[0, 0].numpy()
