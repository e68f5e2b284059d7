"""Texture families, varied lesions and acquisition in `dicomnode synth`, recorded per image
so that evaluation can group by them and leave a family out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from dicomnode.cli import cli
from dicomnode.pipeline.images import load_image
from dicomnode.synth import FAMILIES, SynthOptions, generate_studies, parse_families
from dicomnode.synth.imaging import sample_acquisition
from dicomnode.synth.lesions import (
    BENIGN_MARGINS,
    CALC_MORPHOLOGIES,
    CALCIFICATIONS,
    MALIGNANT_MARGINS,
    MALIGNANT_MASS,
    sample_finding,
)
from dicomnode.synth.options import SIZE_SPECS
from dicomnode.synth.texture import texture_field


def _coherence(field: np.ndarray) -> float:
    """Mean in-plane orientation coherence (structure tensor): 0 isotropic, 1 lines."""
    gy, gx = ndimage.sobel(field, axis=1), ndimage.sobel(field, axis=2)
    sigma = (0, 4, 4)
    jxx = ndimage.gaussian_filter(gx * gx, sigma)
    jyy = ndimage.gaussian_filter(gy * gy, sigma)
    jxy = ndimage.gaussian_filter(gx * gy, sigma)
    return float((np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / (jxx + jyy + 1e-9)).mean())


def test_families_are_normalised_seeded_and_different() -> None:
    shape, spacing = (12, 90, 64), (1.0, 0.5, 0.5)
    fields = {}
    for family in FAMILIES:
        field, params = texture_field(family, np.random.default_rng(0), shape, spacing,
                                      (45.0, 30.0))
        again, _ = texture_field(family, np.random.default_rng(0), shape, spacing, (45.0, 30.0))
        assert params["family"] == family and len(params) > 2
        assert abs(float(field.mean())) < 1e-3 and abs(float(field.std()) - 1) < 1e-3
        np.testing.assert_array_equal(field, again)
        fields[family] = field
    for a in FAMILIES:
        for b in FAMILIES:
            if a < b:
                assert abs(np.corrcoef(fields[a].ravel(), fields[b].ravel())[0, 1]) < 0.5
    # Ligaments are elongated structures: far more oriented than the power-law texture.
    for seed in range(3):
        ligament, _ = texture_field("ligament", np.random.default_rng(seed), shape, spacing,
                                    (45.0, 30.0))
        powerlaw, _ = texture_field("powerlaw", np.random.default_rng(seed), shape, spacing,
                                    (45.0, 30.0))
        assert _coherence(ligament) > _coherence(powerlaw) + 0.15


def test_parse_families_and_validation() -> None:
    assert parse_families("lumpy, powerlaw") == ("powerlaw", "lumpy")
    assert parse_families("all") == FAMILIES
    assert parse_families("-lumpy") == ("powerlaw", "ligament", "mixture")
    assert parse_families("all,-powerlaw,-mixture") == ("ligament", "lumpy")
    with pytest.raises(ValueError, match="unknown family"):
        parse_families("marble")
    with pytest.raises(ValueError, match="at least one"):
        SynthOptions(families=())
    assert SynthOptions(families="ligament,lumpy").families == ("ligament", "lumpy")


def test_varied_findings_cover_margins_sizes_and_morphologies() -> None:
    rng = np.random.default_rng(0)
    full, small = SIZE_SPECS["full"], SIZE_SPECS["small"]
    masses = [sample_finding(rng, kind, full, variety=True)
              for kind in ("benign mass", MALIGNANT_MASS) for _ in range(300)]
    sizes = np.array([2 * f.radius_mm for f in masses])
    assert sizes.min() < 4 and sizes.max() > 25 and (sizes >= 3).all() and (sizes <= 30).all()
    assert {f.margin for f in masses if not f.malignant} == set(BENIGN_MARGINS)
    assert {f.margin for f in masses if f.malignant} == set(MALIGNANT_MARGINS)
    assert all(f.spicules for f in masses if f.margin == "spiculated")
    assert not any(f.spicules for f in masses if f.margin != "spiculated")
    edges = {m: np.mean([f.edge_mm for f in masses if f.margin == m]) for m in MALIGNANT_MARGINS}
    assert edges["indistinct"] > 3 * edges["circumscribed"]
    small_sizes = [2 * sample_finding(rng, MALIGNANT_MASS, small, variety=True).radius_mm
                   for _ in range(100)]
    assert max(small_sizes) <= small.varied_mass_diameter_mm[1]
    calcs = [sample_finding(rng, CALCIFICATIONS, full, variety=True) for _ in range(100)]
    assert {f.margin for f in calcs} == set(CALC_MORPHOLOGIES)
    # The original generator's draws are unchanged without variety.
    plain = sample_finding(np.random.default_rng(1), MALIGNANT_MASS, small)
    assert plain.margin in ("spiculated", "irregular") and 5 <= 2 * plain.radius_mm <= 14


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_families_and_acquisition_are_recorded_per_image(tmp_path: Path) -> None:
    options = SynthOptions(studies=4, seed=11, modalities=("dbt", "s2d"),
                           families=("ligament", "lumpy", "mixture"), variety=True)
    records = generate_studies(tmp_path, options)
    rows = _rows(tmp_path)
    assert {r["family"] for r in rows} <= {"ligament", "lumpy", "mixture"}
    assert len({r.family for r in records}) >= 2  # drawn per study
    for study in records:
        mine = [r for r in rows if r["study_uid"] == study.study_uid]
        assert {r["family"] for r in mine} == {study.family}
        assert {r["vendor"] for r in mine} == {study.acquisition.vendor}
        for r in mine:
            assert r["texture"] and "=" in r["texture"]
            bits = int(r["bits_stored"])
            assert bits in (10, 12, 14)
            image = load_image(tmp_path / r["path"])
            assert image.pixels.max() <= 2 ** bits - 1
    findings = json.loads((tmp_path / "findings.json").read_text())
    for entry in findings:
        assert entry["family"] in ("ligament", "lumpy", "mixture")
        assert entry["margin"] and entry["size_mm"] > 0
    with_lesions = [r for r in rows if int(r["lesion_count"])]
    for r in with_lesions:
        assert len(r["lesion_kinds"].split(";")) == int(r["lesion_count"])
        assert all(float(v) > 0 for v in r["lesion_sizes_mm"].split(";"))


def test_monochrome1_vendor_style_reads_back_the_same_way_up(tmp_path: Path) -> None:
    """A vendor style that stores projections inverted (MONOCHROME1) must read back with the
    breast brighter than the background, as every other image."""
    seed = next(s for s in range(200) if sample_acquisition(
        np.random.default_rng([s, 0, 6]), ("dicomnode", "style-a", "style-b", "style-c")
    ).vendor == "style-b")
    generate_studies(tmp_path, SynthOptions(studies=1, seed=seed, modalities=("s2d",),
                                            variety=True))
    path = next(tmp_path.glob("*/s2d/L_CC.dcm"))
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.Manufacturer == "Synthetic Vendor B"
    pixels = load_image(path).pixels[0]
    rows, cols = pixels.shape
    breast = pixels[rows // 3:2 * rows // 3, : cols // 3].mean()  # left breast: chest wall left
    background = pixels[:20, -20:].mean()
    assert breast > background + 100


def test_cli_families_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "o"), "--studies", "1",
                                       "--modalities", "s2d", "--families", "-powerlaw,-lumpy,"
                                       "-ligament", "--variety"])
    assert result.exit_code == 0, result.output
    assert {r["family"] for r in _rows(tmp_path / "o")} == {"mixture"}
    bad = CliRunner().invoke(cli, ["synth", str(tmp_path / "x"), "--studies", "1",
                                    "--families", "marble"])
    assert bad.exit_code == 2 and "unknown family" in bad.output
