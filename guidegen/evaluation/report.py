"""``report.html``: one self-contained page (inline CSS, plots as base64 PNG) per evaluation.

Sections (each a ``<section id=...>``, listed in :data:`SECTIONS`): summary, distribution,
label maps, alignment, text fidelity, usefulness, slice montages (real and synthetic side by
side), notes. Nothing is loaded from the network, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guidegen.evaluation.sets import EvalSet  # noqa: E402
from guidegen.io import write_text_atomic  # noqa: E402
from guidegen.viz import label_rgba, orthogonal_slices, window_to_unit  # noqa: E402

SECTIONS = {
    "summary": "Summary",
    "distribution": "Distribution",
    "label-maps": "Label maps",
    "alignment": "Alignment (label map ↔ CT)",
    "text-fidelity": "Text fidelity",
    "usefulness": "Usefulness (downstream segmentation)",
    "montages": "Slice montages",
    "notes": "Notes and provenance",
}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.92em}.muted{color:#888}nav a{margin-right:1em}
"""


# ------------------------------------------------------------------------------ helpers
def png_data_uri(fig) -> str:
    """Render a matplotlib figure to an inline ``data:image/png;base64,...`` URI and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v) -> str:
    if v is None:
        return '<span class="muted">–</span>'
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[tuple], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<p><img src="{uri}" alt="{html.escape(alt)}"></p>'


# -------------------------------------------------------------------------------- plots
def plot_features(f_real: np.ndarray, f_syn: np.ndarray) -> str:
    """2D PCA (fitted on real) of the encoder features of both sets."""
    mu, sd = f_real.mean(0), f_real.std(0) + 1e-8
    a, b = (f_real - mu) / sd, (f_syn - mu) / sd
    _, _, vt = np.linalg.svd(a - a.mean(0), full_matrices=False)
    pa, pb = a @ vt[:2].T, b @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(pa[:, 0], pa[:, 1], c="tab:blue", label="real", alpha=0.8)
    ax.scatter(pb[:, 0], pb[:, 1], c="tab:orange", marker="x", label="synthetic", alpha=0.8)
    ax.set_xlabel("PC 1 (real)")
    ax.set_ylabel("PC 2 (real)")
    ax.set_title("Encoder features (PCA of real)")
    ax.legend()
    return png_data_uri(fig)


def plot_volumes(plots: dict) -> str:
    """Per-organ volume distributions (mL, log scale), real vs synthetic, side by side."""
    names, organs, vol = plots["names"], plots["organs"], plots["volumes"]
    fig, ax = plt.subplots(figsize=(11, 4))
    pos = np.arange(len(organs))
    for off, role, color in ((-0.18, "real", "tab:blue"), (0.18, "synthetic", "tab:orange")):
        data = [np.maximum(vol[role][:, c], 1e-3) for c in organs]
        bp = ax.boxplot(data, positions=pos + off, widths=0.3, patch_artist=True, showfliers=False)
        for patch in bp["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.6)
        ax.plot([], [], color=color, lw=6, alpha=0.6, label=role)
    ax.set_xticks(pos)
    ax.set_xticklabels([names[c] for c in organs], rotation=60, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("volume (mL)")
    ax.legend()
    return png_data_uri(fig)


def plot_dice(series: dict[str, dict[str, float]], title: str) -> str:
    """Grouped bars of per-class Dice for each named series."""
    classes = list(dict.fromkeys(k for d in series.values() for k in d))  # label-set order, first series first
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(classes))
    for i, (label, d) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [d.get(c) or 0.0 for c in classes], width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.legend()
    return png_data_uri(fig)


def plot_montage(real: EvalSet, synth: EvalSet, n: int) -> str:
    """Rows = cases; columns = real axial, real coronal, synthetic axial, synthetic coronal (CT + labels)."""
    n = max(1, min(n, len(real), len(synth)))
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.8 * n), squeeze=False)
    for r in range(n):
        for col, (ds, role) in enumerate(((real, "real"), (synth, "synthetic"))):
            ct = orthogonal_slices(ds.ct[r])
            lab = orthogonal_slices(ds.labels[r])
            sx, sy, sz = ds.spacing[r] if ds.spacing is not None else (1.0, 1.0, 1.0)
            for k, (view, aspect) in enumerate((("axial", sy / sx), ("coronal", sz / sx))):  # physical proportions
                ax = axes[r, 2 * col + k]
                ax.imshow(window_to_unit(ct[view], 40.0, 400.0), cmap="gray", vmin=0, vmax=1, aspect=aspect)
                ax.imshow(label_rgba(lab[view], ds.label_set, alpha=0.35), aspect=aspect)
                ax.set_title(f"{role} {ds.cases[r]} {view}", fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    return png_data_uri(fig)


# ------------------------------------------------------------------------------ report
def build_report(metrics: dict, real: EvalSet, synth: EvalSet, lm_plots: dict, f_real: np.ndarray, f_syn: np.ndarray, montage_cases: int = 3) -> str:
    """The full HTML text of the report."""
    m = metrics
    parts: dict[str, str] = {}
    parts["summary"] = _table([
        ("Fréchet distance (project encoder) ↓", m.get("frechet_distance")),
        ("Precision ↑", m.get("precision")),
        ("Recall ↑", m.get("recall")),
        ("Organ volume W1 (relative) ↓", m.get("organ_volume_w1")),
        ("Tumour placement rate ↑", m.get("tumor_placement_rate")),
        ("Tumour size within ±50 % ↑", m.get("tumor_size_rate")),
        ("Anatomical order pass rate ↑", m.get("anatomy_order_pass_rate")),
        ("Alignment Dice (mean) ↑", m.get("alignment_dice_mean")),
        ("Attribute accuracy ↑", m.get("attribute_accuracy")),
        ("Downstream Dice, trained on synthetic ↑", m.get("downstream_dice_synthetic")),
        ("Downstream Dice, trained on real ↑", m.get("downstream_dice_real")),
    ], ("metric", "value")) + (
        f'<p class="note">Real: {html.escape(m["sets"]["real"]["path"])} ({m["sets"]["real"]["cases"]} cases) · '
        f'Synthetic: {html.escape(m["sets"]["synthetic"]["path"])} ({m["sets"]["synthetic"]["cases"]} cases) · '
        f'grid {"×".join(map(str, m["config"]["grid"]))}{" · quick mode" if m["config"].get("quick") else ""} · {m["seconds"]:.0f} s</p>'
    )

    fs = m.get("feature_space", {})
    split = m.get("real_split", {})
    in_sample = split.get("in_sample", False)
    split_note = (
        f' The encoder is trained on {fs.get("train_cases")} real training cases and the real features compared here are those of '
        f'{fs.get("real_reference_cases")} held-out real cases (random split, seed {split.get("seed")}), unseen by the encoder like the synthetic set.'
        if split and not in_sample else
        ' <b>The real set is too small to split: the encoder saw every real case, so the real reference is in-sample.</b>' if split else ''
    )
    parts["distribution"] = (
        '<p class="note">Features come from a 3D encoder <b>trained by guidegen on the real set</b> (CT → class volume '
        'fractions, sex and contrast phase), not from a pretrained network: the numbers compare sets evaluated against '
        f'the same real set only. Feature = per-stage activation means and standard deviations ({fs.get("dim")} numbers); '
        f'precision/recall: k-NN manifolds, k = {fs.get("k")}. Encoder {"loaded from cache" if fs.get("cached") else "trained in this run"}.{split_note}</p>'
        + _table([("Fréchet distance", m.get("frechet_distance")), ("precision", m.get("precision")), ("recall", m.get("recall")),
                  ("slice-wise FID (Inception, optional)", m.get("slice_fid")), ("slice-wise LPIPS (VGG, optional)", m.get("slice_lpips"))],
                 ("metric", "value"))
        + _img(plot_features(f_real, f_syn), "feature PCA")
    )

    w1 = m.get("organ_volume_w1_per_class", {})
    rows = [(k, w1.get(k), m["components_mean_real"].get(k), m["components_mean_synthetic"].get(k)) for k in m.get("components_mean_real", {})]
    order = [(k, m["anatomy_order_real"].get(k), m["anatomy_order_synthetic"].get(k)) for k in sorted(set(m["anatomy_order_real"]) | set(m["anatomy_order_synthetic"]))]
    tum = m.get("tumor_placement_cases", [])
    tum_rows = [(t["case"], t["site"], t["side"], t["requested_mm"], t["placed"], t["measured_mm"], t["size_ok"]) for t in tum[:60]]
    parts["label-maps"] = (
        "<h3>Organ volumes and connected components</h3>"
        '<p class="note">W1 of the per-case volume distributions divided by the mean real volume (0 = identical).</p>'
        + _table(rows, ("organ", "volume W1 (rel.)", "components (real)", "components (synthetic)"))
        + _img(plot_volumes(lm_plots), "organ volumes")
        + "<h3>Anatomical order (pass rate)</h3>" + _table(order, ("check", "real", "synthetic"))
        + "<h3>Tumours vs the prompt</h3>"
        + f'<p class="note">{m.get("tumor_requests", 0)} requested tumours; placement rate {_fmt(m.get("tumor_placement_rate"))}, '
          f'size within ±50 % {_fmt(m.get("tumor_size_rate"))}; tumour regions beyond the requested count: {m.get("tumor_regions_unrequested")}.'
          f'{" (first 60 shown)" if len(tum) > 60 else ""}</p>'
        + _table(tum_rows, ("case", "site", "side", "requested mm", "placed", "measured mm", "size ok"))
    )

    ad, ref = m.get("alignment_dice", {}), m.get("alignment_dice_real_reference", {})
    seg = m.get("segmenter", {})
    parts["alignment"] = (
        f'<p class="note">A MONAI UNet trained on {seg.get("train_cases")} real pairs ({seg.get("steps")} steps, '
        f'{"cached" if seg.get("cached") else "trained in this run"}) segments the synthetic CT; Dice against the synthetic label map. '
        "The reference column is the same net on held-out real cases.</p>"
        + _table([("mean", m.get("alignment_dice_mean"), m.get("alignment_dice_real_reference_mean"))]
                 + [(k, ad.get(k), ref.get(k)) for k in ad], ("class", "synthetic", "real reference"))
        + _img(plot_dice({"synthetic": ad, "real (held-out)": ref} if ref else {"synthetic": ad}, "Alignment Dice"), "alignment dice")
    )

    acc = m.get("attribute_accuracy_per_attribute", {})
    acc_real = m.get("attribute_accuracy_real", {})
    parts["text-fidelity"] = (
        '<p class="note">A 3D classifier over CT + label map, trained on the real pairs, predicts sex, contrast phase and the site '
        "of the largest tumour; accuracy against the findings each synthetic case was generated from. "
        + ("The real column is its accuracy on the real cases it was trained on (set too small to split). " if in_sample else
           f"It is trained on the real training part; the real column is its accuracy on the {split.get('held_out_cases')} held-out real cases. "
           if split else "")
        + "Chance = always answering the most frequent value.</p>"
        + _table([(k, v.get("accuracy"), v.get("chance"), v.get("n"), acc_real.get(k)) for k, v in acc.items()]
                 + [("mean", m.get("attribute_accuracy"), None, None, None)], ("attribute", "accuracy (synthetic)", "chance", "n",
                                                                                    "accuracy (real, in-sample)" if in_sample else "accuracy (real, held-out)"))
    )

    if m.get("downstream_dice_synthetic") is not None:
        ds_syn, ds_real = m["downstream_dice_synthetic_per_class"], m["downstream_dice_real_per_class"]
        d = m["downstream"]
        parts["usefulness"] = (
            f'<p class="note">The same UNet recipe trained on {d["n_train"]} synthetic vs {d["n_train"]} real pairs '
            f'({d["steps"]} steps), tested on {d["n_test_real"]} held-out real cases.</p>'
            + _table([("mean", m["downstream_dice_synthetic"], m["downstream_dice_real"])] + [(k, ds_syn.get(k), ds_real.get(k)) for k in ds_real],
                     ("class", "trained on synthetic", "trained on real"))
            + _img(plot_dice({"synthetic": ds_syn, "real": ds_real}, "Downstream Dice on held-out real"), "downstream dice")
        )
    else:
        parts["usefulness"] = '<p class="note">Not computed (see notes).</p>'

    parts["montages"] = ('<p class="note">Central axial and coronal slices, soft-tissue window, label overlay; real on the left, synthetic on the right.</p>'
                         + _img(plot_montage(real, synth, montage_cases), "slice montages"))

    notes = "".join(f"<li>{html.escape(n)}</li>" for n in m.get("notes", [])) or "<li>none</li>"
    parts["notes"] = (f"<ul>{notes}</ul><p class=\"note\">Networks cached in {html.escape(str(m.get('cache_dir')))}. Timings (s): "
                      f"{html.escape(json.dumps(m.get('timings_s', {})))}.</p>")

    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title in SECTIONS.items())
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{parts[sid]}</section>' for sid, title in SECTIONS.items())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>guidegen evaluation</title>'
            f"<style>{_CSS}</style></head><body><h1>guidegen evaluation report</h1><nav>{nav}</nav>{body}</body></html>\n")


def write_report(path: str | Path, metrics: dict, real: EvalSet, synth: EvalSet, lm_plots: dict, f_real: np.ndarray, f_syn: np.ndarray,
                 montage_cases: int = 3) -> Path:
    """Write :func:`build_report` atomically to ``path``; returns the path."""
    path = Path(path)
    write_text_atomic(path, build_report(metrics, real, synth, lm_plots, f_real, f_syn, montage_cases))
    return path
