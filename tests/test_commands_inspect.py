"""`dicomnode inspect`: one line per image; unusable input is a one-line error, exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from dicomnode.cli import cli
from tests.support.dicom import (
    JPEG2000Lossless,
    phantom,
    write_enhanced_dbt,
    write_mammo,
    write_seg_like,
    write_slice_series,
)


def _run_main(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from dicomnode.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def test_inspect_folder(tmp_path: Path) -> None:
    write_enhanced_dbt(tmp_path / "study" / "dbt.dcm", phantom(4, 64, 48, "R"), laterality="R",
                       view="MLO", transfer_syntax=JPEG2000Lossless)
    write_slice_series(tmp_path / "study" / "slices", phantom(3, 40, 32, "L"), view="CC")
    write_mammo(tmp_path / "study" / "s2d.dcm", phantom(1, 50, 40, "L")[0], laterality=None,
                synthetic=True)
    write_seg_like(tmp_path / "study" / "seg.dcm")
    (tmp_path / "study" / "notes.txt").write_text("not DICOM")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = sorted(result.output.strip().splitlines())
    assert len(lines) == 3
    dbt, s2d, series = lines
    assert dbt.split("  ") == [str(tmp_path / "study" / "dbt.dcm"), "dbt", "R", "MLO",
                               "4x64x48", "0.1x0.1mm",
                               "JPEG 2000 Image Compression (Lossless Only)"]
    assert s2d.split("  ")[1:5] == ["s2d", "L (from image)", "CC", "1x50x40"]
    assert series.split("  ")[:5] == [str(tmp_path / "study" / "slices"), "dbt", "L", "CC",
                                      "3x40x32"]
    assert series.endswith("Explicit VR Little Endian")


def test_inspect_errors_exit_1_with_uid(tmp_path: Path) -> None:
    ds = write_mammo(tmp_path / "bad.dcm", phantom(1, 32, 24)[0], pixels=False)
    result = _run_main("inspect", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert ds.SOPInstanceUID in result.stderr and "bad.dcm" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    (tmp_path / "bad.dcm").unlink()
    (tmp_path / "notes.txt").write_text("hello")
    assert _run_main("inspect", str(tmp_path)).returncode == 0  # skipped in a folder
    named = _run_main("inspect", str(tmp_path / "notes.txt"))
    assert named.returncode == 1
    assert named.stderr.startswith("error: ") and "notes.txt" in named.stderr
    assert "not a readable DICOM file" in named.stderr


def test_inspect_missing_path_is_usage_error(tmp_path: Path) -> None:
    assert _run_main("inspect", str(tmp_path / "nope")).returncode == 2
