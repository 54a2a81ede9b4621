"""Attention path of the shipped diffusion UNets: einsum-softmax-einsum vs torch's fused SDPA.

MONAI's ``DiffusionModelUNet`` computes attention either as two einsums around a softmax over
an (L, L) matrix or, with ``use_flash_attention``, with ``torch.nn.functional.
scaled_dot_product_attention`` (the same math, fused). Both UNets now build with the fused
path; this script times both on the same prompt, seed and weights, alternating the two paths
``--reps`` times so that a noisy machine affects both alike, and prints the median seconds, the
ratio and how far the outputs differ (label-map voxels; CT HU).

    python benchmarks/attention.py [--checkpoint ROOT] [--steps 10] [--ct-steps 50] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

PROMPT = "62-year-old man, 4 cm mass in the left kidney, portal venous phase"


def set_fused_attention(model: torch.nn.Module, fused: bool) -> int:
    """Switch every MONAI attention block of ``model`` to the fused (SDPA) path or back; returns their count."""
    from monai.networks.blocks.crossattention import CrossAttentionBlock
    from monai.networks.blocks.selfattention import SABlock

    blocks = [m for m in model.modules() if isinstance(m, (SABlock, CrossAttentionBlock))]
    for b in blocks:
        b.use_flash_attention = fused
    return len(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=10, help="TCSS strided steps timed per run")
    ap.add_argument("--ct-steps", type=int, default=None, help="LDM steps (default: the checkpoint's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from guidegen.pipeline import GuideGenPipeline, prompt_findings

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint)
    findings = prompt_findings(PROMPT)
    times: dict[tuple[str, bool], list[float]] = {}
    outputs: dict[tuple[str, bool], np.ndarray] = {}
    for _ in range(args.reps):
        for fused in (False, True):
            n_blocks = set_fused_attention(pipe.labels.model, fused) + set_fused_attention(pipe.ct.model, fused)
            t0 = time.perf_counter()
            lab = pipe.labels([PROMPT], [findings], 0, args.steps, 1.0)[0]
            t1 = time.perf_counter()
            ct, _ = pipe.ct(lab if not fused else outputs.get(("labels", False), lab), PROMPT, findings, seed=0, steps=args.ct_steps)
            t2 = time.perf_counter()
            times.setdefault(("labels", fused), []).append(t1 - t0)
            times.setdefault(("ct", fused), []).append(t2 - t1)
            outputs.setdefault(("labels", fused), lab)
            outputs.setdefault(("ct", fused), np.asarray(ct, np.float32))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{n_blocks} attention blocks; {args.reps} alternating runs per path")
    for stage, what in (("labels", f"TCSS label map, {args.steps} strided steps"), ("ct", "CT stage (LDM + decoder)")):
        base, fused = float(np.median(times[stage, False])), float(np.median(times[stage, True]))
        print(f"{what}: einsum {base:.2f} s, fused {fused:.2f} s (median) -> x{base / fused:.2f} faster")
    a, b = outputs["labels", False], outputs["labels", True]
    print(f"label maps: {int((a != b).sum())} of {a.size} voxels differ; "
          f"CT on the same map: max |HU difference| {float(np.abs(outputs['ct', False] - outputs['ct', True]).max()):.2f}")


if __name__ == "__main__":
    main()
