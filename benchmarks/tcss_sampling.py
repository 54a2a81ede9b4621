"""Few-step (strided) vs full 1000-step ancestral TCSS sampling: quality and time (issue 6).

For the same prompts and seeds, samples label maps with the strided sampler (``--steps``
network calls, x2 with guidance) and with full ancestral sampling (T calls), then prints
- the relative Wasserstein-1 distance between the per-organ volume distributions of the two
  sets (mean and worst organ; target: <= 10 %), and
- seconds per sample of each and their ratio.

    python benchmarks/tcss_sampling.py [--checkpoint ROOT] [--n 8] [--steps 50] [--guidance G]

Both samplers use the same guidance (default: the checkpoint's); ``--guidance 1`` halves the
cost of the slow 1000-step arm (one network call per step instead of two) on a CPU.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from guidegen.checkpoints import total_train_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's tcss.guidance")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import benchmarks_common  # noqa: F401  (puts benchmarks/ on the path)
    from benchmarks_common import prompts_for
    from guidegen.evaluation.metrics import case_stats, relative_w1
    from guidegen.pipeline import GuideGenPipeline, prompt_findings

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint, labels_only=True)
    gen, ls = pipe.labels, pipe.label_set
    T = gen.cfg.tcss.timesteps
    guidance = gen.cfg.tcss.guidance if args.guidance is None else args.guidance
    prompts = prompts_for(args.n)
    volumes = {}
    seconds = {}
    for name, steps in (("strided", args.steps), ("ancestral", T)):
        vols, t0 = [], time.perf_counter()
        for i, text in enumerate(prompts):
            lab = gen([text], [prompt_findings(text)], seed=i, steps=steps, guidance=guidance)[0]
            vols.append(case_stats(lab, gen.affine(), ls).volumes_ml)
        seconds[name] = (time.perf_counter() - t0) / len(prompts)
        volumes[name] = np.stack(vols)
    w1 = {ls.name_of(j): relative_w1(volumes["ancestral"][:, j], volumes["strided"][:, j]) for j in ls.organ_ids}
    finite = {k: v for k, v in w1.items() if np.isfinite(v)}
    worst = max(finite, key=finite.get)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"checkpoint {pipe.checkpoint_root} (TCSS {total_train_steps(gen.meta)} steps), {args.n} prompts, guidance {guidance}")
    print(f"organ-volume relative W1, strided {args.steps} vs ancestral {T}: mean {np.mean(list(finite.values())):.1%}, "
          f"worst {worst} {finite[worst]:.1%} (target <= 10 %)")
    print(f"time per sample: strided {seconds['strided']:.1f} s, ancestral {seconds['ancestral']:.1f} s, "
          f"speed-up x{seconds['ancestral'] / seconds['strided']:.1f}")


if __name__ == "__main__":
    main()
