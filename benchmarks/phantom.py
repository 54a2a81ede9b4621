"""Median wall time to render one phantom case at several grids (no assertions).

    python benchmarks/phantom.py [--seeds N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from guidegen.data.phantom import render_phantom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}")
    render_phantom(0, (32, 32, 32))  # warm imports
    for grid in [(48, 48, 64), (64, 64, 64), (96, 96, 96), (128, 128, 128)]:
        times = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            render_phantom(seed, grid)
            times.append(time.perf_counter() - t0)
        print(f"grid {'x'.join(map(str, grid)):>11}: median {np.median(times):.3f} s/case (min {min(times):.3f}, max {max(times):.3f}, {args.seeds} seeds)")


if __name__ == "__main__":
    main()
