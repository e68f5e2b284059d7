"""`generate_studies`: synthetic combo-exam studies on disk, with labels and ground truth.

Layout under OUT:
    labels.csv                                  one row per image (all studies, merged)
    findings.json                               one entry per finding per image (merged)
    <patient id>/dbt/L_CC.dcm                   enhanced DBT (or dbt/L_CC/slice_000.dcm ...)
    <patient id>/ffdm/L_CC.dcm, s2d/L_CC.dcm
    <patient id>/seg/dbt_L_CC_seg.dcm           ground-truth SEG per image

Every random choice comes from a generator seeded by (seed, study, breast, view, purpose), so
the same seed writes the same bytes and UIDs, and one modality's noise does not depend on which
other modalities were asked for.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import BreastTomosynthesisImageStorage

from dicomnode.ops.logs import kv
from dicomnode.synth import dicom_writer as w
from dicomnode.synth.anatomy import (
    DENSITY_PREVALENCE,
    BreastParams,
    build_view_phantom,
    sample_breast,
)
from dicomnode.synth.imaging import (
    Acquisition,
    RenderedView,
    render_view,
    sample_acquisition,
)
from dicomnode.synth.lesions import (
    BENIGN_MASS,
    CALCIFICATIONS,
    MALIGNANT_MASS,
    FindingSpec,
    PlacedFinding,
    place_finding,
    sample_finding,
)
from dicomnode.synth.options import (
    DBT_PIXEL_MM,
    FFDM_PIXEL_MM,
    SIZE_SPECS,
    SLICE_MM,
    SizeSpec,
    SynthOptions,
)
from dicomnode.synth.seeded_uids import make_uid
from dicomnode.synth.truth_seg import build_seg, write_seg

log = logging.getLogger("dicomnode.synth")

LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")
CATEGORIES = ("normal", "benign", "malignant")
LABEL_COLUMNS = ["study_uid", "patient_id", "laterality", "view", "modality", "sop_instance_uid",
                 "benign", "malignant", "series_uid", "path", "seg_path", "lesion_count",
                 "frames", "rows", "columns", "pixel_spacing_mm", "density", "size", "seed",
                 # what evaluation can group by (dicomnode evaluate --group-by)
                 "family", "texture", "vendor", "noise_scale", "blur_px", "tone_gamma",
                 "tone_shoulder", "bits_stored", "lesion_kinds", "lesion_margins",
                 "lesion_sizes_mm"]
SERIES_NUMBERS = {"ffdm": 1, "dbt": 11, "s2d": 21}
DESCRIPTIONS = {"ffdm": "FFDM", "dbt": "Tomosynthesis", "s2d": "Synthetic 2D"}


@dataclass
class FindingRecord:
    """Where one finding lies in one image (pixel indices, 0-based; frame = DBT slice)."""

    index: int  # finding number within the breast (same finding across views and modalities)
    kind: str  # "benign mass" | "malignant mass" | "calcification cluster"
    benign: int
    malignant: int
    row: float
    col: float
    frame: int | None
    radius_px: float
    frame_sop_instance_uid: str | None = None  # single-frame DBT: the slice holding the centre
    margin: str = ""  # mass margin or calcification morphology
    size_mm: float = 0.0  # largest in-plane diameter (mass core or cluster)
    contrast: float = 0.0  # mass attenuation above glandular tissue, 1/cm (0: calcifications)


@dataclass
class ImageRecord:
    modality: str  # "dbt" | "ffdm" | "s2d"
    laterality: str
    view: str
    sop_instance_uid: str  # single-frame DBT: the first slice's
    series_instance_uid: str
    sop_class_uid: str
    paths: list[Path]  # one file, or one per slice for single-frame DBT
    seg_path: Path | None
    seg_sop_instance_uid: str | None
    shape: tuple[int, ...]  # (rows, cols) or (frames, rows, cols)
    pixel_spacing_mm: float
    benign: int
    malignant: int
    findings: list[FindingRecord] = field(default_factory=list)
    frame_sop_instance_uids: list[str] = field(default_factory=list)
    texture: dict = field(default_factory=dict)  # the view's texture family and parameters
    bits_stored: int = 0

    @property
    def path(self) -> Path:
        """The file, or the folder of a single-frame DBT series."""
        return self.paths[0] if len(self.paths) == 1 else self.paths[0].parent

    @property
    def labels(self) -> dict[str, int]:
        return {"benign": self.benign, "malignant": self.malignant}


@dataclass
class StudyRecord:
    study_uid: str
    patient_id: str
    patient_name: str
    frame_of_reference_uid: str
    folder: Path
    density: str
    category: str  # "normal" | "benign" | "malignant"
    images: list[ImageRecord] = field(default_factory=list)
    family: str = "powerlaw"  # texture family of both breasts
    acquisition: Acquisition = field(default_factory=Acquisition)


def generate_studies(out_dir: Path, options: SynthOptions) -> list[StudyRecord]:
    """Write `options.studies` studies under `out_dir`; returns what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(options.studies):
        started = time.monotonic()
        record = generate_study(out_dir, options, index)
        log.info("event=synth_study %s", kv(study_uid=record.study_uid, index=index,
                                             images=len(record.images), category=record.category,
                                             seconds=round(time.monotonic() - started, 2)))
        records.append(record)
    _write_labels(out_dir, records, options)
    _write_findings(out_dir, records)
    return records


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _draw_findings(rng: np.random.Generator, category: str, spec: SizeSpec,
                   variety: bool = False) -> dict[str, list[FindingSpec]]:
    """Per breast: findings usually in one breast only; sometimes several in one breast."""
    out: dict[str, list[FindingSpec]] = {"L": [], "R": []}
    if category == "normal":
        return out
    main = str(rng.choice(LATERALITIES))
    other = "R" if main == "L" else "L"
    if category == "benign":
        out[main].append(sample_finding(rng, BENIGN_MASS, spec, variety))
        if rng.random() < 0.3:
            out[main].append(sample_finding(rng, BENIGN_MASS, spec, variety))
    else:
        kind = MALIGNANT_MASS if rng.random() < 0.6 else CALCIFICATIONS
        out[main].append(sample_finding(rng, kind, spec, variety))
        if rng.random() < 0.15:
            out[main].append(sample_finding(rng, CALCIFICATIONS if kind == MALIGNANT_MASS
                                            else MALIGNANT_MASS, spec, variety))
        if rng.random() < 0.2:
            out[main].append(sample_finding(rng, BENIGN_MASS, spec, variety))
    if rng.random() < 0.1:
        out[other].append(sample_finding(rng, BENIGN_MASS, spec, variety))
    return out


