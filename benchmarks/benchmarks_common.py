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
            f"{f'_churn{gen.churn}' if gen.churn and steps < gen.cfg.tcss.timesteps else ''}"
            f"{f'_window{gen.window_t}x{gen.window_share}' if gen.window_t and gen.window_share and steps < gen.cfg.tcss.timesteps else ''}")


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
