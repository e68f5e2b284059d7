"""A de-identified training set from the archive: the images and result objects of the
studies a labels CSV names, and the labels, de-identified by :mod:`dicomnode.export.deidentify`.

OUT/images/STUDY/SERIES/SOP.dcm and OUT/results/STUDY/SERIES/SOP.dcm (the new UIDs),
OUT/labels.csv (the label columns only, UIDs remapped, patients pseudonymised) and
OUT/export.json (what was done, counts; never the key, which stays in the node's data_dir).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from dicomnode.errors import DicomnodeError
from dicomnode.export.deidentify import (
    METHOD,
    TABLE_VERSION,
    Deidentifier,
    DeidentifyError,
    scrub_labels_row,
)
from dicomnode.ops.logs import kv

if TYPE_CHECKING:
    from storage import Store

log = logging.getLogger("dicomnode.export")

# Label columns a training set needs; anything else in the labels file (paths, free text)
# stays behind.
LABEL_COLUMNS = ("study_uid", "series_uid", "sop_instance_uid", "patient_id", "study_date",
                 "laterality", "view", "modality", "benign", "malignant", "split")


class ExportError(DicomnodeError):
    """The export cannot run as asked (bad labels file, output not empty, ...)."""


@dataclass
class ExportReport:
    studies: int = 0
    images: int = 0
    results: int = 0
    labels: int = 0
    missing: list[str] = field(default_factory=list)  # study UIDs not in the archive
    refused: list[str] = field(default_factory=list)  # "SOP UID: why" (e.g. burned-in text)
    dropped_columns: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"exported={self.studies} missing={len(self.missing)} images={self.images} "
                f"results={self.results} refused={len(self.refused)}")


def _read_labels(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise ExportError(f"labels file {path} does not exist; pass the training labels CSV")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()
                     if not isinstance(v, list)} for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ExportError(f"{path}: not a readable CSV file ({exc})") from None
    if "study_uid" not in columns and "sop_instance_uid" not in columns:
        raise ExportError(f"{path}: no study_uid or sop_instance_uid column; the export takes "
                          "the studies a training labels file names")
    return columns, rows


def _study_of(store: Store, sop_uids: list[str]) -> dict[str, str]:
    return store.studies_of_instances(sop_uids) if sop_uids else {}


def export_deidentified(store: Store, key: bytes, labels: Path, out: Path,
                        progress: Callable[[str], None] | None = None) -> ExportReport:
    """Write the de-identified training set to ``out`` (which must be empty or absent)."""
    from storage import StudyNotFound

    columns, rows = _read_labels(labels)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new folder")
    deid = Deidentifier(key)
    report = ExportReport(dropped_columns=[c for c in columns if c not in LABEL_COLUMNS])
    by_sop = _study_of(store, [r["sop_instance_uid"] for r in rows
                               if r.get("sop_instance_uid") and not r.get("study_uid")])
    for row in rows:
        if not row.get("study_uid") and row.get("sop_instance_uid") in by_sop:
            row["study_uid"] = by_sop[row["sop_instance_uid"]]
    studies = list(dict.fromkeys(r["study_uid"] for r in rows if r.get("study_uid")))
    exported: dict[str, tuple[str, str]] = {}  # source study UID -> (pseudonym, study date)
    for study_uid in studies:
        try:
            instances = store.study_instances(study_uid)
        except StudyNotFound:
            report.missing.append(study_uid)
            continue
        results = store.study_results(study_uid)
        for kind, paths in (("images", [i.path for i in instances]),
                            ("results", [r.path for r in results])):
            for path in paths:
                ds = pydicom.dcmread(path)
                source_uid = str(ds.SOPInstanceUID)
                try:
                    deid.deidentify(ds)
                except DeidentifyError as exc:
                    report.refused.append(f"{source_uid}: {exc}")
                    continue
                target = (out / kind / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
                          / f"{ds.SOPInstanceUID}.dcm")
                target.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(target, enforce_file_format=True)
                setattr(report, kind, getattr(report, kind) + 1)
                if kind == "images":
                    exported.setdefault(study_uid, (str(ds.PatientID),
                                                    str(ds.get("StudyDate", "") or "")))
        report.studies += 1
        log.info("event=export_study %s", kv(study_uid=study_uid, instances=len(instances),
                                             results=len(results)))
        if progress is not None:
            progress(f"[{report.studies + len(report.missing)}/{len(studies)}] {study_uid}: "
                     f"{len(instances)} images, {len(results)} results")
    keep = [c for c in LABEL_COLUMNS if c in columns]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keep)
        writer.writeheader()
        for row in rows:
            if row.get("study_uid") in exported:
                writer.writerow(scrub_labels_row(row, deid, keep, exported))
                report.labels += 1
    (out / "export.json").write_text(json.dumps({
        "deidentification": METHOD, "profile_table": f"dicom-anonymizer {TABLE_VERSION}",
        "studies": report.studies, "images": report.images, "results": report.results,
        "label_rows": report.labels, "missing_studies": len(report.missing),
        "refused_objects": len(report.refused), "dropped_label_columns":
            report.dropped_columns,
    }, indent=1) + "\n")
    return report
