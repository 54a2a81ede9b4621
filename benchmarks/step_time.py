"""Seconds per training step and peak GPU memory of one stage at a config's real grid (batch 1).

Checks ``benchmarks/memory.py``'s estimate on the GPU itself: builds the stage's networks from
the config (its ``mixed_precision`` and ``gradient_checkpointing``), runs ``--steps`` AdamW
steps on random inputs of the stage's training grid after ``--warmup`` untimed ones, and
prints the median s/step and ``torch.cuda.max_memory_allocated`` (weights, gradients, AdamW
moments and activations; no EMA copy, no DDP buckets: add 8 B per parameter for those).

    python benchmarks/step_time.py --config torso-128 --stage tcss
    python benchmarks/step_time.py --config torso-128 --stage ldm --no-checkpointing --precision no
    python benchmarks/step_time.py --config demo --stage tcss --grid 32,32,32 --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import memory as mem  # benchmarks/memory.py (run from the repository root or benchmarks/)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="torso-128")
    ap.add_argument("--stage", choices=mem.STAGES, default="tcss")
    ap.add_argument("--grid", default=None, help="override the stage's training grid (X,Y,Z), e.g. for a CPU smoke run")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["config", "no", "bf16"], default="config")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    cfg = mem.load_config(args.config)
    label_set = mem.load_label_set(cfg.data.label_set)
    train = getattr(cfg, args.stage).train
    cfg = mem.with_train(cfg, args.stage, train.gradient_checkpointing and not args.no_checkpointing)
    precision = train.mixed_precision if args.precision == "config" else args.precision
    grid = mem.parse_probe(args.grid) if args.grid else mem.stage_grid(args.stage, cfg)
    device = torch.device(args.device)
    modules = {k: m.to(device).train() for k, m in mem.build_stage(args.stage, cfg, label_set, grid).items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> float:
        t0 = time.perf_counter()
        with amp():
            loss = mem.loss_on(args.stage, cfg, label_set, modules, grid, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{cfg.name} {args.stage}: grid {list(grid)}, batch 1, {sum(p.numel() for p in params) / 1e6:.1f} M params, "
          f"precision {precision}, checkpointing {'on' if getattr(cfg, args.stage).train.gradient_checkpointing else 'off'}, {name}")
    print(f"  {statistics.median(times):.3f} s/step (median of {len(times)})")
    if device.type == "cuda":
        print(f"  peak allocated {torch.cuda.max_memory_allocated(device) / mem.GB:.2f} GB, "
              f"reserved {torch.cuda.max_memory_reserved(device) / mem.GB:.2f} GB")


if __name__ == "__main__":
    main()
