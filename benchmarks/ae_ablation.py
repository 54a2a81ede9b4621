"""Autoencoder ablation at equal training steps (issue 7): full vs (a) no label injection vs
(b) no random-window loss (full-range L1 + KL + GAN only).

Trains the three variants of the config's autoencoder for ``--steps`` steps each on the same
data and seed, then evaluates each like benchmarks/ae_eval.py on unseen phantom seeds and prints
tumour mean-HU error and soft-tissue MAE inside the organs (the full model should win on both).

    python benchmarks/ae_ablation.py --data DATASET [--config demo] [--steps 1000] [--n 20] [--work DIR]
                                     [--variants full "no label injection"]  # only these variants
                                     [--seed S] [--json F]
    python benchmarks/ae_ablation.py --merge F [F ...]   # runs of several seeds: per seed and mean

The tumour error of one 1000-step run varies by several HU between seeds (a few small lesions
carry much of it), so one seed cannot rank two close variants; ``--merge`` prints every seed and,
for each ablation, the mean over the seeds that ran both it and the full model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

VARIANTS = {
    "full": {},
    "no label injection": {"inject_labels": False, "label_readout": False},  # the readout reads the labels too
    "no random-window loss": {"window_weight": 0.0, "ssim_weight": 0.0},
}


def evaluate_ae(ckpt: Path, n: int) -> tuple[float, float]:
    """(soft-tissue MAE inside organs, |tumour mean-HU error|) over phantom seeds 0..n-1."""
    from guidegen.data.latents import load_autoencoder
    from guidegen.data.phantom import render_phantom
    from guidegen.labels import load_label_set
    from guidegen.reconstruct import WINDOWS_HU, reconstruct_volume, windowed_mae

    ae, cfg, _ = load_autoencoder(ckpt)
    ls = load_label_set(cfg.data.label_set)
    organ, tumour = [], []
    for seed in range(n):
        case = render_phantom(seed, tuple(cfg.data.grid))
        ct = case.ct.astype(np.float32)
        rec = reconstruct_volume(ae, ct, case.labels, tuple(cfg.autoencoder.hu_range))
        organ.append(windowed_mae(ct, rec, WINDOWS_HU["soft_tissue"], np.isin(case.labels, ls.organ_ids)))
        m = case.labels == ls.tumor_id
        if m.any():
            tumour.append(abs(float(rec[m].mean() - ct[m].mean())))
    return float(np.mean(organ)), float(np.mean(tumour))


def full_wins(rows: dict) -> bool:
    """True when "full" has the lower soft-tissue MAE and tumour error than every other variant."""
    full = rows["full"]
    return all(full[0] < r[0] and full[1] < r[1] for name, r in rows.items() if name != "full")


def paired_p(full: list[tuple[float, float]], ablated: list[tuple[float, float]]) -> tuple[float, float]:
    """Two-sided paired t-test p-values (MAE, tumour error) of full vs ablated over seeds.

    Each seed trains both variants from the same initialisation and data order, so the per-seed
    difference removes the seed's own luck; NaN with fewer than two seeds or no spread.
    """
    from scipy.stats import ttest_1samp

    diff = np.asarray(ablated, dtype=float).reshape(-1, 2) - np.asarray(full, dtype=float).reshape(-1, 2)
    return tuple(float(ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.ptp(d) > 0 else float("nan") for d in diff.T)


def merge_runs(results: list[dict]) -> tuple[dict, dict]:
    """Group ``--json`` results by seed and compare "full" with each ablation over shared seeds.

    Returns ({seed: {variant: (mae, tumour)}}, {ablation: {"seeds": [...], "full": (mae, tumour),
    "ablated": (mae, tumour), "seed_wins": k, "paired_p": (p_mae, p_tumour)}}), where the means are
    over the seeds that ran both "full" and that ablation, ``seed_wins`` counts the seeds where
    "full" is lower on both and ``paired_p`` is :func:`paired_p` over those seeds.
    Every file must share ``steps`` and ``n`` (else ValueError).
    """
    if not results:
        raise ValueError("no results to merge")
    for key in ("steps", "n"):
        values = {r[key] for r in results}
        if len(values) > 1:
            raise ValueError(f"cannot merge runs with different {key}: {sorted(values)}")
    by_seed: dict = {}
    for r in results:
        for name, v in r["rows"].items():
            by_seed.setdefault(r["seed"], {})[name] = (v["soft_tissue_mae"], v["tumour_error"])
    by_seed = {seed: dict(sorted(rows.items(), key=lambda kv: list(VARIANTS).index(kv[0]))) for seed, rows in by_seed.items()}
    compared = {}
    for name in (v for v in VARIANTS if v != "full"):
        seeds = [seed for seed, rows in by_seed.items() if "full" in rows and name in rows]
        if not seeds:
            continue
        full, ablated = (np.mean([by_seed[s][v] for s in seeds], axis=0) for v in ("full", name))
        wins = sum(full_wins({"full": by_seed[s]["full"], name: by_seed[s][name]}) for s in seeds)
        compared[name] = {"seeds": seeds, "full": tuple(map(float, full)), "ablated": tuple(map(float, ablated)), "seed_wins": wins,
                          "paired_p": paired_p([by_seed[s]["full"] for s in seeds], [by_seed[s][name] for s in seeds])}
    return by_seed, compared


def read_run(path: str) -> dict:
    """One ``--json`` file of this script, checked; a bad file raises a one-line ValueError naming it."""
    try:
        run = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    rows = run.get("rows") if isinstance(run, dict) else None
    fields = {"soft_tissue_mae", "tumour_error"}
    if (not isinstance(rows, dict) or not {"steps", "n", "seed"} <= set(run)
            or any(name not in VARIANTS or not isinstance(row, dict) or not fields <= set(row) for name, row in rows.items())):
        raise ValueError(f"{path}: not an ae_ablation.py --json file (needs steps, n, seed and rows of "
                         f"{', '.join(VARIANTS)} with {' and '.join(sorted(fields))})")
    return run


def print_merged(paths: list[str]) -> None:
    """Per-seed rows, then full vs each ablation (means, seed wins, paired p) of ``--json`` files."""
    results = [read_run(p) for p in paths]
    by_seed, compared = merge_runs(results)
    order = sorted(by_seed, key=str)
    print(f"{results[0]['steps']} steps each, {results[0]['n']} unseen phantom cases, seeds {order}")
    print(f"{'seed':<8}{'variant':<24}{'soft-tissue MAE in organs':>28}{'tumour mean-HU error':>24}")
    for seed in order:
        for name, (mae, tum) in by_seed[seed].items():
            print(f"{seed!s:<8}{name:<24}{mae:>25.1f} HU{tum:>21.1f} HU")
    for name, c in compared.items():
        (fm, ft), (am, at) = c["full"], c["ablated"]
        pm, pt = c["paired_p"]
        print(f"full vs {name}, mean over seeds {c['seeds']}: MAE {fm:.1f} vs {am:.1f} HU, tumour {ft:.1f} vs {at:.1f} HU; "
              f"full better on both: on the mean {fm < am and ft < at}, on {c['seed_wins']} of {len(c['seeds'])} seeds; "
              f"paired t-test over seeds p = {pm:.2g} (MAE), {pt:.2g} (tumour)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="training set (required unless --merge)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--work", default="runs/ae_ablation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=None, help="autoencoder.train.seed for every variant")
    ap.add_argument("--batch-size", type=int, default=None, help="autoencoder.train.batch_size for every variant")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--merge", nargs="+", default=None, help="print the summary of these --json files (several seeds)")
    args = ap.parse_args()
    if args.merge:
        try:
            print_merged(args.merge)
        except ValueError as e:
            sys.exit(f"ae_ablation --merge: {e}")
        return
    if args.data is None:
        ap.error("--data is required unless --merge is given")
    torch.set_num_threads(args.threads)

    from guidegen.config import dump_config, load_config
    from guidegen.training.run import run_training

    base = yaml.safe_load(dump_config(load_config(args.config)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.variants:
        override = VARIANTS[name]
        raw = yaml.safe_load(yaml.safe_dump(base))
        raw["autoencoder"].update(override)
        raw["autoencoder"]["train"]["max_steps"] = args.steps
        for key, value in (("seed", args.seed), ("batch_size", args.batch_size)):
            if value is not None:
                raw["autoencoder"]["train"][key] = value
        cfg_path = work / f"{name.replace(' ', '_')}.yaml"
        cfg_path.write_text(yaml.safe_dump(raw))
        export = run_training("autoencoder", cfg_path, args.data, work / name.replace(" ", "_"), max_steps=args.steps)
        trained = json.loads((export / "meta.json").read_text())["train_steps"]
        if trained < args.steps:  # stopped (SIGTERM, Ctrl-C): the export is a partial run, not a result
            sys.exit(f"{name}: training stopped at step {trained} of {args.steps}; not scored. "
                     f"Run the same command again to resume it.")
        rows[name] = evaluate_ae(export, args.n)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.steps} steps each, config {args.config}, seed {args.seed}, batch size {args.batch_size}, "
          f"{args.n} unseen phantom cases")
    print(f"{'variant':<24}{'soft-tissue MAE in organs':>28}{'tumour mean-HU error':>24}")
    for name, (mae, tum) in rows.items():
        print(f"{name:<24}{mae:>25.1f} HU{tum:>21.1f} HU")
    if "full" in rows and len(rows) > 1:
        print(f"full model better on both metrics than each ablation run here: {full_wins(rows)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size, "n": args.n,
                       "rows": {k: {"soft_tissue_mae": v[0], "tumour_error": v[1]} for k, v in rows.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
