"""Stage-1 (TCSS) fidelity of a checkpoint on prompts unlike the training reports (issue 6).

Prints, over N prompts (tumour site, side and size drawn from a seeded list, phrased in
clinical styles that the phantom's report templates do not use):
- tumour placement, site-blind: the model's largest tumour region touches / lies in the
  requested organ (and side) - the number the >= 90 % target is read against; and, leniently,
  whether any tumour region does (a model that scatters fragments everywhere passes that one);
- size accuracy: equivalent-sphere diameter of that region within ±50 % of the request;
- organ presence: >= 18 of the 19 organ groups;
- anatomical order: lungs above liver, bladder lowest, heart between the lungs;
- speckle: the share of labelled voxels unlike all 6 neighbours (next to the same figure for
  real phantom cases, where thin ribs give some).
and, to calibrate the placement test itself (its ceiling and how lenient it is):
- the same test on *real* phantom cases rendered with each prompt's tumour (site, side, size;
  seeds from 700000): a large lesion replaces most of a small host such as the pancreas, so
  its shell holds little of that organ even in real data;
- chance: how often the model's largest region passes the test for the *other* sites of the
  prompt list (a test that anything passes would show a high rate here).
Each rate is given for the model's raw output and after the cleanup that ``guidegen generate``
applies by default (guidegen.postprocess: the tumour regions that match no requested tumour,
detached parts of organs with a fixed number of parts, then isolated voxels). The cleanup selects by the requested site, so after it the two placement
rows agree by construction: the site-blind row of the raw output is the model's own placement.

    python benchmarks/tcss_eval.py [--checkpoint ROOT] [--n 50] [--steps 50] [--guidance 2.0] [--temperature T] [--temper prior]
                                   [--no-injection]  # ablation: no parsed knowledge (see below)
                                   [--shard I/N --json F]  # prompts i with i % N == I, rows to F
    python benchmarks/tcss_eval.py --merge F1 F2 ...  # the summary of sharded runs
    python benchmarks/tcss_eval.py --compare A1 A2 ... --vs B1 B2 ...  # arm B against arm A, paired by prompt
    add --maps DIR to keep the raw maps: a second run with the same settings only re-scores them
    add --prompt-seed S (S != 12345) to tune a sampler setting on other prompts than the reported ones

Knowledge-injection ablation (``--no-injection``): the parsed findings reach the model twice,
as the findings vector (memory tokens of the injection module) and as the canonical findings
sentence that leads the encoded text (guidegen.text.knowledge.text_for_encoding); the two are
redundant, and zeroing only the vector changed nothing (session notes). The ablation removes
both: the encoder reads the raw report alone and the vector is zero. It is done at sampling
time on the same checkpoint, so it also measures how much the model leans on that knowledge.

``--compare`` answers "does setting B raise placement over A?" for two runs on the same prompts and
seeds (say guidance 1.0 and 4.0): each prompt is a pair of outcomes, so it counts the prompts only
B places and only A places and gives the exact McNemar p-value (a two-sided binomial test on
those discordant pairs), for the raw and the cleaned map.

Runs on the CPU unless ``--device`` says otherwise; prints the machine, settings and the four rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from guidegen.checkpoints import total_train_steps

PROMPT_SEED = 12345  # the prompt list every reported rate is measured on
REAL_SEED = 700_000  # real phantom cases rendered with the prompts' tumours (never used in training)
SITES = [("liver", None), ("kidney", "left"), ("kidney", "right"), ("lung", "left"), ("lung", "right"),
         ("pancreas", None), ("spleen", None), ("colon", None), ("stomach", None)]
STYLES = [
    "{age} y/o {sex_word}. CT chest/abdomen/pelvis: {size_txt} lesion involving the {organ_txt}.",
    "Pt is a {sex_word}, aged {age}; known {organ_txt} neoplasm approx {size_txt}.",
    "IMPRESSION: {organ_txt} mass ({size_txt}). {Sex} {age}.",
    "{Sex}, {age}yo -- solitary {organ_txt} tumour measuring {size_txt}",
    "Findings: {size_txt} enhancing mass arising from the {organ_txt} in a {age}-year-old {sex_word}.",
]
ORGAN_TXT = {"liver": "liver", "kidney": "{side} kidney", "lung": "{side} lung", "pancreas": "pancreatic head",
             "spleen": "spleen", "colon": "sigmoid colon", "stomach": "gastric"}


def make_prompts(n: int, seed: int = PROMPT_SEED) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        site, side = SITES[i % len(SITES)]
        size_mm = float(rng.integers(25, 56))
        male = bool(rng.integers(2))
        size_txt = f"{size_mm / 10:.1f} cm" if rng.random() < 0.5 else f"{size_mm:.0f} mm"
        text = STYLES[i % len(STYLES)].format(age=int(rng.integers(35, 85)), sex_word="man" if male else "woman",
                                              Sex="Male" if male else "Female", size_txt=size_txt,
                                              organ_txt=ORGAN_TXT[site].format(side=side))
        out.append((text, {"site": site, "side": side, "size_mm": size_mm}))
    return out


# the TCSS sampler settings this script can override (benchmarks_common.SAMPLER_OPTIONS)
SAMPLER_ARGS = ["temperature", "temper", "lesion-scale", "host-refill", "window-t", "window-share"]


def main() -> None:
    from benchmarks_common import add_sampler_options, apply_sampler_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--prompt-seed", type=int, default=PROMPT_SEED,
                    help=f"draw the prompt list with this seed (default {PROMPT_SEED}, the reported set); "
                         "tune sampler settings on another seed, then report on the default one")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--no-injection", action="store_true", help="knowledge-injection ablation: raw report only, findings vector zeroed")
    ap.add_argument("--site-gate", type=float, default=None, help="tumour-site gate strength (default: the checkpoint's tcss.site_gate)")
    ap.add_argument("--size-guidance", type=float, default=None, help="tumour volume matching strength (default: the checkpoint's tcss.size_guidance)")
    add_sampler_options(ap, SAMPLER_ARGS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (the maps are scored on the CPU)")
    ap.add_argument("--json", default=None, help="also write the settings and per-sample results here")
    ap.add_argument("--shard", default="0/1", help="I/N: evaluate only the prompts i with i %% N == I")
    ap.add_argument("--merge", nargs="+", default=None, help="print the summary of these --json files")
    ap.add_argument("--compare", nargs="+", default=None, help="--json files of arm A (shards) for a paired comparison with --vs")
    ap.add_argument("--vs", nargs="+", default=None, help="--json files of arm B, same prompts and seeds as --compare")
    ap.add_argument("--maps", default=None, help="cache the raw sampled maps here (one folder per sampler setting), "
                                                  "so a cleanup change is re-scored without sampling again")
    args = ap.parse_args()
    if args.compare or args.vs:
        if not (args.compare and args.vs):
            ap.error("--compare and --vs go together")
        try:
            print_comparison(args.compare, args.vs)
        except ValueError as e:
            sys.exit(f"tcss_eval --compare: {e}")
        except KeyError as e:  # rows of an older tcss_eval.py
            sys.exit(f"tcss_eval --compare: the rows have no {e} field (written by an older tcss_eval.py?)")
        return
    if args.merge:
        runs = [json.load(open(f)) for f in args.merge]
        settings = runs[0]["settings"] | {"reused_maps": sum(run["settings"].get("reused_maps", 0) for run in runs)}
        summarize(settings, [r for run in runs for r in run["rows"]], sum(run["seconds"] for run in runs))
        return
    shard, shards = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(args.threads)

    from guidegen.data.phantom import TumorSpec, render_phantom, sample_spec
    from guidegen.evaluation.metrics import case_stats, isolated_fraction, match_tumors
    from guidegen.pipeline import GuideGenPipeline, prompt_findings
    from guidegen.postprocess import clean_label_map

    pipe = GuideGenPipeline.from_pretrained(args.checkpoint, labels_only=True, device=args.device)
    gen, ls = pipe.labels, pipe.label_set
    if args.no_injection:
        gen.conditioner.mode = "raw"  # no canonical findings sentence before the report
        prepare = gen.conditioner.prepare

        def no_findings(texts, findings=None):
            cond = prepare(texts, findings)
            cond["findings_vec"] = torch.zeros_like(cond["findings_vec"])
            return cond

        gen.conditioner.prepare = no_findings
        args.site_gate = args.size_guidance = 0.0  # both read the parsed findings, which this arm withholds
    guidance = gen.cfg.tcss.guidance if args.guidance is None else args.guidance
    if args.site_gate is not None:
        gen.site_gate = args.site_gate
    if args.size_guidance is not None:
        gen.size_guidance = args.size_guidance
    apply_sampler_options(gen, args, SAMPLER_ARGS)
    rows, reused = [], 0
    maps = None
    if args.maps:
        from benchmarks_common import sampler_tag

        maps = Path(args.maps) / (sampler_tag(gen, args.steps, guidance)
                                  + f"{'_noinject' if args.no_injection else ''}"
                                  f"{'' if args.prompt_seed == PROMPT_SEED else f'_prompts{args.prompt_seed}'}")
        maps.mkdir(parents=True, exist_ok=True)

    def largest_placed(st, request: dict) -> dict:
        """Site-blind: the match of ``request`` against the largest tumour region alone."""
        largest = max(st.tumors, key=lambda c: c.voxels, default=None)
        return match_tumors([request], dataclasses.replace(st, tumors=[largest] if largest else []), ls)[0]

    t0 = time.perf_counter()
    for i, (text, want) in enumerate(make_prompts(args.n, args.prompt_seed)):
        if i % shards != shard:
            continue
        f = prompt_findings(text)
        cached = maps / f"{i}.npy" if maps else None
        if cached is not None and cached.is_file():
            lab, reused = np.load(cached), reused + 1
        else:
            lab = gen([text], [f], seed=i, steps=args.steps, guidance=guidance)[0]
            if cached is not None:
                np.save(cached.with_suffix(".tmp.npy"), lab)
                cached.with_suffix(".tmp.npy").replace(cached)

        def score(labels: np.ndarray) -> dict:
            st = case_stats(labels, gen.affine(), ls)
            m = match_tumors([want], st, ls)[0]
            lm = largest_placed(st, want)
            others = [{"site": s, "side": side} for s, side in SITES if s != want["site"]]
            return {"placed": m["placed"], "size_ok": bool(m["size_ok"]), "measured_mm": m["measured_mm"],
                    "largest_placed": lm["placed"], "largest_size_ok": bool(lm["size_ok"]),
                    "chance": float(np.mean([largest_placed(st, o)["placed"] for o in others])),
                    "organs": int(sum(st.volumes_ml[j] > 0 for j in ls.organ_ids)),
                    "order_ok": all(v is True for v in st.order.values()), "isolated": isolated_fraction(labels)}

        # the placement test on a real phantom case carrying the prompt's tumour (same grid)
        seed = REAL_SEED + i
        real = render_phantom(seed, gen.grid, sample_spec(np.random.default_rng(seed), tumors=[TumorSpec(**want)]))
        real_placed = largest_placed(case_stats(real.labels, real.affine, ls), want)["placed"]
        rows.append({"prompt": text, "site": want["site"], "parsed_ok": bool(f.tumors and f.tumors[0].site == want["site"]),
                     "requested_mm": want["size_mm"], "real_largest_placed": real_placed, **score(lab),
                     "cleaned": score(clean_label_map(lab, gen.affine(), ls, f.to_dict()["tumors"])[0])})
    secs = time.perf_counter() - t0
    settings = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, device {gen.device}",
                "checkpoint": f"{pipe.checkpoint_root} (TCSS {total_train_steps(gen.meta)} steps)", "prompts": args.n,
                "prompt_seed": args.prompt_seed, "steps": args.steps, "guidance": guidance, "injection": not args.no_injection, "site_gate": gen.site_gate,
                "size_guidance": gen.size_guidance, "size_guidance_pool": gen.cfg.tcss.size_guidance_pool,
                "site_gate_lesion_scale": gen.site_gate_lesion_scale, "host_refill": gen.host_refill,
                "temperature": gen.temperature, "temper_prior_only": gen.temper_prior_only,
                "window_t": gen.window_t, "window_share": gen.window_share,
                "reused_maps": reused, "isolated_real": float(np.mean([isolated_fraction(render_phantom(s, gen.grid).labels) for s in range(5)]))}
    summarize(settings, rows, secs)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": settings, "seconds": secs, "rows": rows}, fh, indent=1)


def summarize(settings: dict, rows: list[dict], secs: float) -> None:
    """Print the four rates (and parse rate, speckle, time) over ``rows``: raw output | after cleanup."""
    cols = [("raw", rows)] + ([("cleaned", [r["cleaned"] for r in rows])] if all("cleaned" in r for r in rows) else [])

    def line(name: str, value, target: str = "") -> None:
        print(f"{name:<40}" + "".join(f"{value(rs):>10}" for _, rs in cols) + (f"   ({target})" if target else ""))

    rate = lambda key: lambda rs: f"{np.mean([r[key] for r in rs]):.1%}"  # noqa: E731
    print(f"machine: {settings['machine']}")
    print(f"checkpoint: {settings['checkpoint']}, prompts {len(rows)} of {settings['prompts']} "
          f"(prompt seed {settings.get('prompt_seed', PROMPT_SEED)}), "
          f"sampler steps {settings['steps']}, guidance {settings['guidance']}, "
          f"knowledge injection {'on' if settings['injection'] else 'off'}, site gate {settings.get('site_gate', 0.0)}"
          f"{' at lesion scale' if settings.get('site_gate_lesion_scale') else ''}, "
          f"size guidance {settings.get('size_guidance', 0.0)} (pool {settings.get('size_guidance_pool', 1)}"
          f"{', host refill' if settings.get('host_refill') else ''}), "
          f"temperature {settings.get('temperature', 1.0)}{' (on the prior)' if settings.get('temper_prior_only') else ''}"
          + (f", early window {settings['window_share']:.0%} of the visits above t = {settings['window_t']}"
             if settings.get("window_t") and settings.get("window_share") else ""))
    print(f"{'':<40}" + "".join(f"{name:>10}" for name, _ in cols))
    print(f"{'prompt parsed to the requested site':<40}{np.mean([r['parsed_ok'] for r in rows]):>10.1%}")
    if all("largest_placed" in r for _, rs in cols for r in rs):
        line("largest tumour region in requested organ", rate("largest_placed"), "target >= 90 %; site-blind")
        line("  and its size within ±50 %", rate("largest_size_ok"), "target >= 80 %")
    if all("chance" in r for _, rs in cols for r in rs):
        line("  ... at another site of the list (chance)", rate("chance"), "the test's leniency")
    if all("real_largest_placed" in r for r in rows):
        missed = sorted({r["site"] for r in rows if not r["real_largest_placed"]})
        print(f"{'  ... on real phantom cases, same tumours':<40}{np.mean([r['real_largest_placed'] for r in rows]):>10.1%}"
              f"   (the test's ceiling; missed: {', '.join(missed) or 'none'})")
    line("some tumour region in requested organ", rate("placed"), "lenient: any fragment")
    line("  the largest such region's size ±50 %", rate("size_ok"))
    line(">= 18 organ groups present", lambda rs: f"{np.mean([r['organs'] >= 18 for r in rs]):.1%}", "target >= 90 %")
    line("anatomical order holds", rate("order_ok"), "target >= 95 %")
    if "isolated" in rows[0]:
        line("speckle (voxels unlike all 6 neighbours)", lambda rs: f"{np.mean([r['isolated'] for r in rs]):.2%}",
             f"real phantom cases: {settings['isolated_real']:.2%}")
    reused = f"; {settings['reused_maps']} maps read from --maps, not sampled" if settings.get("reused_maps") else ""
    print(f"time: {secs:.0f} s of compute ({secs / len(rows):.1f} s/sample{reused})")


def mcnemar_exact(base: list[bool], other: list[bool]) -> tuple[int, int, float]:
    """Paired binary outcomes of two arms → (only ``other`` succeeds, only ``base`` does, two-sided p).

    The exact McNemar test: under "the arms do equally well" each discordant pair is a fair coin,
    so p is the two-sided binomial tail of the split; no discordant pair gives p = 1.
    """
    from scipy.stats import binomtest

    if len(base) != len(other):
        raise ValueError(f"paired outcomes need equal lengths, got {len(base)} and {len(other)}")
    gained = sum(1 for a, b in zip(base, other) if b and not a)
    lost = sum(1 for a, b in zip(base, other) if a and not b)
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return gained, lost, float(p)


def paired_rows(base_files: list[str], other_files: list[str]) -> tuple[dict, dict, list[tuple[dict, dict]]]:
    """(settings A, settings B, [(row A, row B)] paired by prompt) of two arms' --json shards.

    A file that is not such a file (named in the message), a prompt in one arm only, or arms drawn
    from different prompt lists is a ValueError.
    """
    arms = []
    for files in (base_files, other_files):
        runs = []
        for f in files:
            try:
                run = json.loads(Path(f).read_text())
                runs.append((run["settings"], run["rows"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: not a tcss_eval.py --json file ({type(e).__name__}: {e})") from None
        arms.append((runs[0][0], {r["prompt"]: r for _, rows in runs for r in rows}))
    (set_a, rows_a), (set_b, rows_b) = arms
    if set_a.get("prompt_seed", PROMPT_SEED) != set_b.get("prompt_seed", PROMPT_SEED) or rows_a.keys() != rows_b.keys():
        raise ValueError("the two arms were not run on the same prompts")
    return set_a, set_b, [(rows_a[p], rows_b[p]) for p in rows_a]


def print_comparison(base_files: list[str], other_files: list[str]) -> None:
    """Site-blind placement of arm B against arm A, raw and cleaned, with the exact McNemar p."""
    set_a, set_b, pairs = paired_rows(base_files, other_files)
    # files written before a setting existed ran with its off value
    off = {"window_t": 0, "window_share": 0.0}
    differ = [k for k in ("guidance", "site_gate", "size_guidance", "temperature", "temper_prior_only", "window_t", "window_share",
                          "injection", "steps") if set_a.get(k, off.get(k)) != set_b.get(k, off.get(k))]
    print(f"{len(pairs)} prompts (prompt seed {set_a.get('prompt_seed', PROMPT_SEED)}), same seeds; "
          f"A vs B: " + ", ".join(f"{k} {set_a.get(k)} vs {set_b.get(k)}" for k in differ))
    for label, pick in (("raw", lambda r: r), ("cleaned", lambda r: r["cleaned"])):
        a = [bool(pick(ra)["largest_placed"]) for ra, _ in pairs]
        b = [bool(pick(rb)["largest_placed"]) for _, rb in pairs]
        gained, lost, p = mcnemar_exact(a, b)
        print(f"placement {label:<8} A {np.mean(a):6.1%}  B {np.mean(b):6.1%}   B only {gained:>2}, A only {lost:>2}: "
              f"exact McNemar p = {p:.3g}")


if __name__ == "__main__":
    main()
