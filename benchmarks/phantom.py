"""Median wall time to render one phantom case at several grids (no assertions).

Each grid is timed as shipped (HU averaged over 2×2×2 sub-samples per voxel: partial volume) and,
as the baseline in the same run, point-sampled (each voxel's HU at its centre); the ratio is the
cost of the partial volume.

    python benchmarks/phantom.py [--seeds N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

import guidegen.data.phantom as phantom
from guidegen.data.phantom import render_phantom


def median_seconds(grid: tuple[int, int, int], seeds: int, partial_volume: bool) -> tuple[float, float, float]:
    """(median, min, max) seconds to render seeds 0..seeds-1 on ``grid``."""
    shipped = phantom.PARTIAL_VOLUME_MAX_VOXELS
    phantom.PARTIAL_VOLUME_MAX_VOXELS = shipped if partial_volume else 0
    try:
        times = []
        for seed in range(seeds):
            t0 = time.perf_counter()
            render_phantom(seed, grid)
            times.append(time.perf_counter() - t0)
    finally:
        phantom.PARTIAL_VOLUME_MAX_VOXELS = shipped
    return float(np.median(times)), min(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}")
    render_phantom(0, (32, 32, 32))  # warm imports
    for grid in [(48, 48, 64), (64, 64, 64), (96, 96, 96), (128, 128, 128)]:
        med, lo, hi = median_seconds(grid, args.seeds, partial_volume=True)
        point = median_seconds(grid, args.seeds, partial_volume=False)[0]
        averaged = "partial volume" if phantom._supersampled(grid) else "point-sampled (above PARTIAL_VOLUME_MAX_VOXELS)"
        print(f"grid {'x'.join(map(str, grid)):>11}: median {med:.3f} s/case (min {lo:.3f}, max {hi:.3f}, {args.seeds} seeds; {averaged}) "
              f"| point-sampled {point:.3f} s/case | ratio x{med / point:.1f}")


if __name__ == "__main__":
    main()
