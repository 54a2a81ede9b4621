"""When in the reverse process does x_t fix each organ's volume? (issue 6, few-step sampling)

Takes label maps a sampler drew (the ``.maps.npz`` that ``tcss_sampling.py --cache`` keeps per
batch), noises each to x_t ~ q(x_t | x_0) for a list of t, and asks the TCSS network once per
(map, t) for p(x_0 | x_t) with the map's own prompt. Per organ it prints, over the maps,

- r: the correlation between the expected volume ``sum_v p(x_0 = organ | x_t)`` and the map's
  true volume: near 0 where x_t does not yet say how large the organ is, near 1 once it does;
- sd: the spread of the expected volumes over the spread of the true ones (the share of the
  volume's variability that x_t already carries).

The t range where r climbs is where a sampler decides an organ's size; a few-step sampler that
under-disperses an organ's volume does it there. Only the network is asked (no guidance, no
temperature, no findings constraints): this is what x_t carries, not how a sampler follows it.

    python benchmarks/tcss_decision_window.py --cache benchmarks/results/tcss_sampling \
        --name tcss2846_steps1000_g1.0_gate1.0_vol1.0_pool3_temp0.6prior_lesionscale_batch2 --batches 6 \
        [--t 950 900 850 800 750 700 600 500 300] [--organs urinary_bladder heart ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

DEFAULT_T = (950, 900, 850, 800, 750, 700, 650, 600, 500, 400, 300, 200, 100)
DEFAULT_ORGANS = ("urinary_bladder", "heart", "stomach", "liver", "adrenal_gland", "gallbladder")


def load_cached_maps(cache: Path, name: str, batches: int) -> tuple[np.ndarray, list[str]]:
    """(N, X, Y, Z) uint8 maps and their N prompts from batches ``<name>_seed0..batches-1``."""
    maps, prompts = [], []
    for seed in range(batches):
        path = cache / f"{name}_seed{seed}.json"
        npz = path.with_suffix(".maps.npz")
        if not npz.is_file():
            raise SystemExit(f"{npz}: no kept maps for this batch (tcss_sampling.py keeps them since session 28)")
        prompts += json.loads(path.read_text())["prompts"]
        with np.load(npz) as stored:
            maps.append(stored["maps"])
    return np.concatenate(maps), prompts


@torch.no_grad()
def expected_volumes(net_fn, maps: torch.Tensor, context: torch.Tensor, t: int, alphas_bar: torch.Tensor,
                     num_classes: int, class_ids: list[int], generator: torch.Generator, batch: int = 2) -> torch.Tensor:
    """(N, len(class_ids)) expected voxel counts ``sum_v p(x_0 = c | x_t)`` with x_t ~ q(x_t | maps).

    Args:
        net_fn: ``(xt_onehot (B, K, X, Y, Z), t (B,), context (B, L, D)) -> x_0 logits (B, K, X, Y, Z)``.
        maps: (N, X, Y, Z) long class indices.  context: (N, L, D), row i for map i.
    """
    from guidegen.diffusion import categorical as cat

    out = []
    for start in range(0, maps.shape[0], batch):
        x0 = maps[start:start + batch]
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        xt = cat.q_sample(x0, tt, alphas_bar, num_classes, generator=generator)
        probs = net_fn(cat.one_hot(xt, num_classes), tt, context[start:start + batch]).float().softmax(1)
        out.append(torch.stack([probs[:, c].flatten(1).sum(1) for c in class_ids], 1))
    return torch.cat(out)


def readability(expected: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(r, sd ratio) of expected against true volumes over maps: (N,) each."""
    if true.std() == 0 or expected.std() == 0:
        return float("nan"), float(expected.std() / true.std()) if true.std() > 0 else float("nan")
    return float(np.corrcoef(expected, true)[0, 1]), float(expected.std(ddof=1) / true.std(ddof=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--cache", type=Path, required=True, help="tcss_sampling.py's --cache directory")
    ap.add_argument("--name", required=True, help="batch file name before _seedJ (sampler tag and _batchB)")
    ap.add_argument("--batches", type=int, required=True, help="use batches seed0 .. seed{batches-1}")
    ap.add_argument("--t", type=int, nargs="+", default=list(DEFAULT_T))
    ap.add_argument("--organs", nargs="+", default=list(DEFAULT_ORGANS))
    ap.add_argument("--seed", type=int, default=0, help="seed of the forward noise")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from guidegen.pipeline import GuideGenPipeline, prompt_findings

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint, labels_only=True, device="cpu")
    gen, ls = pipe.labels, pipe.label_set
    timesteps = gen.alphas_bar.shape[0] - 1
    if any(not 1 <= t <= timesteps for t in args.t):
        raise SystemExit(f"--t: every t must be in 1..{timesteps}")
    unknown = [o for o in args.organs if o not in ls.names]
    if unknown:
        raise SystemExit(f"--organs: not in the label set: {', '.join(unknown)}")
    maps_np, prompts = load_cached_maps(args.cache, args.name, args.batches)
    maps = torch.as_tensor(maps_np).long()
    ids = [ls.id_of(o) for o in args.organs]
    true = np.stack([(maps_np == c).reshape(len(maps_np), -1).sum(1) for c in ids], 1).astype(float)
    cond = gen.conditioner.prepare(prompts, [prompt_findings(p) for p in prompts])
    with torch.no_grad():  # the conditioner's tensors are inference tensors
        context = gen.model.context(cond["tokens"], cond["mask"], cond["findings_vec"])
    noise = torch.Generator().manual_seed(args.seed)
    print(f"{len(prompts)} maps of {args.name}; per organ: r (expected vs true volume over the maps) / sd ratio")
    print("t     " + "  ".join(f"{o[:14]:>16s}" for o in args.organs))
    for t in sorted(args.t, reverse=True):
        e = expected_volumes(gen.model.net, maps, context, t, gen.alphas_bar, ls.num_classes, ids, noise).numpy()
        cells = [readability(e[:, k], true[:, k]) for k in range(len(ids))]
        print(f"{t:<5d} " + "  ".join(f"{r:+6.2f} / {sd:5.2f}  " for r, sd in cells), flush=True)


if __name__ == "__main__":
    main()
