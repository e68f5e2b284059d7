"""Labels file parsing and the patient-level chronological split (paper III-A)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dicomnode.errors import DicomnodeError
from dicomnode.training.data import DatasetError, Example, check_split, split_by_patient
from dicomnode.training.labels import LabelsError, read_labels


def _example(patient: str, date: str, malignant: int = 0, split: str = "") -> Example:
    header = SimpleNamespace(uid=f"{patient}-{date}", study_uid=patient, laterality="L")
    return Example(header, 0, malignant, patient, date, split)  # type: ignore[arg-type]


def test_split_is_by_patient_and_chronological() -> None:
    examples = []
    for i in range(10):
        # patient i's latest exam is in 2020 + i; an older exam of the same patient too
        examples += [_example(f"p{i}", f"{2020 + i}0101"), _example(f"p{i}", "20150101")]
    splits = split_by_patient(examples, (0.8, 0.1, 0.1))
    assert {e.patient for e in splits["train"]} == {f"p{i}" for i in range(8)}
    assert {e.patient for e in splits["val"]} == {"p8"}
    assert {e.patient for e in splits["test"]} == {"p9"}
    assert len(splits["train"]) == 16  # both exams of each patient stay together


def test_split_without_dates_is_fixed_and_by_patient() -> None:
    examples = [_example(f"p{i}", "") for i in range(20) for _ in range(2)]
    a = split_by_patient(examples, (0.5, 0.25, 0.25))
    b = split_by_patient(list(reversed(examples)), (0.5, 0.25, 0.25))
    assert {e.patient for e in a["test"]} == {e.patient for e in b["test"]}
    assert not {e.patient for e in a["train"]} & {e.patient for e in a["val"]}


def test_split_column_overrides() -> None:
    examples = [_example("a", "", split="test"), _example("b", "", split="train")]
    splits = split_by_patient(examples)
    assert [e.patient for e in splits["test"]] == ["a"]


def test_a_split_without_positives_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="val split has no malignant positive"):
        check_split("val", [_example("a", ""), _example("b", "")], tmp_path / "l.csv")
    assert issubclass(DatasetError, DicomnodeError)


def test_labels_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("study_uid,laterality,benign,malignant\n1.2.3,X,0,1\n")
    with pytest.raises(LabelsError, match=r"bad.csv line 2: laterality must be L or R"):
        read_labels(bad)
    good = tmp_path / "good.csv"
    good.write_text("study_uid,laterality,benign,malignant,split\n1.2.3,r,0,1,VAL\n")
    (row,) = read_labels(good)
    assert (row.laterality, row.malignant, row.split, row.line) == ("R", 1, "val", 2)
