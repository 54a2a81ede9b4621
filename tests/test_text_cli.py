"""`guidegen parse`: JSON output, human output, empty-prompt error."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from guidegen.cli import app


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guidegen", "parse", *args], capture_output=True, text=True, timeout=120)


def test_parse_json_is_one_object_with_the_documented_keys():
    r = _run("62-year-old man, 4 cm mass in the left kidney, portal venous phase, T2N0M0, never smoker", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert list(d) == ["sex", "age", "tumors", "t_stage", "n_stage", "m_stage", "phase", "smoking"]
    assert d == {"sex": "male", "age": 62, "tumors": [{"site": "kidney", "side": "left", "size_mm": 40.0}],
                 "t_stage": "T2", "n_stage": "N0", "m_stage": "M0", "phase": "portal_venous", "smoking": False}


def test_parse_empty_prompt_is_one_error_line_exit_2():
    for text in ("", "   \t "):
        r = _run(text, "--json")
        assert r.returncode == 2
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: parse: the prompt is empty")
        assert "Traceback" not in r.stderr


def test_parse_without_findings_gives_all_null():
    res = CliRunner().invoke(app, ["parse", "Routine scan, nothing to report.", "--json"])
    assert res.exit_code == 0
    d = json.loads(res.stdout)
    assert d["tumors"] == [] and all(d[k] is None for k in d if k != "tumors")


def test_parse_human_output_lists_tumours_and_prompt():
    res = CliRunner().invoke(app, ["parse", "F58, two liver lesions 2 and 3 cm"])
    assert res.exit_code == 0
    out = res.stdout
    assert "sex        female" in out and "age        58" in out
    assert "tumor 1    liver, 20 mm" in out and "tumor 2    liver, 30 mm" in out
    assert "prompt     Patient: 58-year-old female." in out
