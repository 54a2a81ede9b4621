"""Wall time of ``guidegen evaluate --quick`` on 16 real + 16 synthetic phantom cases.

Builds two phantom sets (different seeds) at the demo grid in a temporary directory, then runs
the quick evaluation twice through the CLI: cold (every evaluation network trained) and warm
(networks loaded from the real set's cache). Target: the cold run under 10 minutes on 2 CPU cores.

    python benchmarks/evaluate_quick.py [--n 16] [--size 48,48,64] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from guidegen.data.layout import parse_grid
from guidegen.data.phantom_dataset import write_phantom_dataset


def run_cli(real: Path, synth: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "guidegen", "evaluate", "--real", str(real), "--synthetic", str(synth), "--out", str(out), "--quick"],
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", default="48,48,64", help="phantom grid")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    grid = parse_grid(args.size)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        t0 = time.perf_counter()
        write_phantom_dataset(work / "real", n=args.n, grid=grid, seed=0, previews=False, progress=False, overwrite=True)
        write_phantom_dataset(work / "synthetic", n=args.n, grid=grid, seed=10_000, previews=False, progress=False, overwrite=True)
        print(f"phantom sets: 2 x {args.n} cases at {'x'.join(map(str, grid))} in {time.perf_counter() - t0:.1f} s")
        cold = run_cli(work / "real", work / "synthetic", work / "eval_cold")
        warm = run_cli(work / "real", work / "synthetic", work / "eval_warm")
        m = json.loads((work / "eval_cold" / "metrics.json").read_text())
        print(f"evaluate --quick, cold (trains all nets): {cold:.1f} s  (limit 600 s: {'OK' if cold < 600 else 'TOO SLOW'})")
        print(f"evaluate --quick, warm (cached nets):      {warm:.1f} s")
        print(f"sections (cold, s): {json.dumps(m['timings_s'])}")
        print("metrics (cold): " + ", ".join(f"{k}={m[k]}" for k in ("frechet_distance", "precision", "recall", "organ_volume_w1", "tumor_placement_rate",
                                                                      "alignment_dice_mean", "attribute_accuracy", "downstream_dice_synthetic", "downstream_dice_real")))


if __name__ == "__main__":
    main()
