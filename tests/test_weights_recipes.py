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
import pytest

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


def _option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_generalise_recipe_calls_existing_options(tmp_path: Path) -> None:
    calls = _recorded("generalise.sh", tmp_path, "lumpy")
    names = [c[0] for c in calls]
    # leave-one-out stages A and B, the labels-only fine-tune, all-family stages A and B
    assert names.count("train") == 5 and names.count("evaluate") >= 6
    for call in calls:
        _check(call)
    synths = [c for c in calls if c[0] == "synth"]
    # trained without the left-out family, evaluated on it
    assert any(_option(c, "--families") == "powerlaw,ligament,mixture" for c in synths)
    assert any(_option(c, "--families") == "lumpy" for c in synths)
    assert all("--variety" in c for c in synths)


def _synth_seeds(calls: list[list[str]], work: Path) -> dict[str, str]:
    """Each synth output, relative to the work folder, and its seed."""
    return {Path(c[1]).relative_to(work).as_posix(): _option(c, "--seed")
            for c in calls if c[0] == "synth"}


def test_generalise_labels_only_runs_never_read_the_masks(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    runs = {name: tmp_path / name for name in ("one", "every", "labels_only")}
    for folder in runs.values():
        folder.mkdir()
    calls = _recorded("generalise.sh", runs["one"], "ligament")
    trains = [c for c in calls if c[0] == "train"]
    # the labels-only fine-tune: the family's own phantoms, from the shipped weights, no
    # mask loss and no lesion crops, evaluated on the same held-out set as those weights
    adapt = [c for c in trains if "adapt_ligament" in _option(c, "--images")]
    assert len(adapt) == 1
    assert _option(adapt[0], "--mask-weight") == "0" and "--lesion-crops" not in adapt[0]
    assert _option(adapt[0], "--init") == "builtin"
    heldout = {_option(c, "--images") for c in calls if c[0] == "evaluate"
               and Path(_option(c, "--out")).parent.name in ("adapt_ligament", "work")
               and "ligament" in _option(c, "--out")}
    assert heldout == {str(runs["one"] / "work" / "heldout_ligament")}

    # a run of one family makes the same phantoms for it as a run of every family
    one = _synth_seeds(calls, runs["one"] / "work")
    every = _synth_seeds(_recorded("generalise.sh", runs["every"]), runs["every"] / "work")
    assert one.keys() - {"all/train", "all/heldout", "all/heldout_full"} == {
        "lofo_ligament/train", "lofo_ligament/heldout_seen", "heldout_ligament",
        "adapt_ligament/train"}
    assert all(every[k] == v for k, v in one.items())
    assert len(set(every.values())) == len(every)  # and no two sets share a seed

    # MASK_WEIGHT=0: the leave-one-out and all-family runs train on labels alone too
    monkeypatch.setenv("MASK_WEIGHT", "0")
    labels_only = _recorded("generalise.sh", runs["labels_only"], "ligament")
    trains = [c for c in labels_only if c[0] == "train"]
    assert len(trains) == 3
    assert all(_option(c, "--mask-weight") == "0" and "--lesion-crops" not in c
               and _option(c, "--lr") == "1e-4" for c in trains)
    # each evaluation reads stage A's model (or the shipped weights)
    assert all(_option(c, "--checkpoint").endswith(("/a/best.pt", "/dbt.pt"))
               for c in labels_only if c[0] == "evaluate")


def test_generalise_all_family_model_trains_on_whole_full_size_breasts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FULL_TRAIN: the all-family model's training set gains full-size phantoms, and that
    model (and it alone) trains on whole breasts, normal ones as slabs of NORMAL_SLICES."""
    monkeypatch.setenv("FULL_TRAIN", "3")
    monkeypatch.setenv("NORMAL_SLICES", "8")
    calls = _recorded("generalise.sh", tmp_path, "lumpy")
    for call in calls:
        _check(call)
    work = tmp_path / "work"
    synths = {Path(c[1]).relative_to(work).as_posix(): c for c in calls if c[0] == "synth"}
    assert _option(synths["all/train/full"], "--size") == "full"
    assert _option(synths["all/train/full"], "--studies") == "3"
    assert "--size" not in synths["all/train/small"]
    trains = [c for c in calls if c[0] == "train"]
    whole = [c for c in trains if "--whole-breast" in c]
    assert {_option(c, "--images") for c in whole} == {str(work / "all" / "train")}
    assert len(whole) == 2  # stage A and the lesion-crop stage B
    assert [_option(c, "--normal-slices") for c in whole if "--lesion-crops" not in c] == ["8"]
    assert all(_option(c, "--labels") == str(work / "all" / "train" / "labels.csv")
               for c in whole)
