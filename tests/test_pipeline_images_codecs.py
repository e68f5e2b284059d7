"""Compressed pixel data made by dcmtk (an independent encoder) loads to the original values."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from dicomnode.pipeline.images import load_image
from tests.support.dicom import phantom, write_enhanced_dbt, write_mammo

pytestmark = pytest.mark.dcmtk

LOSSLESS = [
    (["dcmcjpls"], JPEGLSLossless),  # JPEG-LS lossless
    (["dcmcrle"], RLELossless),  # RLE
    (["dcmcjpeg"], JPEGLosslessSV1),  # JPEG lossless, first-order prediction
]


def _dcmtk(args: list[str], src: Path, dst: Path) -> None:
    subprocess.run([*args, str(src), str(dst)], check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize(("tool", "syntax"), LOSSLESS, ids=["jpeg-ls", "rle", "jpeg-lossless"])
def test_lossless_multiframe_dbt(tmp_path: Path, tool: list[str], syntax: str) -> None:
    vol = phantom(5, 64, 48, "R", seed=2)
    write_enhanced_dbt(tmp_path / "in.dcm", vol, laterality="R")
    _dcmtk(tool, tmp_path / "in.dcm", tmp_path / "out.dcm")
    assert pydicom.dcmread(tmp_path / "out.dcm").file_meta.TransferSyntaxUID == syntax
    image = load_image(tmp_path / "out.dcm")
    np.testing.assert_array_equal(image.pixels, vol)
    assert image.transfer_syntax_uid == syntax
    assert image.laterality == "R"


@pytest.mark.parametrize(("tool", "syntax"), LOSSLESS[:2], ids=["jpeg-ls", "rle"])
def test_lossless_mammo_monochrome1(tmp_path: Path, tool: list[str], syntax: str) -> None:
    img = phantom(1, 64, 48, "L")[0]
    write_mammo(tmp_path / "in.dcm", img, photometric="MONOCHROME1")
    _dcmtk(tool, tmp_path / "in.dcm", tmp_path / "out.dcm")
    np.testing.assert_array_equal(load_image(tmp_path / "out.dcm").pixels[0], 4095.0 - img)


def test_jpeg_baseline_8bit(tmp_path: Path) -> None:
    img = phantom(1, 64, 48, "L", bits=8)[0]
    write_mammo(tmp_path / "in.dcm", img, bits=8)
    _dcmtk(["dcmcjpeg", "+eb"], tmp_path / "in.dcm", tmp_path / "out.dcm")
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    loaded = load_image(tmp_path / "out.dcm").pixels[0]
    diff = np.abs(loaded - img.astype(np.float32))
    # lossy: the random texture costs a few levels, the breast and background stay put
    assert diff.mean() < 6 and np.percentile(diff, 99) < 40
    assert (loaded[img == 0] < 20).mean() > 0.95
