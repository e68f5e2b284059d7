"""`evaluate --group-by`: breast-wise AUC per texture family, lesion kind, margin and size."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dicomnode.training.data import Example
from dicomnode.training.evaluation import (
    ImageScore,
    group_auc_table,
    group_markdown,
    read_attributes,
    size_bin,
)


def _score(study: str, lat: str, benign: int, malignant: int, y: float) -> ImageScore:
    uid = f"{study}.{lat}"
    header = SimpleNamespace(uid=uid, study_uid=study, laterality=lat, modality="dbt",
                             view="CC", sop_instance_uids=[uid])
    example = Example(header, benign, malignant, study, "")  # type: ignore[arg-type]
    return ImageScore(example, [np.array([0.5 * benign + 0.1, y])])


def _labels(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["sop_instance_uid", "benign", "malignant", "family", "lesion_kinds",
               "lesion_margins", "lesion_sizes_mm"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_family_groups_score_each_family_on_its_own(tmp_path: Path) -> None:
    """Family A: malignant breasts score high (AUC 1); family B: the model is fooled
    (malignant breasts score low, AUC 0); pooled they would hide each other."""
    scores, rows = [], []
    for i in range(8):
        family = "A" if i < 4 else "B"
        for lat, malignant in (("L", 1), ("R", 0)):
            good = (malignant == 1) == (family == "A")
            y = 0.8 + 0.01 * i if good else 0.2 + 0.01 * i
            scores.append(_score(f"s{i}", lat, 0, malignant, y))
            rows.append({"sop_instance_uid": f"s{i}.{lat}", "benign": "0",
                         "malignant": str(malignant), "family": family,
                         "lesion_kinds": "malignant mass" if malignant else "",
                         "lesion_margins": "spiculated" if malignant else "",
                         "lesion_sizes_mm": "12" if malignant else ""})
    attributes = read_attributes(_labels(tmp_path / "labels.csv", rows))
    table = group_auc_table({"dbt": scores}, attributes, "family", resamples=20)
    by_group = {r["group"]: r for r in table["rows"]}
    assert table["groups"] == ["A", "B"]
    assert by_group["A"]["malignant"]["auc"] == pytest.approx(1.0)
    assert by_group["B"]["malignant"]["auc"] == pytest.approx(0.0)
    assert by_group["A"]["malignant_breasts"] == 8 and by_group["A"]["malignant_positive"] == 4
    assert by_group["A"]["benign"] is None  # no benign breast: n/a, not an error
    assert "| DBT | A | 1.000" in group_markdown(table)


def test_finding_groups_put_each_lesion_against_all_negatives(tmp_path: Path) -> None:
    """Small masses missed, large ones found: the size groups say so; a benign mass in a
    malignant breast does not count for the malignant class."""
    scores, rows = [], []
    sizes = [3.5, 4.0, 25.0, 28.0]
    for i, size in enumerate(sizes):
        y = 0.1 if size < 5 else 0.9
        scores.append(_score(f"p{i}", "L", 1, 1, y))
        rows.append({"sop_instance_uid": f"p{i}.L", "benign": "1", "malignant": "1",
                     "family": "A", "lesion_kinds": "malignant mass;benign mass",
                     "lesion_margins": "spiculated;circumscribed",
                     "lesion_sizes_mm": f"{size};15"})
    for i in range(4):
        scores.append(_score(f"n{i}", "L", 0, 0, 0.3 + 0.05 * i))
        rows.append({"sop_instance_uid": f"n{i}.L", "benign": "0", "malignant": "0",
                     "family": "A", "lesion_kinds": "", "lesion_margins": "",
                     "lesion_sizes_mm": ""})
    attributes = read_attributes(_labels(tmp_path / "labels.csv", rows))
    table = group_auc_table({"dbt": scores}, attributes, "size", resamples=20)
    by_group = {r["group"]: r for r in table["rows"]}
    assert set(by_group) == {"<5 mm", ">=20 mm", "10-20 mm"}
    assert by_group["<5 mm"]["malignant"]["auc"] == pytest.approx(0.0)
    assert by_group[">=20 mm"]["malignant"]["auc"] == pytest.approx(1.0)
    assert by_group["<5 mm"]["malignant_breasts"] == 2 + 4
    # 15 mm is only ever a benign mass: no malignant positives there
    assert by_group["10-20 mm"]["malignant"] is None
    assert by_group["10-20 mm"]["benign_positive"] == 4
    margins = group_auc_table({"dbt": scores}, attributes, "margin", resamples=20)
    assert margins["groups"] == ["benign mass: circumscribed", "malignant mass: spiculated"]


def test_size_bins() -> None:
    assert [size_bin(v) for v in (3, 5, 9.9, 10, 19, 20, 30)] == [
        "<5 mm", "5-10 mm", "5-10 mm", "10-20 mm", "10-20 mm", ">=20 mm", ">=20 mm"]
