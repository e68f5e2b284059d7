"""The weight recipes call the command line with options that exist: a recipe that runs for
hours on a GPU must not die on a misspelt flag after the first stage."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import click

from dicomnode.cli import COMMANDS
from dicomnode.synth import parse_families

WEIGHTS = Path(__file__).resolve().parents[1] / "dicomnode" / "weights"


def _command(name: str) -> click.Command:
    module, attr = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def _recorded(script: str, tmp_path: Path, *args: str) -> list[list[str]]:
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
    stub.chmod(0o755)
    env = {**os.environ, "DICOMNODE": str(stub), "PYTHON": sys.executable,
           "OUT_DIR": str(tmp_path / "weights_out")}
    subprocess.run(["bash", str(WEIGHTS / script), str(tmp_path / "work"), *args], env=env,
                   check=True, capture_output=True, timeout=60)
    return [shlex.split(line) for line in log.read_text().splitlines()]


def _check(call: list[str]) -> None:
    command = _command(call[0])
    options = {opt: p for p in command.params if isinstance(p, click.Option)
               for opt in (*p.opts, *p.secondary_opts)}
    args = call[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            assert arg in options, f"{call[0]} has no option {arg}: {' '.join(call)}"
            param = options[arg]
            if not param.is_flag:
                value = args[i + 1]
                if isinstance(param.type, click.Choice):
                    assert value in param.type.choices, (arg, value)
                if arg == "--families":
                    assert parse_families(value)
                i += 1
        i += 1


def test_generalise_recipe_calls_existing_options(tmp_path: Path) -> None:
    calls = _recorded("generalise.sh", tmp_path, "lumpy")
    names = [c[0] for c in calls]
    assert names.count("train") == 4 and names.count("evaluate") >= 5
    for call in calls:
        _check(call)
    synths = [c for c in calls if c[0] == "synth"]
    # trained without the left-out family, evaluated on it
    assert any("--families" in c and c[c.index("--families") + 1] == "powerlaw,ligament,mixture"
               for c in synths)
    assert any(c[c.index("--families") + 1] == "lumpy" for c in synths)
    assert all("--variety" in c for c in synths)
