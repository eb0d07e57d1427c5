"""Every command line's --help runs and shows its defaults."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "scripts").rglob("*.py") if "argparse" in p.read_text(encoding="utf-8"))
MODULES = [["calibrate"], ["evals"], ["calibrate.data", "fetch"], ["evals.image", "t2i"], ["evals.image", "ablation"],
           ["evals.dit.capture"]]


def _help(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_help_shows_defaults(script):
    text = _help([str(script)])
    commands = re.search(r"^usage: \S+ \[-h\]\s+\{([\w,-]+)\}", text)  # argparse wraps a long usage line
    if commands:  # a script of subcommands: each one's own --help shows its defaults
        for command in commands.group(1).split(","):
            assert "(default:" in _help([str(script), command]), command
        return
    assert "(default:" in text


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=" ".join)
def test_module_help_shows_defaults(module):
    text = _help(["-m", *module])
    assert "(default:" in text or module[-1] == "fetch"  # calibrate.data fetch: no option has a default

