"""Autoencoder memory and time: tiled vs untiled encode+decode, training step time, tiling error.

Each encode+decode runs in its own subprocess so that its peak resident memory (``ru_maxrss``)
is measured alone; the number reported is the peak minus the RSS just before the work starts
(model and input already allocated). The demo config's autoencoder with random weights
(memory and time do not depend on the weights).

    python benchmarks/ae_memory.py                      # 96³, 128³, 256³; tiles 64³, overlap 32
    python benchmarks/ae_memory.py --sizes 96 128 --max-untiled 128 --tile 96 --overlap 48
    python benchmarks/ae_memory.py --step-time --threads 1   # on a busy machine: no OpenMP oversubscription
    python benchmarks/ae_memory.py --step-time          # s/step at the demo grid, batch 1
    python benchmarks/ae_memory.py --tiling-error       # tiled-vs-untiled HU error, channel vs group norm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from guidegen.config import load_config  # noqa: E402
from guidegen.labels import load_label_set  # noqa: E402
from guidegen.models.autoencoder import AnatomyAwareAutoencoder, norm_to_hu  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (MB) from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def demo_model(norm: str = "channel") -> AnatomyAwareAutoencoder:
    cfg = load_config("demo").autoencoder.model_copy(update={"norm": norm})
    torch.manual_seed(0)
    return AnatomyAwareAutoencoder.from_config(cfg, load_label_set().num_classes).eval()


def inputs(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 1, size, size, size, generator=g) * 2 - 1,
            torch.randint(0, 22, (1, size, size, size), generator=g))


def worker(mode: str, size: int, tile: int, overlap: int) -> dict:
    """One encode+decode in this process; returns time and peak extra memory."""
    from guidegen.models.tiling import tiled_decode, tiled_encode

    model = demo_model()
    ct, labels = inputs(size)
    base = rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "tiled":
            z = tiled_encode(model, ct, labels, tile=tile, overlap=overlap).mode()
            out = tiled_decode(model, z, labels, tile=tile, overlap=overlap)
        else:
            z = model.encode(ct, labels).mode()
            out = model.decode(z, labels)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB → MB on Linux
    assert out.shape == ct.shape
    return {"mode": mode, "size": size, "seconds": round(seconds, 2), "peak_extra_mb": round(peak - base, 1)}


def run_worker(mode: str, size: int, tile: int, overlap: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, str(size), "--tile", str(tile), "--overlap", str(overlap)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"mode": mode, "size": size, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def step_time(steps: int, grid: tuple[int, int, int], disc: bool) -> dict:
    """Mean / min wall seconds of one training step (G + D, like AutoencoderTask) at ``grid``, batch 1.

    Also the process CPU seconds per step (all threads): on a shared machine wall time is
    inflated by other processes, CPU time much less so (``cpu_s / threads`` ≈ the wall time of
    an idle machine when the threads scale well).
    """
    from guidegen.models.autoencoder import hu_to_norm
    from guidegen.training.ae_losses import AutoencoderLoss

    cfg = load_config("demo").autoencoder
    model = demo_model().train()
    loss_fn = AutoencoderLoss.from_config(cfg, grid)
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.AdamW(loss_fn.parameters(), lr=1e-4, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(0)
    ct = hu_to_norm(torch.rand(1, 1, *grid, generator=g) * 3000 - 1000, tuple(cfg.hu_range))
    labels = torch.randint(0, 22, (1, *grid), generator=g)
    step = cfg.disc_start if disc else 0
    times, cpu = [], []
    for i in range(steps + 1):  # the first step warms up allocators and is not counted
        t0, c0 = time.perf_counter(), time.process_time()
        recon, post = model(ct, labels)
        out = loss_fn.generator_loss(recon, ct, post, step, model.last_layer_weight)
        opt_g.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt_g.step()
        if loss_fn.disc_active(step):
            d = loss_fn.discriminator_loss(recon.detach(), ct)
            opt_d.zero_grad(set_to_none=True)
            d["loss"].backward()
            opt_d.step()
        if i:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"grid": list(grid), "with_disc": disc, "steps": steps, "mean_s": round(sum(times) / len(times), 3),
            "min_s": round(min(times), 3), "cpu_s": round(sum(cpu) / len(cpu), 3), "threads": torch.get_num_threads(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "params_ae": sum(p.numel() for p in model.parameters()),
            "params_disc": sum(p.numel() for p in loss_fn.parameters())}


def tiling_error(size: int, tile: int, overlap: int) -> list[dict]:
    from guidegen.models.tiling import receptive_radius, tiled_decode

    rows = []
    for norm in ("channel", "group"):
        model = demo_model(norm)
        g = torch.Generator().manual_seed(1)
        z = torch.randn(1, model.latent_channels, *(size // 4,) * 3, generator=g)
        labels = torch.randint(0, 22, (1, size, size, size), generator=g)
        with torch.inference_mode():
            full = norm_to_hu(model.decode(z, labels))
            tiled = norm_to_hu(tiled_decode(model, z, labels, tile=tile, overlap=overlap))
        err = (tiled - full).abs()
        rows.append({"norm": norm, "size": size, "tile": tile, "overlap": overlap, "receptive_radius": receptive_radius(model),
                     "mean_abs_hu": round(err.mean().item(), 4), "max_abs_hu": round(err.max().item(), 3),
                     "output_std_hu": round(full.std().item(), 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 256])
    ap.add_argument("--max-untiled", type=int, default=256, help="largest size run untiled")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--step-time", action="store_true", help="training step time at the demo grid")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 gives a contention-free CPU time)")
    ap.add_argument("--tiling-error", action="store_true", help="tiled vs untiled error, channel vs group norm")
    args = ap.parse_args()
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.tile, args.overlap)))
        return
    if args.step_time:
        grid = tuple(load_config("demo").data.grid)
        for disc in (False, True):
            print(json.dumps(step_time(args.steps, grid, disc)))
        return
    if args.tiling_error:
        for row in tiling_error(96, args.tile, args.overlap):
            print(json.dumps(row))
        return
    print(f"{'size':>5} {'mode':>8} {'seconds':>8} {'peak MB':>8}   (tile {args.tile}, overlap {args.overlap})")
    for size in args.sizes:
        rows = {}
        for mode in ("untiled", "tiled"):
            if mode == "untiled" and size > args.max_untiled:
                print(f"{size:>5} {mode:>8}  skipped (--max-untiled {args.max_untiled})")
                continue
            r = rows[mode] = run_worker(mode, size, args.tile, args.overlap)
            if "error" in r:
                print(f"{size:>5} {mode:>8}  failed: {r['error']}")
            else:
                print(f"{size:>5} {mode:>8} {r['seconds']:>8.2f} {r['peak_extra_mb']:>8.0f}")
        if all(m in rows and "error" not in rows[m] for m in ("untiled", "tiled")):
            u, t = rows["untiled"], rows["tiled"]
            print(f"{size:>5}   ratio  time ×{t['seconds'] / u['seconds']:.2f}, memory ×{t['peak_extra_mb'] / max(u['peak_extra_mb'], 1):.2f} (tiled/untiled)")


if __name__ == "__main__":
    main()
