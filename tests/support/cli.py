"""`dicomnode` commands run in-process, as the tests of the command line run them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dicomnode.cli import main

# A study UID no PACS in the tests holds (`dicomnode retrieve` reports it missing).
ABSENT = "1.2.826.0.1.3680043.10.999.424242"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`dicomnode ARGS`: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def read_report(path: Path) -> dict[str, dict[str, str]]:
    """`dicomnode retrieve`'s report CSV, by study UID."""
    with path.open(newline="") as fh:
        return {r["study_uid"]: r for r in csv.DictReader(fh)}
