"""End-to-end generation (issue 8): alignment Dice, HU calibration and sampler speed.

1. Writes (or reuses) a real phantom set of ``--n-real`` cases at the checkpoint grid (seeds
   from 500000, never used in training) and trains the evaluation segmenter on it (MONAI UNet,
   cached) — the network `guidegen evaluate` uses for alignment.
2. For ``--n`` prompts (benchmarks/tcss_eval.py's prompts, unlike the training reports) samples a
   label map with TCSS, then a CT for that same label map twice: with the default few-step DDIM
   sampler and (``--ddpm``) with full 1000-step DDPM.
3. Prints, for each sampler: seconds per CT, mean organ Dice of the segmenter on the generated CT
   against the generated label map (target >= 0.80), the fraction of organ HU medians inside the
   real set's per-organ range, and the time ratio.

    python benchmarks/generate.py [--checkpoint ROOT] [--n 20] [--n-real 24] [--ddpm] [--tcss-steps N] [--work DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from guidegen.checkpoints import total_train_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--n-real", type=int, default=24)
    ap.add_argument("--ddpm", action="store_true", help="also sample each CT with 1000-step DDPM")
    ap.add_argument("--seg-steps", type=int, default=600)
    ap.add_argument("--tcss-steps", type=int, default=None, help="label-map sampler steps (default: the checkpoint's)")
    ap.add_argument("--work", default="runs/bench_generate")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tcss_eval import make_prompts

    from guidegen.data.phantom_dataset import write_phantom_dataset
    from guidegen.evaluation.metrics import dice_per_class
    from guidegen.evaluation.runner import trained_segmenter
    from guidegen.evaluation.sets import ct_to_unit, load_eval_set
    from guidegen.models.segmenter import SegmenterConfig, segment
    from guidegen.pipeline import GuideGenPipeline, prompt_findings
    from guidegen.qc import hu_medians, hu_reference

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint)
    ls, grid = pipe.label_set, pipe.labels.grid
    work = Path(args.work)
    real_dir = work / f"real_{args.n_real}_{'x'.join(map(str, grid))}"
    if not (real_dir / "dataset.json").is_file():
        write_phantom_dataset(real_dir, n=args.n_real, grid=grid, seed=500000, previews=False)
    real = load_eval_set(real_dir, grid)
    seg = trained_segmenter(real, SegmenterConfig(steps=args.seg_steps), work / "cache", "segmenter")[0]
    ref = hu_reference(zip(real.ct, real.labels), ls)

    samplers = {"ddim": pipe.ct.cfg.ldm.sample_steps} | ({"ddpm": pipe.ct.cfg.ldm.timesteps} if args.ddpm else {})
    results = {name: {"dice": [], "seconds": [], "hu_in_range": []} for name in samplers}
    for i, (text, _) in enumerate(make_prompts(args.n)):
        f = prompt_findings(text)
        lab = pipe.labels([text], [f], seed=i, steps=args.tcss_steps or pipe.labels.cfg.tcss.sample_steps,
                          guidance=pipe.labels.cfg.tcss.guidance)[0]
        for name, steps in samplers.items():
            t0 = time.perf_counter()
            ct, _ = pipe.ct(lab, text, f, seed=i, steps=steps)
            results[name]["seconds"].append(time.perf_counter() - t0)
            pred = segment(seg, ct_to_unit(ct.astype(np.float32)[None]))[0]
            d = dice_per_class(pred, lab, ls.num_classes)
            organs = [j for j in ls.organ_ids if (lab == j).any()]
            results[name]["dice"].append(float(np.nanmean(d[organs])))
            meds = hu_medians(ct.astype(np.float32), lab, ls)
            names = [n for n in meds if n in ref and n in ls.names and ls.id_of(n) in ls.organ_ids]
            results[name]["hu_in_range"].append(np.mean([ref[n][0] <= meds[n] <= ref[n][1] for n in names]) if names else np.nan)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"checkpoints: TCSS {total_train_steps(pipe.labels.meta)} steps, LDM {total_train_steps(pipe.ct.meta)} steps, "
          f"AE {total_train_steps(pipe.ct.ae_meta)} steps; {args.n} prompts; segmenter trained on {args.n_real} real phantom cases")
    for name, r in results.items():
        print(f"{name:>5} ({samplers[name]} steps): {np.mean(r['seconds']):6.1f} s/CT | alignment mean organ Dice "
              f"{np.mean(r['dice']):.3f} (target >= 0.80) | organ HU medians within real range {np.nanmean(r['hu_in_range']):.0%}")
    if "ddpm" in results:
        print(f"DDIM speed-up over DDPM: x{np.mean(results['ddpm']['seconds']) / np.mean(results['ddim']['seconds']):.1f}")
    real_dice = [float(np.nanmean(dice_per_class(p, l, ls.num_classes)[[j for j in ls.organ_ids if (l == j).any()]]))
                 for p, l in zip(segment(seg, ct_to_unit(real.ct[:4])), real.labels[:4])]
    print(f"reference: the same segmenter on 4 of its own real training cases: mean organ Dice {np.mean(real_dice):.3f}")


if __name__ == "__main__":
    main()
