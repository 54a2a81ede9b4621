"""Command-line interface: one thin typer function per command (DESIGN §1).

Every command turns a :class:`~guidegen.errors.GuideGenError` into one line on stderr and exit
code 2 — never a traceback. The work itself lives in the modules the commands call.
"""

from __future__ import annotations

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
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow writing into a non-empty --out."),
    previews: bool = typer.Option(True, "--previews/--no-previews", help="Write previews/<case>.png."),
) -> None:
    """Write a procedural torso phantom dataset (labels, CT, reports) in the dataset layout."""
    from guidegen.data.phantom_dataset import write_phantom_dataset
    from guidegen.data.layout import parse_grid

    if n < 1:
        raise GuideGenError(f"--n must be at least 1, got {n}")
    if workers < 1:
        raise GuideGenError(f"--workers must be at least 1, got {workers}")
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
    cases = [case] if case else reader.case_ids()
    for cid in cases:
        item = reader.load_case(cid)
        if out is not None and out.suffix == ".png" and len(cases) == 1:
            target = out
        else:
            target = (out or data / "previews") / f"{cid}.png"
        save_case_preview(target, item.labels, item.ct, reader.label_set, title=cid)
        typer.echo(str(target))


def main() -> None:
    """Console-script entry point: run the app, turning known errors into one line + exit 2."""
    try:
        app(standalone_mode=False)
    except GuideGenError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.ClickException):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code or 2)
        if isinstance(exc, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            sys.exit(1)
        raise
