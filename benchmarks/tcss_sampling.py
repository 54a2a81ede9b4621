"""Few-step (strided) vs full 1000-step ancestral TCSS sampling: quality and time (issue 6).

For the same prompts and seeds, samples label maps with the strided sampler (``--steps``
network calls each, x2 with guidance) and with full ancestral sampling (T calls), then prints
- the relative Wasserstein-1 distance between the per-organ volume distributions of each
  strided set and the ancestral set (mean and worst organ; target: <= 10 %),
- with ``--floor``, the same distance between two reference sets drawn with different seeds:
  the distance that sampling noise alone gives at this ``--n`` (a strided set cannot be told
  apart from the reference below it), and
- seconds per sample of each arm and the speed-ups, and
- with ``--data DIR`` (e.g. the training set), every arm's organ-volume W1 against that
  dataset's label maps: how far the model, not the few-step sampler, is from the data.

    python benchmarks/tcss_sampling.py [--checkpoint ROOT] [--n 8] [--steps 25 50] [--guidance G]
                                       [--device cuda] [--batch 16] [--floor] [--json F] [--temperature T] [--temper prior] [--host-refill 1] [--churn C] [--window-t 850 --window-share 0.6]
                                       [--reference-steps N]  # compare against N strided steps instead
                                       [--cache DIR] [--shard I/N] [--strided-only] [--cleaned] [--data DIR]

``--reference-steps 25 --steps 50 --floor`` gives, on a CPU, the noise floor of the strided
sampler itself (the 1000-step arm takes ~20 min per sample there).

The 1000-step arm can still be run on a CPU, in pieces: ``--cache DIR`` keeps each finished
batch's volumes (one JSON per sampler setting, batch and seed; written atomically), so a killed
run resumes at the next batch and later runs reuse the reference; ``--shard I/N`` samples only
batches j with j % N == I, so N processes share the work and a final run without ``--shard``
reads them all and prints the comparison. ``--strided-only`` samples only the strided arms into
the cache (a sampler variant, while other processes still build the reference). ``--cleaned``
compares the maps ``generate`` writes (after its cleanup of isolated voxels and stray parts)
rather than the sampled ones, cleaning the maps each cached batch keeps; batches cached before
their maps were kept are sampled again for it.

Prompts are sampled ``--batch`` at a time, batch j with seed j (``--floor``: 10000 + j), so the
arms share their prompts and seeds. Both samplers use the same guidance and findings constraints
(default: the checkpoint's); ``--guidance 1`` halves the cost of the slow arm on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from guidegen.checkpoints import total_train_steps

FLOOR_SEED_OFFSET = 10_000


def sample_volumes(gen, prompts: list[str], steps: int, guidance: float, batch: int, seed_offset: int = 0,
                   cache: Path | None = None, shard: tuple[int, int] = (0, 1),
                   cleaned: bool = False) -> tuple[np.ndarray | None, float]:
    """((N, K) organ volumes in ml, seconds per sample) of ``prompts`` sampled with ``steps`` steps.

    Batch j (prompts j*batch ...) is sampled with seed ``seed_offset + j``. With ``cache``, a
    batch already there is read, not sampled, and a sampled one is written there; batches of
    other shards (j % N != I for ``shard`` (I, N)) are only read. Returns ``None`` volumes while
    some batch is missing. The seconds are those of the batches' own sampling runs.

    A cached batch keeps the volumes of its sampled maps (JSON) and the maps themselves
    (``<name>.maps.npz``, uint8 (B, X, Y, Z)). ``cleaned`` returns the volumes of the maps
    ``generate`` writes instead (after :func:`guidegen.postprocess.clean_label_map`; sampled
    maps hold isolated voxels of small organs, which the raw volumes count), cleaning the kept
    maps each time, so a change of the cleanup is measured without sampling anything (the
    1000-step arm costs ~20 CPU-minutes a map). A cached batch without maps, of an earlier
    version, is sampled again (same seed) for ``cleaned``.
    """
    from benchmarks_common import sampler_tag

    from guidegen.evaluation.metrics import case_stats
    from guidegen.io import atomic_write
    from guidegen.pipeline import prompt_findings

    vols, seconds, missing = [], 0.0, 0
    tag = sampler_tag(gen, steps, guidance)
    for j, start in enumerate(range(0, len(prompts), batch)):
        chunk, seed = prompts[start:start + batch], seed_offset + j
        path = cache / f"{tag}_batch{batch}_seed{seed}.json" if cache else None
        if path is not None and path.is_file():
            done = json.loads(path.read_text())
            if done["prompts"] != chunk:
                raise SystemExit(f"{path}: cached for other prompts; remove it or use another --cache")
            if not cleaned:
                vols += [np.asarray(v) for v in done["volumes_ml"]]
                seconds += done["seconds"]
                continue
            if maps_file(path).is_file():
                with np.load(maps_file(path)) as stored:
                    vols += cleaned_volumes(gen, stored["maps"], chunk)
                seconds += done["seconds"]
                continue
        if j % shard[1] != shard[0]:
            missing += 1
            continue
        t0 = time.perf_counter()
        maps = gen(chunk, [prompt_findings(p) for p in chunk], seed=seed, steps=steps, guidance=guidance, progress=path is not None)
        took = time.perf_counter() - t0  # the maps are numpy: a GPU run has synced
        # rounded as cached (to the µl), so a resumed run gives the same numbers as one in a go
        raw = [case_stats(lab, gen.affine(), gen.label_set).volumes_ml.round(3) for lab in maps]
        if path is not None:
            # the maps first: a batch whose JSON is there always has its maps
            with atomic_write(maps_file(path)) as tmp:
                np.savez_compressed(tmp, maps=np.asarray(maps, dtype=np.uint8))
            with atomic_write(path) as tmp:
                tmp.write_text(json.dumps({"prompts": chunk, "seed": seed, "steps": steps, "seconds": took,
                                           "device": str(gen.device), "threads": torch.get_num_threads(),
                                           "volumes_ml": [v.tolist() for v in raw]}))
            print(f"  {path.name}: {took:.0f} s", flush=True)
        # the cleanup can take longer than a GPU's sampling: only when asked
        vols += cleaned_volumes(gen, maps, chunk) if cleaned else raw
        seconds += took
    if missing:
        return None, float("nan")
    return np.stack(vols), seconds / len(prompts)


def maps_file(batch_json: Path) -> Path:
    """Where a cached batch keeps its sampled maps: ``<name>.maps.npz`` beside ``<name>.json``."""
    return batch_json.with_suffix(".maps.npz")


def cleaned_volumes(gen, maps: np.ndarray, prompts: list[str]) -> list[np.ndarray]:
    """(K,) organ volumes in ml of each of ``maps`` (B, X, Y, Z) after ``generate``'s cleanup
    (:func:`guidegen.postprocess.clean_label_map` with the prompt's requested tumours)."""
    from guidegen.evaluation.metrics import case_stats
    from guidegen.pipeline import prompt_findings
    from guidegen.postprocess import clean_label_map

    out = []
    for lab, prompt in zip(maps, prompts):
        cleaned, _ = clean_label_map(lab, gen.affine(), gen.label_set, prompt_findings(prompt).to_dict()["tumors"])
        out.append(case_stats(cleaned, gen.affine(), gen.label_set).volumes_ml.round(3))
    return out


def volume_shift_line(reference: np.ndarray, other: np.ndarray, class_id: int, organ: str) -> str:
    """Whether an organ's W1 is a shift of its volume or a change of its spread: the two arms'
    means and SDs, and the per-prompt difference (the arms share their prompts, so
    prompt-to-prompt spread cancels) ± its SE."""
    ref, oth = reference[:, class_id], other[:, class_id]
    rel = (oth - ref) / ref.mean()
    se = rel.std(ddof=1) / np.sqrt(len(rel)) if len(rel) > 1 else float("nan")
    sd = (f"SD {oth.std(ddof=1):.1f} vs {ref.std(ddof=1):.1f} ml" if len(rel) > 1 else "SD n/a")
    return (f"{organ}: mean {oth.mean():.1f} ml vs {ref.mean():.1f} ml, {sd}; same prompt, this arm minus the reference: "
            f"{rel.mean():+.1%} ± {se:.1%} (SE) of the reference mean")


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def organ_w1(reference: np.ndarray, other: np.ndarray, label_set) -> dict[str, float]:
    """Relative W1 per organ class (NaN-free: organs absent from the reference are skipped)."""
    from guidegen.evaluation.metrics import relative_w1

    w1 = {label_set.name_of(j): relative_w1(reference[:, j], other[:, j]) for j in label_set.organ_ids}
    return {k: v for k, v in w1.items() if np.isfinite(v)}


def data_w1_lines(volumes: dict[str, np.ndarray], data_root: Path, label_set, worst: int = 4) -> dict[str, dict[str, float]]:
    """Print and return each arm's relative W1 per organ against the label maps of ``data_root``.

    What the sampler arms are compared with otherwise is each other; this says how far the model
    itself is from the data it learned (the temperature, e.g., trades thin classes against each
    other: docs/measurements.md). ``volumes``: arm name → (n, K) ml.
    """
    from guidegen.evaluation.runner import dataset_label_stats

    data = np.stack([stats.volumes_ml for _, stats, _ in dataset_label_stats(data_root, "--data", label_set)])
    out = {}
    for name, vol in volumes.items():
        w1 = organ_w1(data, vol, label_set)
        out[name] = w1
        far = sorted(w1, key=w1.get, reverse=True)[:worst]
        print(f"organ-volume relative W1 against the data ({len(data)} cases), {name}: mean {np.mean(list(w1.values())):.1%}; "
              "farthest " + ", ".join(f"{o} {w1[o]:.1%} ({vol[:, label_set.id_of(o)].mean():.1f} vs {data[:, label_set.id_of(o)].mean():.1f} ml)"
                                      for o in far))
    return out


# the TCSS sampler settings this script can override (benchmarks_common.SAMPLER_OPTIONS)
SAMPLER_ARGS = ["temperature", "temper", "host-refill", "churn", "window-t", "window-share"]


def main() -> None:
    from benchmarks_common import add_sampler_options, apply_sampler_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[50])
    ap.add_argument("--guidance", type=float, default=None, help="default: the checkpoint's tcss.guidance")
    add_sampler_options(ap, SAMPLER_ARGS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1, help="prompts per sampler call")
    ap.add_argument("--floor", action="store_true", help="also draw a second reference set (other seeds)")
    ap.add_argument("--reference-steps", type=int, default=None, help="reference arm's steps (default: all T, ancestral)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cache", type=Path, default=None, help="keep each batch's volumes here and reuse them (resumable)")
    ap.add_argument("--shard", type=parse_shard, default=(0, 1), help="I/N: sample only batches j with j %% N == I")
    ap.add_argument("--cleaned", action="store_true",
                    help="compare the maps generate writes (after its cleanup) instead of the sampled ones")
    ap.add_argument("--strided-only", action="store_true",
                    help="sample only the strided arms into --cache (e.g. a variant while other processes build the reference)")
    ap.add_argument("--data", type=Path, default=None,
                    help="a dataset (e.g. the training set): also print every arm's organ-volume W1 against its label maps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import benchmarks_common  # noqa: F401  (puts benchmarks/ on the path)
    from benchmarks_common import prompts_for
    from guidegen.pipeline import GuideGenPipeline

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint, labels_only=True, device=args.device)
    gen, ls = pipe.labels, pipe.label_set
    T = gen.cfg.tcss.timesteps
    guidance = gen.cfg.tcss.guidance if args.guidance is None else args.guidance
    apply_sampler_options(gen, args, SAMPLER_ARGS)
    prompts = prompts_for(args.n)
    volumes, seconds = {}, {}
    ref_steps = T if args.reference_steps is None else args.reference_steps
    ref = "ancestral" if ref_steps == T else f"reference {ref_steps}"
    arms = [(f"strided {s}", s, 0) for s in args.steps if s != ref_steps] + [(ref, ref_steps, 0)]
    if args.floor:
        arms.append((f"{ref}, other seeds", ref_steps, FLOOR_SEED_OFFSET))
    if args.shard != (0, 1) and args.cache is None:
        raise SystemExit("--shard needs --cache: the shards meet in the cache")
    if args.strided_only:
        if args.cache is None:
            raise SystemExit("--strided-only needs --cache: a later run compares the cached arms")
        arms = [arm for arm in arms if arm[1] != ref_steps]
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    for name, steps, offset in arms:
        volumes[name], seconds[name] = sample_volumes(gen, prompts, steps, guidance, args.batch, offset, args.cache, args.shard,
                                                      cleaned=args.cleaned)
        print(f"{name}: " + (f"{seconds[name]:.2f} s/sample" if volumes[name] is not None else "batches of other shards missing"),
              flush=True)
    if args.strided_only:
        print("strided arms cached; run again without --strided-only to compare them with the reference")
        return
    if any(v is None for v in volumes.values()):
        print(f"shard {args.shard[0]}/{args.shard[1]} done; run again without --shard once every shard has finished")
        return

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {gen.device}, "
          f"{args.threads} threads, batch {args.batch}")
    print(f"checkpoint {pipe.checkpoint_root} (TCSS {total_train_steps(gen.meta)} steps), {args.n} prompts, guidance {guidance}, "
          f"temperature {gen.temperature} (on {'the prior' if gen.temper_prior_only else 'all logits'}), few-step churn {gen.churn}, early window {gen.window_share:.0%} of the visits above t = {gen.window_t}; volumes of the " + ("cleaned maps (as generate writes them)" if args.cleaned else "sampled maps"))
    results = {"n": args.n, "cleaned": args.cleaned, "guidance": guidance, "temperature": gen.temperature, "temper_prior_only": gen.temper_prior_only, "churn": gen.churn, "window_t": gen.window_t, "window_share": gen.window_share, "device": str(gen.device),
               "tcss_train_steps": total_train_steps(gen.meta), "reference": ref, "seconds_per_sample": seconds, "w1": {},
               "organs": [ls.name_of(j) for j in ls.organ_ids],
               "volumes_ml": {k: v[:, ls.organ_ids].round(3).tolist() for k, v in volumes.items()}}
    for name in volumes:
        if name == ref:
            continue
        w1 = organ_w1(volumes[ref], volumes[name], ls)
        worst = max(w1, key=w1.get)
        results["w1"][name] = w1
        floor = name.endswith("other seeds")
        print(f"organ-volume relative W1, {name} vs {ref} ({ref_steps} steps): mean {np.mean(list(w1.values())):.1%}, "
              f"worst {worst} {w1[worst]:.1%}" + ("  (sampling-noise floor at this n)" if floor else "  (target <= 10 %)"))
        for organ in [o for o in w1 if w1[o] > 0.10] or [worst]:
            print("    " + volume_shift_line(volumes[ref], volumes[name], ls.id_of(organ), organ))
    if args.data is not None:
        results["w1_vs_data"] = data_w1_lines(volumes, args.data, ls)
    for name in volumes:
        if name.startswith("strided"):
            print(f"time per sample: {name} {seconds[name]:.2f} s, {ref} {seconds[ref]:.2f} s, "
                  f"speed-up x{seconds[ref] / seconds[name]:.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