def generate_study(out_dir: Path, options: SynthOptions, index: int) -> StudyRecord:
    """One patient's four views in the requested modalities."""
    seed = options.seed
    spec = SIZE_SPECS[options.size]
    rng = _rng(seed, index, 0)
    density = str(rng.choice(list(DENSITY_PREVALENCE), p=list(DENSITY_PREVALENCE.values())))
    category = str(rng.choice(CATEGORIES))
    findings = _draw_findings(rng, category, spec, options.variety)
    base = sample_breast(rng, spec, density)
    breasts = {lat: _jitter(rng, base, spec) for lat in LATERALITIES}
    day = dt.date(2024, 1, 2) + dt.timedelta(days=int(rng.integers(0, 700)))
    clock = f"{int(rng.integers(8, 18)):02d}{int(rng.integers(0, 60)):02d}00"
    patient_id = f"SYNTH-{seed}-{index + 1:04d}"
    study = w.StudyContext(
        patient_name=f"SYNTH^{index + 1:04d}", patient_id=patient_id,
        patient_birth_date=f"{int(rng.integers(1945, 1985))}0101",
        study_uid=make_uid(seed, index, "study"), study_date=day.strftime("%Y%m%d"),
        study_time=clock, accession_number=f"S{seed}A{index + 1:05d}"[:16],
        study_id=f"{index + 1}", frame_of_reference_uid=make_uid(seed, index, "frame-of-reference"))
    folder = out_dir / patient_id
    # Family and machine from their own generators: the original generator's draws above
    # stay as they were.
    families = options.families
    family = families[0] if len(families) == 1 else str(_rng(seed, index, 5).choice(families))
    acquisition = (sample_acquisition(_rng(seed, index, 6), tuple(w.VENDOR_STYLES))
                   if options.variety else Acquisition())
    record = StudyRecord(study_uid=study.study_uid, patient_id=patient_id,
                         patient_name=study.patient_name,
                         frame_of_reference_uid=study.frame_of_reference_uid, folder=folder,
                         density=density, category=category, family=family,
                         acquisition=acquisition)
    for li, lat in enumerate(LATERALITIES):
        for vi, view in enumerate(VIEWS):
            vrng = _rng(seed, index, li, vi, 1)
            phantom = build_view_phantom(vrng, view, spec, breasts[lat], family=family,
                                         texture_rng=_rng(seed, index, li, vi, 4),
                                         variety=options.variety)
            texture = phantom.texture
            placed = [place_finding(f, phantom, n) for n, f in enumerate(findings[lat])]
            rendered = render_view(
                phantom, placed, _rng(seed, index, li, vi, 2), _rng(seed, index, li, vi, 3),
                want_dbt="dbt" in options.modalities, want_s2d="s2d" in options.modalities,
                want_ffdm="ffdm" in options.modalities, mirror=lat == "R",
                acquisition=acquisition)
            del phantom
            labels = (int(any(not f.malignant for f in findings[lat])),
                      int(any(f.malignant for f in findings[lat])))
            images = _write_view(folder, options, study, index, lat, view, rendered, placed,
                                 labels, acquisition)
            for image in images:
                image.texture = texture
            record.images.extend(images)
            del rendered  # before the next view is rendered: one view in memory at a time
    return record


