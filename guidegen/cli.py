"""Command-line interface: one thin typer function per command (DESIGN §1).

Every command turns a :class:`~guidegen.errors.GuideGenError` into one line on stderr and exit
code 2 — never a traceback. The work itself lives in the modules the commands call.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from guidegen.errors import GuideGenError

app = typer.Typer(
    name="guidegen",
    help="Text-guided paired full-torso label map and CT generation.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
train_app = typer.Typer(help="Train one stage (tcss, autoencoder, ldm).", no_args_is_help=True, rich_markup_mode=None)
export_app = typer.Typer(help="Export a dataset to other tools' formats.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")
app.add_typer(export_app, name="export")


# ----------------------------------------------------------------------------------- info
@app.command()
def info() -> None:
    """Print versions, the compute device, the label set and the shipped checkpoints."""
    from guidegen.info import collect_info

    for key, value in collect_info().items():
        typer.echo(f"{key:<14} {value}")


# ------------------------------------------------------------------------------- phantom
@app.command()
def phantom(
    out: Path = typer.Option(..., "--out", help="Output dataset directory."),
    n: int = typer.Option(4, "--n", help="Number of cases."),
    size: str = typer.Option("64", "--size", help="Grid: S for S³ or X,Y,Z (e.g. 48,48,64)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first case; case i uses seed+i."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the dataset in --out (or write into a non-empty one)."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Write previews/<case>.png."),
) -> None:
    """Write a procedural torso phantom dataset (labels, CT, reports) in the dataset layout.

    A re-run into a phantom set of the same --size, --seed and phantom version resumes it
    (keeps its complete cases; a larger --n extends it)."""
    from guidegen.data.phantom_dataset import write_phantom_dataset
    from guidegen.data.layout import parse_grid

    if n < 1:
        raise GuideGenError(f"--n must be at least 1, got {n}")
    if workers < 1:
        raise GuideGenError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise GuideGenError(f"--seed must be >= 0, got {seed}")
    grid = parse_grid(size, option="--size")
    write_phantom_dataset(out, n=n, grid=grid, seed=seed, workers=workers, overwrite=overwrite, previews=previews)


# ------------------------------------------------------------------------------- preview
@app.command()
def preview(
    data: Path = typer.Option(..., "--data", help="Dataset directory."),
    case: Optional[str] = typer.Option(None, "--case", help="Case id (default: all cases)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG path (one case) or directory (default DATA/previews)."),
) -> None:
    """Write PNG montages (axial/coronal/sagittal, CT with label overlay) for dataset cases."""
    from guidegen.data.layout import DatasetReader
    from guidegen.viz import save_case_preview

    reader = DatasetReader(data)
    known = reader.case_ids()
    if case is not None and case not in known:
        raise GuideGenError(f"--case {case!r}: no complete case of that id in {data} ({len(known)} case(s), e.g. {', '.join(known[:3]) or 'none'})")
    cases = [case] if case else known
    if out is not None and out.suffix == ".png" and len(cases) != 1:
        raise GuideGenError(f"--out {out}: a PNG path takes one case (give --case); for {len(cases)} cases give a directory")
    for cid in cases:
        item = reader.load_case(cid)
        if out is not None and out.suffix == ".png" and len(cases) == 1:
            target = out
        else:
            target = (out or data / "previews") / f"{cid}.png"
        save_case_preview(target, item.labels, item.ct, reader.label_set, title=cid, spacing=item.spacing)
        typer.echo(str(target))


# ------------------------------------------------------------------------------- prepare
@app.command()
def prepare(
    ct: Path = typer.Option(..., "--ct", help="Folder of CT volumes: <case>.nii[.gz] files or <case>/ DICOM series folders."),
    labels: Path = typer.Option(..., "--labels", help="TotalSegmentator output: <case>.nii.gz multi-label files or <case>/ folders of per-class masks."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dataset directory (a re-run skips complete cases)."),
    tumors: Optional[Path] = typer.Option(None, "--tumors", help="Folder of <case>.nii.gz tumour masks (non-zero = tumour)."),
    body: Optional[Path] = typer.Option(None, "--body", help="Folder of <case>.nii.gz body masks (default: derived from the CT)."),
    reports: Optional[Path] = typer.Option(None, "--reports", help="CSV/TSV or JSONL file with a case id and a report text per row."),
    report_id_column: str = typer.Option("case", "--report-id-column", help="Case id column (default 'case'; 'id'/'case_id' also found)."),
    report_text_column: str = typer.Option("text", "--report-text-column", help="Report text column (default 'text'; 'report' also found)."),
    findings: str = typer.Option("report", "--findings", help="Tumour findings of a case with a report: report (parsed from it) or masks (site, side and size measured on the label map; sex, age, stage, phase from the report, whose text is kept). Either way, a report that disagrees with the map's tumours is a warning."),
    label_set: str = typer.Option("guidegen22", "--label-set", help="Label set name or YAML path."),
    totalseg_version: str = typer.Option("auto", "--totalseg-version", help="TotalSegmentator class ids of multi-label files: auto (per file, from the lungs; 2 when it cannot tell), 2 (117 classes) or 1 (104); a file that clearly follows the other version is rejected."),
    size: str = typer.Option("48,48,64", "--size", help="Training-cache grid: S or X,Y,Z."),
    margin_mm: float = typer.Option(10.0, "--margin-mm", help="Margin around the torso bounding box (mm)."),
    workers: int = typer.Option(1, "--workers", help="Parallel worker processes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only validate and print a summary table; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing dataset in --out instead of resuming it."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Write previews/<case>.png."),
) -> None:
    """Validate a user's CT, TotalSegmentator masks and reports; write the dataset and its training cache."""
    from rich.console import Console

    from guidegen.data.layout import parse_grid
    from guidegen.data.prepare import PrepareOptions, prepare_dataset, summary_table

    opts = PrepareOptions(label_set=label_set, totalseg_version=totalseg_version, grid=parse_grid(size, option="--size"), margin_mm=margin_mm, previews=previews, findings=findings)
    report = prepare_dataset(
        ct, labels, out, tumors=tumors, body=body, reports=reports, report_id_column=report_id_column,
        report_text_column=report_text_column, options=opts, workers=workers, dry_run=dry_run, overwrite=overwrite,
    )
    if dry_run:
        Console(width=max(Console().width, 140)).print(summary_table(report))
        for line in report.warnings:
            typer.echo(f"warning: {line}")
    typer.echo(f"{report.summary_line()} in {report.seconds:.1f} s")
    report.raise_for_problems()


