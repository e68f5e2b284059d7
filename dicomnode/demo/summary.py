"""The demo's summary: per breast the probabilities read back from the returned SRs, where the
model looked (the most-attended patch of each image, in rows/cols, mm and plain words), and
the synthetic ground truth next to it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.demo.returned import Region, ReturnedImage

MODALITY_NAMES = {"dbt": "DBT", "ffdm": "FFDM", "s2d": "S2D"}
BREAST_NAMES = {"L": "Left", "R": "Right"}


@dataclass(frozen=True)
class ViewGeometry:
    """How a mammographic view lies in its pixel grid, from PatientOrientation."""

    rows: int
    cols: int
    pixel_mm: float
    top: str  # what lies toward row 0: "outer"/"inner" (CC) or "upper"/"lower" (MLO)
    bottom: str
    chest_wall_at_left: bool  # chest wall at column 0 (nipple toward the last column)


@dataclass(frozen=True)
class Location:
    row: float
    col: float
    from_top_mm: float
    from_chest_wall_mm: float
    vertical: str  # outer | inner | upper | lower | central
    depth: str  # posterior | middle | anterior

    @property
    def words(self) -> str:
        return f"{self.vertical}, {self.depth} depth"


def pixel_spacing_mm(header: Dataset) -> float:
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    if spacing is None and "SharedFunctionalGroupsSequence" in header:
        shared = header.SharedFunctionalGroupsSequence[0]
        if "PixelMeasuresSequence" in shared:
            spacing = shared.PixelMeasuresSequence[0].get("PixelSpacing")
    return float(spacing[0]) if spacing else 0.1


def view_geometry(header: Dataset, laterality: str, view: str, rows: int, cols: int
                  ) -> ViewGeometry:
    """Top/bottom and chest-wall side of a view. PatientOrientation gives the direction of
    increasing column and row: 'A' columns run toward the nipple; rows toward 'F' (feet) put
    the upper breast on top (MLO); rows toward the other breast put the outer side on top."""
    orientation = [str(v) for v in (header.get("PatientOrientation") or [])]
    col_dir, row_dir = (orientation + ["", ""])[:2] if len(orientation) >= 2 else ("", "")
    chest_wall_at_left = ("A" in col_dir) if col_dir else laterality != "R"
    if "CC" in view.upper():
        medial = "R" if laterality == "L" else "L"
        lateral = "L" if laterality == "L" else "R"
        top_outer = medial in row_dir or lateral not in row_dir
        top, bottom = ("outer", "inner") if top_outer else ("inner", "outer")
    else:
        top, bottom = ("lower", "upper") if "H" in row_dir else ("upper", "lower")
    return ViewGeometry(rows, cols, pixel_spacing_mm(header), top, bottom, chest_wall_at_left)


def locate(geometry: ViewGeometry, row: float, col: float) -> Location:
    fraction = (row + 0.5) / geometry.rows
    vertical = (geometry.top if fraction < 0.4 else geometry.bottom if fraction > 0.6
                else "central")
    from_wall = col + 0.5 if geometry.chest_wall_at_left else geometry.cols - col - 0.5
    third = from_wall / geometry.cols
    depth = "posterior" if third < 1 / 3 else "middle" if third < 2 / 3 else "anterior"
    return Location(row, col, (row + 0.5) * geometry.pixel_mm, from_wall * geometry.pixel_mm,
                    vertical, depth)


def quadrant(cc: Location | None, mlo: Location | None) -> str:
    """'upper outer', 'lower inner', ... from the CC (outer/inner) and MLO (upper/lower)."""
    side = cc.vertical if cc is not None else "central"
    height = mlo.vertical if mlo is not None else "central"
    if side == "central" and height == "central":
        return "central"
    return " ".join(w for w in (height, side) if w != "central") + \
        (" (central)" if "central" in (side, height) else "")


@dataclass(frozen=True)
class Truth:
    """One synthetic finding in one image (findings.json)."""

    index: int  # the same finding in every view and modality of the breast
    kind: str
    malignant: bool
    row: float
    col: float
    slice_index: int | None
    radius_px: float


def read_truth(study_dir: Path) -> tuple[dict[str, list[Truth]], dict[str, dict[str, int]]]:
    """{sop_instance_uid: [Truth]} from findings.json and {sop_instance_uid: {benign,
    malignant}} labels from labels.csv, as the synthetic generator wrote them."""
    findings: dict[str, list[Truth]] = {}
    path = study_dir / "findings.json"
    if path.is_file():
        for entry in json.loads(path.read_text()):
            findings.setdefault(entry["sop_instance_uid"], []).append(Truth(
                index=int(entry.get("index", 0)), kind=entry["kind"],
                malignant=bool(entry["malignant"]), row=float(entry["row"]),
                col=float(entry["col"]), slice_index=entry.get("frame"),
                radius_px=float(entry["radius_px"])))
    labels: dict[str, dict[str, int]] = {}
    path = study_dir / "labels.csv"
    if path.is_file():
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                labels[row["sop_instance_uid"]] = {"benign": int(row["benign"]),
                                                   "malignant": int(row["malignant"])}
    return findings, labels


@dataclass
class ImageReport:
    returned: ReturnedImage
    geometry: ViewGeometry
    depth: int  # slices
    truth: list[Truth] = field(default_factory=list)
    peak_malignant: float = 0.0  # highest malignant saliency (returned PM) and its slice
    peak_malignant_slice: int = 0
    peak_benign: float = 0.0
    peak_benign_slice: int = 0
    overlay: Path | None = None

    @property
    def name(self) -> str:
        s = self.returned.source
        return f"{MODALITY_NAMES.get(s.modality, s.modality)} {s.view}"

    @property
    def top(self) -> Region | None:
        return self.returned.regions[0] if self.returned.regions else None

    @property
    def top_location(self) -> Location | None:
        top = self.top
        return None if top is None else locate(self.geometry, *top.centre)

    def covered_truth(self) -> list[Truth]:
        """The findings whose centre lies in the most-attended patch (same slice +/- 2 on a
        DBT, the patch's slice being where the model looked)."""
        top = self.top
        if top is None:
            return []
        return [t for t in self.truth if top.contains(t.row, t.col) and (
            t.slice_index is None or self.depth == 1 or abs(t.slice_index - top.slice_index) <= 2)]


@dataclass
class BreastReport:
    laterality: str
    images: list[ImageReport]
    labels: dict[str, int]

    def probabilities(self) -> dict[str, float] | None:
        """Breast-level probabilities as written in the returned SRs (every SR of the breast
        carries the same breast group); None when no SR came back."""
        for image in self.images:
            summary = image.returned.summary
            if summary is not None and "breast" in summary.probabilities:
                return summary.probabilities["breast"]
        return None

    def _view(self, view: str, *, modality_order=("dbt", "s2d", "ffdm")) -> ImageReport | None:
        for modality in modality_order:
            for image in self.images:
                s = image.returned.source
                if s.modality == modality and s.view.upper().startswith(view):
                    return image
        return None

    def model_quadrant(self) -> tuple[str, str]:
        cc, mlo = self._view("CC"), self._view("MLO")
        where = quadrant(cc.top_location if cc else None, mlo.top_location if mlo else None)
        return where, " and ".join(i.name for i in (cc, mlo) if i is not None)

    def truth_quadrant(self) -> str | None:
        cc, mlo = self._view("CC"), self._view("MLO")

        def first(image: ImageReport | None):
            if image is None or not image.truth:
                return None
            t = sorted(image.truth, key=lambda t: not t.malignant)[0]
            return locate(image.geometry, t.row, t.col)
        if not any(i and i.truth for i in (cc, mlo)):
            return None
        return quadrant(first(cc), first(mlo))


def _truth_lines(breast: BreastReport) -> list[str]:
    labels = breast.labels
    classes = [c for c in ("malignant", "benign") if labels.get(c)]
    if not classes:
        return ["  ground truth:    normal, no finding (labels.csv)"]
    views = [v for v in (breast._view("CC"), breast._view("MLO")) if v is not None]
    lines = [f"  ground truth:    {' and '.join(classes)} (labels.csv); "
             f"{breast.truth_quadrant() or 'location unknown'} (findings.json):"]
    indices = sorted({t.index for v in views for t in v.truth})
    for index in indices:
        parts, kind, size = [], "", 0.0
        for view in views:
            for t in view.truth:
                if t.index != index:
                    continue
                kind, size = t.kind, 2 * t.radius_px * view.geometry.pixel_mm
                where = locate(view.geometry, t.row, t.col)
                on_slice = f" slice {t.slice_index + 1}" if t.slice_index is not None and \
                    view.depth > 1 else ""
                parts.append(f"{view.name}{on_slice} {where.words}")
        lines.append(f"                   {kind} {size:.0f} mm: {'; '.join(parts)}")
    return lines


def _image_lines(image: ImageReport) -> list[str]:
    summary = image.returned.summary
    if summary is None or "final" not in summary.probabilities:
        return [f"    {image.name:<9} no SR came back for this image"]
    final = summary.probabilities["final"]
    peak = f"peak malignant saliency {image.peak_malignant:.2f}"
    if image.depth > 1:
        peak += f" on slice {image.peak_malignant_slice + 1}/{image.depth}"
    lines = [f"    {image.name:<9} malignant {final['malignant']:.3f}  benign "
             f"{final['benign']:.3f}  {peak}"]
    top, where = image.top, image.top_location
    if top is not None and where is not None:
        on_slice = f"slice {top.slice_index + 1}/{image.depth}, " if image.depth > 1 else ""
        covers = image.covered_truth()
        mark = ("  [covers the " + " and ".join(t.kind for t in covers) + "]") if covers else ""
        lines.append(
            f"              top patch (attention {top.attention:.2f}): {on_slice}rows "
            f"{top.row0:.0f}-{top.row1 - 1:.0f}, cols {top.col0:.0f}-{top.col1 - 1:.0f} "
            f"({where.from_top_mm:.0f} mm down, {where.from_chest_wall_mm:.0f} mm from the "
            f"chest wall): {where.words}{mark}")
    return lines


def format_summary(breasts: list[BreastReport]) -> list[str]:
    lines = []
    for breast in breasts:
        name = BREAST_NAMES.get(breast.laterality, breast.laterality)
        probs = breast.probabilities()
        if probs is None:
            lines.append(f"{breast.laterality} breast ({name}): no result came back")
            continue
        where, views = breast.model_quadrant()
        lines.append(f"{breast.laterality} breast ({name}): malignant {probs['malignant']:.3f}"
                     f"  benign {probs['benign']:.3f}  (from the returned SRs)")
        lines.append(f"  model looked at: {where} (most-attended patches of {views})")
        lines += _truth_lines(breast)
        for image in breast.images:
            lines += _image_lines(image)
    return lines