def _jitter(rng: np.random.Generator, base: BreastParams, spec: SizeSpec) -> BreastParams:
    # Left and right breasts of one woman: nearly the same size and density.
    lo, hi = spec.thickness_mm
    return BreastParams(
        height_mm=float(np.clip(base.height_mm * rng.uniform(0.96, 1.04), *spec.height_mm)),
        width_mm=float(np.clip(base.width_mm * rng.uniform(0.96, 1.04), *spec.width_mm)),
        thickness_mm=float(np.clip(base.thickness_mm + rng.uniform(-2, 2), lo, hi)),
        shape_exponent=base.shape_exponent, gland_fraction=base.gland_fraction)


def _finding_records(placed: list[PlacedFinding], lat: str, pixel_mm: float, cols: int,
                     frames: int | None) -> list[FindingRecord]:
    out = []
    for f in placed:
        x, y, z = f.centre_mm
        col = x / pixel_mm - 0.5
        if lat == "R":
            col = cols - 1 - col
        if f.spec.kind == CALCIFICATIONS:
            radius = f.spec.radius_mm
        else:
            radius = f.spec.radius_mm * max(f.spec.axes[:2])
        frame = None
        if frames is not None:
            frame = int(min(max(np.floor(z / SLICE_MM), 0), frames - 1))
        out.append(FindingRecord(index=f.index, kind=f.spec.kind, benign=int(not f.spec.malignant),
                                 malignant=int(f.spec.malignant), row=round(y / pixel_mm - 0.5, 2),
                                 col=round(col, 2), frame=frame,
                                 radius_px=round(radius / pixel_mm, 2), margin=f.spec.margin,
                                 size_mm=round(f.spec.diameter_mm, 2),
                                 contrast=round(f.spec.contrast, 4)))
    return out