# --------------------------------------------------------------------------------- parse
@app.command()
def parse(
    text: str = typer.Argument(..., help="Report or prompt text (quote it)."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object (sex, age, tumors, t/n/m_stage, phase, smoking)."),
) -> None:
    """Print the findings read from a report or prompt (and the canonical prompt built from them)."""
    from guidegen.text.findings import parse_findings
    from guidegen.text.prompts import canonical_prompt

    if not text.strip():
        raise GuideGenError("parse: the prompt is empty; give a report or prompt text, e.g. guidegen parse \"62-year-old man, 4 cm mass in the left kidney\"")
    findings = parse_findings(text)
    if as_json:
        typer.echo(findings.to_json())
        return
    d = findings.to_dict()
    for key in ("sex", "age", "t_stage", "n_stage", "m_stage", "phase", "smoking"):
        typer.echo(f"{key:<10} {'unknown' if d[key] is None else d[key]}")
    if not findings.tumors:
        typer.echo(f"{'tumors':<10} none")
    for i, t in enumerate(findings.tumors, 1):
        size = "size unknown" if t.size_mm is None else f"{t.size_mm:g} mm"
        typer.echo(f"{'tumor ' + str(i):<10} {t.site}{' (' + t.side + ')' if t.side else ''}, {size}")
    typer.echo(f"{'prompt':<10} {canonical_prompt(findings)}")


# ------------------------------------------------------------------------------ generate
@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Clinical prompt, e.g. '62-year-old man, 4 cm mass in the left kidney'."),
    out: Path = typer.Option(Path("out"), "--out", help="Output dataset directory (re-runs skip finished samples)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="File of prompts: .txt (one per line), .csv, .tsv or .jsonl with ids."),
    n: int = typer.Option(1, "--n", "--num-samples", help="Samples per prompt (under torchrun write --num-samples: torchrun reads --n as its own option)."),
    seed: int = typer.Option(0, "--seed", help="Base seed (>= 0): sample k of a prompt uses seed + k, plus an offset from its id in a --prompts file."),
    steps: Optional[int] = typer.Option(None, "--steps", help="TCSS sampling steps (network calls; default from the checkpoint)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="TCSS classifier-free guidance scale."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="TCSS x_0 sampling temperature (default from the checkpoint; lower: sharper maps, less variety)."),
    ct_steps: Optional[int] = typer.Option(None, "--ct-steps", help="Latent sampler steps (default from the checkpoint)."),
    ct_guidance: Optional[float] = typer.Option(None, "--ct-guidance", help="Latent classifier-free guidance scale."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint root with tcss/, autoencoder/, ldm/ (default: shipped demo)."),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when there is one, else cpu), cpu, cuda or cuda:N; under torchrun cuda means each rank's own GPU (LOCAL_RANK)."),
    labels_only: bool = typer.Option(False, "--labels-only", help="Stop after stage 1 (label maps only)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Generate CT for this label map (NIfTI) instead of sampling one; a directory of maps or a guidegen dataset (its reports as prompts) renders each, --n CTs per map."),
    qc_retries: int = typer.Option(0, "--qc-retries", help="Re-sample a sample that fails QC up to K times with new seeds."),
    raw_labels: bool = typer.Option(False, "--raw-labels", help="Keep the sampled label map as the model gave it (no stray-lesion, organ-part or isolated-voxel cleanup)."),
    no_texture: bool = typer.Option(False, "--no-texture", help="Render the decoder's deterministic CT: no per-voxel texture draw from the autoencoder's tables."),
) -> None:
    """Generate paired label maps and CT volumes from text (DESIGN §1)."""
    from guidegen.pipeline import run_generate_command

    run_generate_command(prompt=prompt, out=out, prompts_file=prompts, n=n, seed=seed, steps=steps, guidance=guidance,
                         temperature=temperature, ct_steps=ct_steps, ct_guidance=ct_guidance, checkpoint=checkpoint, device=device,
                         labels_only=labels_only, labels_path=labels, qc_retries=qc_retries, raw_labels=raw_labels,
                         texture=not no_texture)


# --------------------------------------------------------------------------- reconstruct
@app.command()
def reconstruct(
    ct: Path = typer.Option(..., "--ct", help="CT volume (NIfTI, HU)."),
    labels: Path = typer.Option(..., "--labels", help="Label map on the CT's grid (NIfTI, label-set ids)."),
    out: Path = typer.Option(..., "--out", help="Output directory (reconstruction.nii.gz, errors.json, PNG)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Autoencoder checkpoint dir (default: shipped demo)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Tiled encode/decode with this tile size (voxels: a multiple of 4 above the 48-voxel overlap)."),
) -> None:
    """Encode + decode a CT through the autoencoder; print MAE per HU window and per organ."""
    from guidegen.reconstruct import run_reconstruct

    errors = run_reconstruct(ct, labels, out, checkpoint, tile)
    typer.echo("MAE (HU) by window: " + ", ".join(f"{k} {v:.1f}" for k, v in errors["mae"].items()))
    typer.echo(f"{'class':<22}{'voxels':>8}{'MAE soft':>10}{'mean HU':>9}{'error':>8}")
    for name, row in errors["classes"].items():
        typer.echo(f"{name:<22}{row['voxels']:>8}{row['mae_soft_tissue']:>10.1f}{row['mean_hu_true']:>9.1f}{row['mean_hu_error']:>8.1f}")


# --------------------------------------------------------------------------------- train
def _train(stage: str, config: Optional[Path], data: Path, out: Path, max_steps: Optional[int], init_from: Optional[Path] = None,
           threads: Optional[int] = None) -> None:
    from guidegen.training.run import run_training

    if max_steps is not None and max_steps < 0:
        raise GuideGenError(f"--max-steps must be at least 0, got {max_steps}")
    if max_steps == 0 and init_from is None:
        # 0 steps re-exports a checkpoint: its weights as they are, the export-time measurements
        # (an autoencoder's latent scale and texture tables) redone on --data
        raise GuideGenError("--max-steps 0 re-exports the checkpoint given by --init-from; pass --init-from CHECKPOINT")
    if threads is not None:
        if threads < 1:
            raise GuideGenError(f"--threads must be at least 1, got {threads}")
        import torch

        # On a CPU shared with other jobs, 1 thread per process avoids OpenMP threads stalling
        # each other (measured 3–35× slower steps with 2 threads under load).
        torch.set_num_threads(threads)
    export = run_training(stage, config, data, out, max_steps=max_steps, init_from=init_from)
    meta = json.loads((export / "meta.json").read_text())
    if meta.get("interrupted"):
        # a chain (`train autoencoder && train ldm`) or a preemption script must see the stop
        import signal

        from guidegen.checkpoints import total_train_steps

        typer.echo(f"interrupted after step {total_train_steps(meta)}: checkpoint in "
                   f"{out / 'checkpoint'}, partial export in {export}; re-run the same command to resume", err=True)
        stopped_by = meta.get("stop_signal")
        sys.exit(128 + (signal.Signals[stopped_by].value if stopped_by in signal.Signals.__members__ else signal.SIGINT.value))
    from guidegen.training.common import launch_rank

    if launch_rank()[0] == 0:  # one line for the job, not one per rank
        typer.echo(f"inference checkpoint: {export}")


_CONFIG_HELP = "YAML config or preset name (default: demo)."


@train_app.command("tcss")
def train_tcss(
    data: Path = typer.Option(..., "--data", help="Dataset directory (labels + reports)."),
    out: Path = typer.Option(..., "--out", help="Run directory; resumes when it holds a checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (0 with --init-from: re-export it)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from this exported checkpoint's weights."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; 1 on a shared CPU)."),
) -> None:
    """Train stage 1 (TCSS label-map diffusion)."""
    _train("tcss", config, data, out, max_steps, init_from, threads)


@train_app.command("autoencoder")
def train_autoencoder(
    data: Path = typer.Option(..., "--data", help="Dataset directory (CT + labels)."),
    out: Path = typer.Option(..., "--out", help="Run directory; resumes when it holds a checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (0 with --init-from: re-export it)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from this exported checkpoint's weights."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; 1 on a shared CPU)."),
) -> None:
    """Train stage 2 (anatomy-aware HDR autoencoder)."""
    _train("autoencoder", config, data, out, max_steps, init_from, threads)


@train_app.command("ldm")
def train_ldm(
    data: Path = typer.Option(..., "--data", help="Dataset directory (CT + labels + reports)."),
    out: Path = typer.Option(..., "--out", help="Run directory; resumes when it holds a checkpoint."),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (0 with --init-from: re-export it)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start a new run from this exported checkpoint's weights."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice; 1 on a shared CPU)."),
) -> None:
    """Train stage 3 (latent diffusion generator; needs a trained autoencoder)."""
    _train("ldm", config, data, out, max_steps, init_from, threads)


# ------------------------------------------------------------------------------ evaluate
@app.command()
def evaluate(
    real: Path = typer.Option(..., "--real", help="Real dataset directory (CT + labels + reports)."),
    synthetic: Path = typer.Option(..., "--synthetic", help="Synthetic dataset directory (e.g. a `guidegen generate` output)."),
    out: Path = typer.Option(..., "--out", help="Output directory for metrics.json and report.html."),
    quick: bool = typer.Option(False, "--quick", help="Small grid and few training steps (minutes on a CPU)."),
    size: Optional[str] = typer.Option(None, "--grid", help="Evaluation grid S or X,Y,Z, each divisible by 4 (default 48,48,64; quick 32,32,40)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local InceptionV3 FID weights (torch-fidelity .pth) for slice-wise FID; needs torchmetrics."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="Local torchvision VGG16 weights (vgg16-397923af.pth) for slice-wise LPIPS; needs torchmetrics."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where to cache the evaluation networks (default REAL/cache/eval)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the evaluation nets (default: the idle cores)."),
) -> None:
    """Compare a synthetic set with a real one: metrics.json + a self-contained report.html."""
    from guidegen.data.layout import parse_grid
    from guidegen.evaluation import EvalConfig, evaluate as run_evaluation

    grid = parse_grid(size, option="--grid") if size else None
    cfg = EvalConfig.preset(quick, grid)
    result = run_evaluation(real, synthetic, out, cfg, inception_weights=inception_weights, lpips_weights=lpips_weights,
                            cache_dir=cache_dir, threads=threads, progress=True)
    m = result.metrics
    for key in ("frechet_distance", "precision", "recall", "organ_volume_w1", "tumor_placement_rate", "alignment_dice_mean",
                "attribute_accuracy", "downstream_dice_synthetic", "downstream_dice_real"):
        typer.echo(f"{key:<26} {'–' if m.get(key) is None else m[key]}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"wrote {result.metrics_path} and {result.report_path} in {result.seconds:.0f} s")


# -------------------------------------------------------------------------------- export
@export_app.command("nnunet")
def export_nnunet(
    data: Path = typer.Option(..., "--data", "--synthetic", help="Dataset directory (real or synthetic; CT + labels)."),
    out: Path = typer.Option(..., "--out", help="nnU-Net raw folder (e.g. $nnUNet_raw); DatasetNNN_NAME is created inside."),
    dataset_id: int = typer.Option(..., "--dataset-id", help="nnU-Net dataset id, 1..999."),
    name: str = typer.Option(..., "--name", help="Dataset name (letters, digits, '_', '-')."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DatasetNNN_NAME."),
) -> None:
    """Write an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json) and check it."""
    from guidegen.evaluation.export import export_nnunet as run_export

    from guidegen.evaluation.export import SPLITS_FILE

    target = run_export(data, out, dataset_id, name, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {target} (checked)")
    if (target / SPLITS_FILE).is_file():
        folds = len(json.loads((target / SPLITS_FILE).read_text()))
        typer.echo(f"{SPLITS_FILE}: {folds} folds, the CTs of each source label map in one; copy it to $nnUNet_preprocessed/{target.name}/ "
                   f"after nnUNetv2_plan_and_preprocess (then train folds 0-{folds - 1}), or nnU-Net's random folds put one map's CTs "
                   "in training and validation")


class Terminated(SystemExit):
    """Raised by the SIGTERM handler: the command unwinds through every ``finally``."""


def _terminate(signum: int, frame) -> None:
    """SIGTERM (a scheduler's kill, torchrun stopping the other ranks): leave as Ctrl-C does,
    through every ``finally`` (atomic writes remove their temporary files), exit 128 + 15."""
    raise Terminated(128 + signum)


def main() -> None:
    """Console-script entry point: run the app, turning known errors into one line + exit 2."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)  # training installs its own handlers while it runs
    try:
        code = app(standalone_mode=False)
    except GuideGenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:
        typer.echo("terminated", err=True)
        raise
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors and aborts
        usage_errors, aborts = _click_exception_types()
        if type(exc).__name__ == "NoArgsIsHelpError":  # `guidegen` or `guidegen train` alone: the help, not an error
            typer.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code or 2)
        if isinstance(exc, usage_errors):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code or 2)
        if isinstance(exc, aborts):
            typer.echo("aborted", err=True)
            sys.exit(1)
        raise
    # typer turns Ctrl-C into an exit code that, without standalone mode, comes back as the
    # return value instead of an exception
    if isinstance(code, int) and code != 0:
        if code == 130:
            typer.echo("interrupted", err=True)
        sys.exit(code)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(usage-error classes, abort classes)`` of click and of the copy of click that typer
    bundles since 0.29 (``typer._click``, ``typer.exceptions``), whose exceptions do not
    subclass click's."""
    import importlib

    modules = []
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue

    def found(attr: str) -> tuple[type, ...]:
        return tuple({getattr(m, attr) for m in modules if isinstance(getattr(m, attr, None), type)})

    return found("ClickException"), found("Abort")


if __name__ == "__main__":  # `python -m guidegen.cli` (and `torchrun -m guidegen.cli`) as `python -m guidegen`
    main()
