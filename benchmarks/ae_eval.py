"""Autoencoder fidelity on phantom cases from seeds never used in training (issue 7).

Renders N phantom cases (seeds 0..N-1; the demo training set uses seeds from 100000) at the
checkpoint's grid, reconstructs each through the autoencoder and prints, averaged over cases:
- MAE inside the organs (all organ-group voxels) in the soft-tissue window   (target <= 25 HU)
- |mean HU error| of the tumour                                               (target <= 15 HU)
  and, per case, the lesion voxels and that error (a few small lesions carry most of the mean)
- |mean HU error| of vertebrae and of ribs                                    (target <= 60 HU)
- |mean HU error| of lung parenchyma                                          (target <= 40 HU)
and the whole-volume MAE per window; and, as the decoder's ceiling for issue 8's HU target, the
share of per-organ HU levels (medians and QC's 10 % trimmed means) of the reconstructions inside
the range of N_REAL real phantom cases (the reference set benchmarks/generate.py uses), next to
the same share for the unseen real cases themselves (the range's own coverage). With texture
tables in the checkpoint (``autoencoder.texture_bins``) the same shares are printed for the
reconstructions with one texture draw per voxel (seeded by the case), which is what ``generate``
renders; the error rows above stay those of the deterministic decoder. It also prints the
texture's grain: the lag-1 correlation along x, y, z of the residuals (against the deterministic
reconstruction) of the real cases and of the textured ones, Gaussianised through the texture's
own tables (``models.texture.measure_grain``), next to the grain stored in the checkpoint.

    python benchmarks/ae_eval.py [--checkpoint DIR] [--n 20] [--n-real 96]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from guidegen.checkpoints import total_train_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="autoencoder checkpoint dir (default: shipped demo)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--n-real", type=int, default=96, help="real phantom cases whose HU range the levels are held to")
    ap.add_argument("--work", default="runs/bench_generate", help="where the real set is kept (shared with generate.py)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from benchmarks_common import hu_lines, hu_outside, phantom_set, textured

    from guidegen.checkpoints import shipped_root
    from guidegen.data.latents import load_autoencoder
    from guidegen.data.phantom import render_phantom
    from guidegen.evaluation.sets import load_eval_set
    from guidegen.labels import load_label_set
    from guidegen.models.autoencoder import hu_to_norm
    from guidegen.models.texture import measure_grain
    from guidegen.qc import HU_STATISTIC, hu_reference
    from guidegen.reconstruct import WINDOWS_HU, reconstruct_volume, windowed_mae

    ckpt = args.checkpoint or shipped_root() / "demo" / "autoencoder"
    ae, cfg, meta = load_autoencoder(ckpt)
    ls = load_label_set(cfg.data.label_set)
    organ_ids = np.array(ls.organ_ids)
    rows = {k: [] for k in ("organ_mae", "tumor", "vertebrae", "rib", "lung", *WINDOWS_HU)}
    tumor_cases = []  # (seed, tumour voxels, |mean HU error|): where the mean error comes from
    grain_cases = {"real": [], "textured": []}  # (decoded, target, labels, depth), normalised, per case
    grid = tuple(cfg.data.grid)
    real = load_eval_set(phantom_set(Path(args.work) / f"real_{args.n_real}_{'x'.join(map(str, grid))}",
                                     args.n_real, grid, seed=500000), grid)
    stats = (HU_STATISTIC, "median")
    refs = {st: hu_reference(zip(real.ct, real.labels), ls, st) for st in stats}
    sources = ("recon", "textured", "real") if ae.has_texture else ("recon", "real")
    outside = {(src, st): [] for src in sources for st in stats}
    t0 = time.perf_counter()
    for seed in range(args.n):
        case = render_phantom(seed, grid)
        ct, lab = case.ct.astype(np.float32), case.labels
        rec = reconstruct_volume(ae, ct, lab, tuple(cfg.autoencoder.hu_range))
        rows["organ_mae"].append(windowed_mae(ct, rec, WINDOWS_HU["soft_tissue"], np.isin(lab, organ_ids)))
        for name in ("tumor", "vertebrae", "rib", "lung"):
            m = lab == ls.id_of(name)
            if m.any():
                rows[name].append(abs(float(rec[m].mean() - ct[m].mean())))
                if name == "tumor":
                    tumor_cases.append((seed, int(m.sum()), rows[name][-1]))
        for w, win in WINDOWS_HU.items():
            rows[w].append(windowed_mae(ct, rec, win))
        levels = {"recon": rec, "real": ct}
        if ae.has_texture:
            levels["textured"] = textured(ae, rec, lab, tuple(cfg.autoencoder.hu_range), seed)
            depth = ae.texture_depth(torch.from_numpy(lab.astype(np.int64))[None])[0].numpy()
            for src in grain_cases:
                grain_cases[src].append(tuple(hu_to_norm(torch.from_numpy(np.asarray(v, np.float32)),
                                                         tuple(cfg.autoencoder.hu_range)).numpy()
                                              for v in (rec, levels[src])) + (lab, depth))
        for src in sources:
            for st in stats:
                outside[src, st].append(hu_outside(levels[src], lab, ls, refs[st], st))
    secs = time.perf_counter() - t0
    mean = lambda k: float(np.mean(rows[k])) if rows[k] else float("nan")  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"checkpoint: {ckpt} ({total_train_steps(meta)} training steps), grid {tuple(cfg.data.grid)}, {args.n} cases (seeds 0..{args.n - 1})")
    print(f"MAE inside organs, soft-tissue window: {mean('organ_mae'):6.1f} HU   (target <= 25)")
    print(f"tumour |mean HU error|:                {mean('tumor'):6.1f} HU   (target <= 15; {len(rows['tumor'])} cases with a tumour)")
    print("  per case, largest first (seed: voxels, HU): "
          + ", ".join(f"{s}: {v}, {e:.0f}" for s, v, e in sorted(tumor_cases, key=lambda c: -c[2])))
    print(f"vertebrae / rib |mean HU error|:       {mean('vertebrae'):6.1f} / {mean('rib'):.1f} HU   (target <= 60)")
    print(f"lung |mean HU error|:                  {mean('lung'):6.1f} HU   (target <= 40)")
    print("whole-volume MAE by window: " + ", ".join(f"{w} {mean(w):.1f} HU" for w in WINDOWS_HU))
    print(f"organ HU levels against the range of {args.n_real} real phantom cases (seeds 500000..):")
    what = {"recon": "reconstructions (the deterministic decoder's ceiling)",
            "textured": "reconstructions with a texture draw per voxel (what generate renders: its ceiling)",
            "real": "the real cases themselves"}
    for src in sources:
        print(f"  {what[src]}:")
        for st in stats:
            print(hu_lines(outside[src, st], st, indent="    "))
    if ae.has_texture:
        fmt = lambda g: " / ".join(f"{float(v):.3f}" for v in g)  # noqa: E731
        print(f"texture grain, lag-1 correlation x / y / z of the Gaussianised residuals (same-class neighbours): "
              f"real {fmt(measure_grain(ae.texture, grain_cases['real']))}, "
              f"textured {fmt(measure_grain(ae.texture, grain_cases['textured']))} "
              f"(checkpoint's grain {fmt(ae.texture.grain)})")
    print(f"time: {secs:.0f} s")


if __name__ == "__main__":
    main()