def _write_view(folder: Path, options: SynthOptions, study: w.StudyContext, index: int, lat: str,
                view: str, rendered: RenderedView, placed: list[PlacedFinding],
                labels: tuple[int, int], acquisition: Acquisition | None = None
                ) -> list[ImageRecord]:
    acq = acquisition or Acquisition()
    seed, ts = options.seed, options.transfer_syntax
    name = f"{lat}_{view}"
    offset = LATERALITIES.index(lat) * 2 + VIEWS.index(view)
    out: list[ImageRecord] = []

    def ctx(modality: str, sop_uid: str, instance: int = 1) -> w.ImageContext:
        return w.ImageContext(
            study=study, laterality=lat, view=view,
            series_uid=make_uid(seed, index, modality, lat, view, "series"),
            series_number=SERIES_NUMBERS[modality] + offset,
            series_description=f"{DESCRIPTIONS[modality]} {lat} {view}",
            sop_uid=sop_uid, instance_number=instance, vendor=acq.vendor)

    def seg_for(modality: str, sources: list[Dataset], masks) -> tuple[Path, str]:
        seg_uid = make_uid(seed, index, modality, lat, view, "seg")
        seg = build_seg(sources, masks, make_uid(seed, index, modality, lat, view, "seg-series"),
                        seg_uid, study.study_date, study.study_time)
        path = folder / "seg" / f"{modality}_{name}_seg.dcm"
        write_seg(seg, path)
        return path, seg_uid

    dbt_refs: list[tuple[str, str]] = []
    if rendered.dbt is not None:
        volume = rendered.dbt
        frames = volume.shape[0]
        context = ctx("dbt", make_uid(seed, index, "dbt", lat, view))
        findings = _finding_records(placed, lat, DBT_PIXEL_MM, volume.shape[2], frames)
        if options.dbt_layout == "enhanced":
            ds = w.dbt_enhanced(context, volume, acq.dbt_bits, options.dbt_geometry)
            path = folder / "dbt" / f"{name}.dcm"
            w.write(ds, volume, path, ts)
            paths, frame_uids = [path], []
            source = w.to_shared_geometry(ds) if options.dbt_geometry != "shared" else ds
            seg_path, seg_uid = seg_for("dbt", [source], rendered.masks.dbt)
            dbt_refs = [(BreastTomosynthesisImageStorage, context.sop_uid)]
        else:
            window = w._window(volume)
            slices, paths, frame_uids = [], [], []
            for k in range(frames):
                uid = make_uid(seed, index, "dbt", lat, view, "slice", k)
                ds = w.dbt_slice(ctx("dbt", uid, k + 1), volume[k], acq.dbt_bits, k, window)
                path = folder / "dbt" / name / f"slice_{k:03d}.dcm"
                w.write(ds, volume[k], path, ts)
                slices.append(ds)
                paths.append(path)
                frame_uids.append(uid)
            seg_path, seg_uid = seg_for("dbt", slices, rendered.masks.dbt)
            dbt_refs = [(str(ds.SOPClassUID), uid) for uid in frame_uids]
            for f in findings:
                f.frame_sop_instance_uid = frame_uids[f.frame] if f.frame is not None else None
        out.append(ImageRecord(
            modality="dbt", laterality=lat, view=view,
            sop_instance_uid=frame_uids[0] if frame_uids else context.sop_uid,
            series_instance_uid=context.series_uid, sop_class_uid=str(ds.SOPClassUID),
            paths=paths, seg_path=seg_path, seg_sop_instance_uid=seg_uid, shape=volume.shape,
            pixel_spacing_mm=DBT_PIXEL_MM, benign=labels[0], malignant=labels[1],
            findings=findings, frame_sop_instance_uids=frame_uids, bits_stored=acq.dbt_bits))
        rendered.dbt = None  # the largest array: free it before the projections' SEGs
        del volume

    for modality, pixels, mask, bits, spacing in (
            ("s2d", rendered.s2d, rendered.masks.s2d, acq.s2d_bits, DBT_PIXEL_MM),
            ("ffdm", rendered.ffdm, rendered.masks.ffdm, acq.ffdm_bits, FFDM_PIXEL_MM)):
        if pixels is None:
            continue
        context = ctx(modality, make_uid(seed, index, modality, lat, view))
        sources = dbt_refs if modality == "s2d" else None
        ds = w.projection_image(context, pixels, bits, modality, rendered.thickness_mm, sources)
        path = folder / modality / f"{name}.dcm"
        w.write(ds, w.stored_pixels(context, pixels, bits), path, ts)
        seg_path, seg_uid = seg_for(modality, [ds], np.ascontiguousarray(mask))
        out.append(ImageRecord(
            modality=modality, laterality=lat, view=view, sop_instance_uid=context.sop_uid,
            series_instance_uid=context.series_uid, sop_class_uid=str(ds.SOPClassUID),
            paths=[path], seg_path=seg_path, seg_sop_instance_uid=seg_uid, shape=pixels.shape,
            pixel_spacing_mm=spacing, benign=labels[0], malignant=labels[1],
            findings=_finding_records(placed, lat, spacing, pixels.shape[1], None),
            bits_stored=bits))
    return out


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _write_labels(out_dir: Path, records: list[StudyRecord], options: SynthOptions) -> None:
    """Merge into OUT/labels.csv: rows of regenerated studies are replaced, others kept."""
    path = out_dir / "labels.csv"
    new_uids = {r.study_uid for r in records}
    rows: list[dict[str, str]] = []
    if path.exists():
        with path.open(newline="") as fh:
            rows = [row for row in csv.DictReader(fh) if row.get("study_uid") not in new_uids]
    for study in records:
        for im in study.images:
            rows.append({
                "study_uid": study.study_uid, "patient_id": study.patient_id,
                "laterality": im.laterality, "view": im.view, "modality": im.modality,
                "sop_instance_uid": im.sop_instance_uid, "benign": str(im.benign),
                "malignant": str(im.malignant), "series_uid": im.series_instance_uid,
                "path": _relative(im.path, out_dir), "seg_path": _relative(im.seg_path, out_dir),
                "lesion_count": str(len(im.findings)),
                "frames": str(im.shape[0] if len(im.shape) == 3 else 1),
                "rows": str(im.shape[-2]), "columns": str(im.shape[-1]),
                "pixel_spacing_mm": str(im.pixel_spacing_mm), "density": study.density,
                "size": options.size, "seed": str(options.seed), "family": study.family,
                "texture": ";".join(f"{k}={v}" for k, v in im.texture.items()
                                    if k != "family"),
                **study.acquisition.record(), "bits_stored": str(im.bits_stored),
                "lesion_kinds": ";".join(f.kind for f in im.findings),
                "lesion_margins": ";".join(f.margin for f in im.findings),
                "lesion_sizes_mm": ";".join(f"{f.size_mm:g}" for f in im.findings)})
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _write_findings(out_dir: Path, records: list[StudyRecord]) -> None:
    path = out_dir / "findings.json"
    new_uids = {r.study_uid for r in records}
    entries: list[dict] = []
    if path.exists():
        entries = [e for e in json.loads(path.read_text()) if e.get("study_uid") not in new_uids]
    for study in records:
        for im in study.images:
            for f in im.findings:
                entry = {"study_uid": study.study_uid, "patient_id": study.patient_id,
                         "family": study.family, "modality": im.modality,
                         "laterality": im.laterality, "view": im.view,
                         "sop_instance_uid": im.sop_instance_uid,
                         "seg_sop_instance_uid": im.seg_sop_instance_uid,
                         "path": _relative(im.path, out_dir)}
                entry.update({k: v for k, v in vars(f).items()
                              if v is not None or k != "frame_sop_instance_uid"})
                entries.append(entry)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)
