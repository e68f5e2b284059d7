"""The study list and peer choice of `dicomnode retrieve` (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import Config, PeerConfig
from dicomnode.errors import ConfigError
from dicomnode.network.retrieve import (
    RetrieveError,
    RetrieveReport,
    StudyKey,
    StudyOutcome,
    read_study_keys,
    retrieve_peer,
    write_complete_labels,
)


def test_keys_from_a_labels_file_each_study_once(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("study_uid,accession_number,benign\n1.2.3,,0\n1.2.3,,1\n,ACC9,0\n"
                    "1.2.4,ACC7,0\n")
    assert read_study_keys(path) == [StudyKey("1.2.3", "", 2), StudyKey("", "ACC9", 4),
                                     StudyKey("1.2.4", "ACC7", 5)]


@pytest.mark.parametrize("text, message", [
    ("patient,benign\nx,0\n", "no study_uid or accession_number column"),
    ("study_uid,accession_number\n,\n", "line 2: neither a study UID nor an accession"),
])
def test_bad_lists_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "l.csv"
    path.write_text(text)
    with pytest.raises(RetrieveError, match=message):
        read_study_keys(path)
    with pytest.raises(RetrieveError, match="does not exist"):
        read_study_keys(tmp_path / "absent.csv")


def test_peer_choice() -> None:
    a, b = PeerConfig("A", retrieve=True), PeerConfig("B", retrieve=True)
    with pytest.raises(ConfigError, match="no \\[\\[peers\\]\\] entry has retrieve"):
        retrieve_peer(Config(peers=[PeerConfig("C")]), None)
    with pytest.raises(ConfigError, match="choose one with --peer"):
        retrieve_peer(Config(peers=[a, b]), None)
    assert retrieve_peer(Config(peers=[a, b]), "B") is b
    with pytest.raises(ConfigError, match="'C'"):
        retrieve_peer(Config(peers=[a, PeerConfig("C")]), "C")


def test_report_lists_problems_and_writes_csv(tmp_path: Path) -> None:
    report = RetrieveReport([StudyOutcome(StudyKey("1.2.3", "", 2), "retrieved", "1.2.3", 4, 4),
                             StudyOutcome(StudyKey("", "ACC", 3), "missing"),
                             StudyOutcome(StudyKey("1.2.5", "", 4), "incomplete", "1.2.5", 4, 3)])
    assert [o.key.line for o in report.problems] == [3, 4]
    assert report.summary() == "retrieved=1 complete=0 missing=1 incomplete=1 error=0"
    report.write_csv(tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[2].startswith("3,,ACC,missing")


def test_labels_of_complete_studies_get_their_study_uid(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("accession_number,laterality,benign,malignant\nACC1,L,0,1\nACC1,R,0,0\n"
                    "ACC2,L,1,0\nACC3,L,0,0\n")
    keys = read_study_keys(path)
    report = RetrieveReport([StudyOutcome(keys[0], "retrieved", "1.2.1", 4, 4),
                             StudyOutcome(keys[1], "incomplete", "1.2.2", 4, 3),
                             StudyOutcome(keys[2], "complete", "1.2.3", 4, 4)])
    assert write_complete_labels(path, report, tmp_path / "out.csv") == 3
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines == ["study_uid,accession_number,laterality,benign,malignant",
                     "1.2.1,ACC1,L,0,1", "1.2.1,ACC1,R,0,0", "1.2.3,ACC3,L,0,0"]
