"""Synthetic studies (`dicomnode synth`) for the tests, generated once per session.

Most tests only read a study: they send it, load it or index it. Those share one folder per
set of generation options (``synth_study`` in conftest.py hands it out); a test that changes
files copies the study first (``copy_study``) and changes the copy.

SMALL is the one small 4-view study (DBT, FFDM and synthetic 2D, with SEG ground truth)
that the node, receiver and peer tests send; a test that needs other options (a layout, a
transfer syntax, a seed whose findings it checks) names them, and tests asking for the same
options share that study too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomnode.synth import SynthOptions, generate_studies

# One small study of all three modalities, 12 images and their SEGs (seed 21: a benign mass
# in the right breast, the left one normal).
SMALL = dict(studies=1, size="small", seed=21)

_STUDIES: dict[tuple[Path, SynthOptions], Path] = {}


def synth_study(factory: pytest.TempPathFactory, **options: object) -> Path:
    """The folder of ``generate_studies(SynthOptions(**options))`` under the session's
    basetemp, generated on the first call with these options, the same folder after. Read
    it, never write it."""
    opts = SynthOptions(**options)  # type: ignore[arg-type]
    base = factory.getbasetemp() / "studies"
    key = (base, opts)
    if key not in _STUDIES:
        out = base / f"{len(_STUDIES):02d}-seed{opts.seed}"
        generate_studies(out, opts)
        _STUDIES[key] = out
    return _STUDIES[key]


def copy_study(study: Path, out: Path) -> Path:
    """A private copy of a shared study, for a test that changes its files."""
    shutil.copytree(study, out)
    return out
