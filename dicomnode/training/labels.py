"""The labels file: CSV keyed by SOP Instance UID (image labels) or by study + laterality
(breast labels), with benign and malignant as 0/1; optional patient_id, study_date, split."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import DicomnodeError
from gmic.classes import CLASS_NAMES

SPLITS = ("train", "val", "test")


class LabelsError(DicomnodeError):
    """The labels file, or what it refers to, cannot be used; the message names file and row."""


@dataclass(frozen=True)
class LabelRow:
    line: int  # line number in the file (the header is line 1)
    sop_instance_uid: str  # "" for a breast-level row
    study_uid: str
    laterality: str  # "L" | "R" | ""
    benign: int
    malignant: int
    patient_id: str = ""
    study_date: str = ""  # YYYYMMDD or ""
    split: str = ""  # train | val | test | ""

    @property
    def where(self) -> str:
        return f"line {self.line}"


def _flag(value: str, column: str, where: str) -> int:
    text = value.strip()
    if text in ("0", "1", "0.0", "1.0"):
        return int(float(text))
    raise LabelsError(f"{where}: {column} must be 0 or 1, got {value!r}; fix the row")


def read_labels(path: str | Path) -> list[LabelRow]:
    """Parse and check the labels file; raises LabelsError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist; pass an existing CSV file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelsError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in CLASS_NAMES if c not in columns]
    keyed_by_image = "sop_instance_uid" in columns
    keyed_by_breast = "study_uid" in columns and "laterality" in columns
    if missing or not (keyed_by_image or keyed_by_breast):
        need = missing + ([] if keyed_by_image or keyed_by_breast
                          else ["sop_instance_uid (or study_uid and laterality)"])
        raise LabelsError(f"{path}: missing column(s) {', '.join(need)}; the header has "
                          f"{', '.join(columns) or 'no columns'}; a labels file needs "
                          "sop_instance_uid or study_uid+laterality, plus benign and malignant")
    out = []
    for n, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()
               if not isinstance(v, list)}
        where = f"{path} line {n}"
        sop = row.get("sop_instance_uid", "")
        study = row.get("study_uid", "")
        lat = row.get("laterality", "").upper()
        if not sop and not (study and lat):
            raise LabelsError(f"{where}: no sop_instance_uid and no study_uid+laterality; "
                              "every row needs one of the two keys")
        if lat and lat not in ("L", "R"):
            raise LabelsError(f"{where}: laterality must be L or R, got {lat!r}")
        split = row.get("split", "").lower()
        if split and split not in SPLITS:
            raise LabelsError(f"{where}: split must be one of {', '.join(SPLITS)}, got "
                              f"{split!r}")
        out.append(LabelRow(line=n, sop_instance_uid=sop, study_uid=study, laterality=lat,
                            benign=_flag(row.get("benign", ""), "benign", where),
                            malignant=_flag(row.get("malignant", ""), "malignant", where),
                            patient_id=row.get("patient_id", ""),
                            study_date=row.get("study_date", "").replace("-", ""),
                            split=split))
    if not out:
        raise LabelsError(f"{path}: no label rows; add one row per image or breast")
    return out
