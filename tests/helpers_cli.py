"""Run the `guidegen` CLI in this process (so monkeypatches reach it) and capture its output."""

import sys


def run_cli_inprocess(monkeypatch, capsys, *args, columns: int | None = None) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``guidegen ARGS``; ``columns`` widens rich's tables."""
    from guidegen.cli import main

    if columns is not None:
        monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys, "argv", ["guidegen", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
