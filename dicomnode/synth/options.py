"""Options of the synthetic study generator and the physical constants it keeps at every size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MODALITIES = ("dbt", "ffdm", "s2d")
SIZES = ("small", "full")
TRANSFER_SYNTAXES = ("explicit", "j2k")
DBT_LAYOUTS = ("enhanced", "single-frame")
DBT_GEOMETRIES = ("shared", "per-frame")
# Anatomical texture families (dicomnode.synth.texture); "powerlaw" is the original generator.
FAMILIES = ("powerlaw", "ligament", "lumpy", "mixture")

# Clinical sampling, the same for `small` and `full`: small studies have a smaller field of
# view, never coarser pixels.
DBT_PIXEL_MM = 0.1  # in-plane DBT and synthetic 2D
FFDM_PIXEL_MM = 0.07
SLICE_MM = 1.0  # between reconstructed DBT slices
# The anatomy is generated on a coarse grid (5 x the DBT pixel) and upsampled; lesions are
# rendered analytically at the output pixel size.
COARSE_MM = 0.5
COARSE_FACTOR = round(COARSE_MM / DBT_PIXEL_MM)


@dataclass(frozen=True)
class SizeSpec:
    """Ranges (mm) of one breast's field of view and compressed thickness."""

    height_mm: tuple[float, float]  # along the chest wall (image rows)
    width_mm: tuple[float, float]  # chest wall to past the nipple (image columns)
    thickness_mm: tuple[float, float]  # compressed thickness = number of 1 mm DBT slices
    mass_diameter_mm: tuple[float, float]
    cluster_radius_mm: tuple[float, float]
    # Mass diameters with --variety (log-uniform): screening finds masses of ~3 to 30 mm; a
    # small field of view (~45 x 31 mm) holds them up to about half its width.
    varied_mass_diameter_mm: tuple[float, float] = (3.0, 30.0)


SIZE_SPECS: dict[str, SizeSpec] = {
    # ~450x310 px DBT slices, 10-16 slices: one 4-view, 3-modality study in about a second.
    "small": SizeSpec((42.0, 48.0), (29.0, 33.0), (10.0, 16.0), (5.0, 14.0), (2.5, 4.0),
                      (3.0, 16.0)),
    # Cropped clinical DBT: ~1900-2600 x 1250-1750 px, 40-85 slices.
    "full": SizeSpec((190.0, 260.0), (125.0, 175.0), (40.0, 85.0), (5.0, 25.0), (3.0, 6.0)),
}


@dataclass(frozen=True)
class SynthOptions:
    """What `generate_studies` writes. Invalid values raise ValueError naming the field."""

    studies: int = 1
    size: Literal["small", "full"] = "small"
    seed: int = 0
    transfer_syntax: Literal["explicit", "j2k"] = "explicit"
    modalities: tuple[str, ...] = field(default=MODALITIES)
    dbt_layout: Literal["enhanced", "single-frame"] = "enhanced"
    dbt_geometry: Literal["shared", "per-frame"] = "shared"
    # Texture families to draw each study's from (uniformly); one family: all studies.
    families: tuple[str, ...] = ("powerlaw",)
    # Vary lesions (margins, 3-30 mm, morphologies, contrasts) and acquisition (noise, blur,
    # tone curve, bit depth, vendor header style) per study. Off: the original generator's
    # fixed choices, byte for byte (what the built-in weights were trained on).
    variety: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.families, str):
            object.__setattr__(self, "families", parse_families(self.families))
        else:
            object.__setattr__(self, "families", tuple(self.families))
        if not self.families:
            raise ValueError(f"families must name at least one of {', '.join(FAMILIES)}")
        unknown_families = [f for f in self.families if f not in FAMILIES]
        if unknown_families:
            raise ValueError(f"unknown families {', '.join(unknown_families)}; use "
                             f"{', '.join(FAMILIES)}")
        if len(set(self.families)) != len(self.families):
            raise ValueError(f"families repeat: {','.join(self.families)}")
        if isinstance(self.modalities, str):
            object.__setattr__(self, "modalities", parse_modalities(self.modalities))
        else:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        if not isinstance(self.studies, int) or self.studies < 1:
            raise ValueError(f"studies must be an integer of at least 1, got {self.studies!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, allowed in (("size", SIZES), ("transfer_syntax", TRANSFER_SYNTAXES),
                              ("dbt_layout", DBT_LAYOUTS), ("dbt_geometry", DBT_GEOMETRIES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        if not self.modalities:
            raise ValueError("modalities must name at least one of dbt, ffdm, s2d")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {', '.join(unknown)}; use dbt, ffdm, s2d")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities repeat: {','.join(self.modalities)}")


def parse_modalities(text: str) -> tuple[str, ...]:
    """'dbt, s2d' -> ('dbt', 's2d'), kept in the canonical order."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {', '.join(unknown)}; use dbt, ffdm, s2d")
    return tuple(m for m in MODALITIES if m in names)


def parse_families(text: str) -> tuple[str, ...]:
    """'lumpy, powerlaw' -> ('powerlaw', 'lumpy') (canonical order); 'all' -> every family;
    '-lumpy' (or 'all,-lumpy') -> every family but lumpy (leave one family out)."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if names and all(n.startswith("-") for n in names):
        names = ["all", *names]
    keep = set(FAMILIES) if "all" in names else set()
    for n in names:
        if n == "all":
            continue
        if n.startswith("-"):
            keep.discard(n[1:])
            if n[1:] not in FAMILIES:
                raise ValueError(f"unknown family {n[1:]!r}; use {', '.join(FAMILIES)}")
        elif n not in FAMILIES:
            raise ValueError(f"unknown family {n!r}; use {', '.join(FAMILIES)}")
        else:
            keep.add(n)
    return tuple(f for f in FAMILIES if f in keep)
