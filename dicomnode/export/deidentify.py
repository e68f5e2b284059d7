"""De-identification for research export: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile, with the Retain Longitudinal Temporal Information with Modified
Dates option and the Clean Descriptors option.

The per-attribute actions (D, Z, X, U, X/Z, X/D, Z/D, X/Z/D, X/Z/U*) are Table E.1-1 of the
standard as the ``dicom-anonymizer`` package ships it (a table generated from the standard,
not written here); its D/Z actions make the dummy values. What this module adds is what a
research export needs on top, all keyed by a secret that stays on the node:

- UIDs: every UID that is not a registered (standard) UID is replaced by a UID derived
  from the key (HMAC), in every nested sequence: the same source UID always maps to the same
  new UID, so result objects still reference their images, across studies and exports.
- Patient ID and name: a pseudonym derived from the key and the source Patient ID (and
  Issuer), the same for every study of a patient.
- Dates and date-times: shifted by a per-patient number of days derived from the key
  (Retain Longitudinal Temporal Information with Modified Dates): intervals between a
  patient's studies are kept; times of day are kept. Patient's Birth Date is emptied.
- Descriptors (text attributes named ...Description, ...Comments, ...Label, Protocol Name)
  are kept without the words that hold one of the source's identifying values (names, IDs,
  accession number, dates, institution) (Clean Descriptors).
- Private attributes are removed; SR Content Sequence is cleaned item by item (the rules
  above apply inside it) instead of replaced, so the node's own results stay readable.

Pixel data is not changed: images flagged Burned In Annotation YES are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from dicomnode.errors import DicomnodeError

KEY_FILE = "deidentify-key"
TABLE_VERSION = "dicomfields_2026c"
CONTENT_SEQUENCE = 0x0040A730
PATIENT_NAME, PATIENT_ID, ISSUER = 0x00100010, 0x00100020, 0x00100021
PATIENT_BIRTH_DATE = 0x00100030
# De-identification Method (LO, one value per profile/option, 64 characters each)
METHOD = ["PS3.15 E.1 Basic Application Confidentiality Profile",
          "Retain Longitudinal Temporal Information Modified Dates",
          "Clean Descriptors", "dicomnode export --deidentify"]
# DCM codes of the profile and its options (PS3.16 CID 7050)
METHOD_CODES = (("113100", "Basic Application Confidentiality Profile"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
                ("113105", "Clean Descriptors Option"))
_DESCRIPTOR = re.compile(r"(Description|Comments?|Remarks|Label)$|^ProtocolName$")


class DeidentifyError(DicomnodeError):
    """An object cannot be exported de-identified (e.g. burned-in annotation)."""


def node_key(data_dir: Path) -> bytes:
    """The node's de-identification key (created once, readable by the node's user only).
    It never leaves the node: with it, pseudonyms and UIDs could be linked back."""
    path = Path(data_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "xb") as fh:
                fh.write(secrets.token_bytes(32))
            path.chmod(0o600)
        except FileExistsError:
            pass  # another process created it first
    key = path.read_bytes()
    if len(key) < 16:
        raise DeidentifyError(f"{path} is not a usable key (too short); move it away to "
                              "create a new one (pseudonyms will change)")
    return key


def _profile_actions() -> tuple[dict[int, str], list[tuple[int, int, int, int]]]:
    """Table E.1-1 as {tag: action}, plus repeating-group masks (all removed)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    table = dicom_anonymization_database_selector(TABLE_VERSION)
    names = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
             "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
             "X_Z_U_STAR_TAGS": "X/Z/U*"}
    actions: dict[int, str] = {}
    masks: list[tuple[int, int, int, int]] = []
    for category, action in names.items():
        for tag in table[category]:
            if len(tag) > 2:
                masks.append(tuple(tag[:4]))  # type: ignore[arg-type]
            else:
                actions[(tag[0] << 16) | tag[1]] = action
    return actions, masks


def _shift_date(value: str, days: int) -> str:
    try:
        return (datetime.strptime(value[:8], "%Y%m%d").date()
                + timedelta(days=days)).strftime("%Y%m%d")
    except ValueError:
        return ""


def _shift_datetime(value: str, days: int) -> str:
    if len(value) < 8:
        return ""
    shifted = _shift_date(value[:8], days)
    return shifted + value[8:] if shifted else ""


def _clean_text(text: str, identifying: list[str]) -> str:
    """The text without the words that hold an identifying value (a name, an ID, a date):
    kept present (a Type 1 or 2 descriptor stays), emptied only if nothing else is left."""
    words = text.split()
    kept = [w for w in words if not any(v in w.lower() for v in identifying if " " not in v)]
    return " ".join(kept)


class Deidentifier:
    """De-identifies datasets in place; one instance per export (holds the key)."""

    def __init__(self, key: bytes) -> None:
        from dicomanonymizer import simpledicomanonymizer as lib

        self._key = key
        self._lib = lib
        self.actions, self.masks = _profile_actions()

    # -- keyed mappings ------------------------------------------------------------------

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """The export's UID for a source UID (a 2.25 UUID-derived UID, at most 64 chars)."""
        return "2.25." + str(int.from_bytes(self._mac("uid", value)[:16], "big"))

    def patient_pseudonym(self, patient_id: str, issuer: str = "") -> str:
        return "ANON" + self._mac("patient", f"{issuer}|{patient_id}").hex()[:12].upper()

    def day_offset(self, patient_id: str, issuer: str = "") -> int:
        """Days added to every date of this patient: between -3650 and -366 (never 0)."""
        n = int.from_bytes(self._mac("days", f"{issuer}|{patient_id}")[:4], "big")
        return -(366 + n % (3650 - 366 + 1))

    def shift_date(self, value: str, patient_id: str, issuer: str = "") -> str:
        return _shift_date(value, self.day_offset(patient_id, issuer)) if value else ""

    # -- the profile ---------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> None:
        """Apply the profile with its options to ``ds`` (and its file meta) in place."""
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise DeidentifyError(f"SOP instance {ds.get('SOPInstanceUID', '?')} has burned-in "
                                  "annotation; its pixels would need cleaning: not exported")
        patient_id = str(ds.get("PatientID", "") or "")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        if not patient_id:  # no ID: one pseudonym per study
            patient_id = "study:" + str(ds.get("StudyInstanceUID", ""))
        identifying = self._identifying_values(ds)
        days = self.day_offset(patient_id, issuer)
        pseudonym = self.patient_pseudonym(patient_id, issuer)
        ds.remove_private_tags()
        self._clean(ds, days, identifying)
        ds.PatientID = pseudonym
        ds.PatientName = f"{pseudonym[:4]}^{pseudonym[4:]}"  # family^given: a valid PN
        if "PatientBirthDate" in ds:
            ds.PatientBirthDate = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = METHOD
        codes = Sequence()
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            # A new file meta (the old one may name the sending and receiving AEs): only
            # what says what the file holds; pydicom adds its implementation UID on saving.
            new_meta = FileMetaDataset()
            new_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            new_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID  # already remapped
            if "TransferSyntaxUID" in meta:
                new_meta.TransferSyntaxUID = meta.TransferSyntaxUID
            ds.file_meta = new_meta

    @staticmethod
    def _identifying_values(ds: Dataset) -> list[str]:
        """Strings that must not survive in a cleaned descriptor."""
        values: list[str] = []
        for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
                        "InstitutionName", "ReferringPhysicianName", "PatientName",
                        "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
                        "ContentDate", "OperatorsName", "PerformingPhysicianName"):
            value = ds.get(keyword, None)
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple, MultiValue)) else [value]:
                text = str(v)
                values.append(text)
                values += [p for p in re.split(r"[\^ =,]+", text) if len(p) >= 3]
        for text in list(values):
            if re.fullmatch(r"\d{8}", text):  # a date also written 2024-01-31, 31.01.2024...
                d = date(int(text[:4]), int(text[4:6]), int(text[6:]))
                values += [d.isoformat(), d.strftime("%d.%m.%Y"), d.strftime("%d/%m/%Y"),
                           d.strftime("%m/%d/%Y")]
        return [v.strip().lower() for v in values if len(v.strip()) >= 3]

    def _action(self, tag: int) -> str | None:
        action = self.actions.get(tag)
        if action is None:
            group, element = tag >> 16, tag & 0xFFFF
            for g, e, gmask, emask in self.masks:
                if group & gmask == g & gmask and element & emask == e & emask:
                    return "X"
        return action

    def _clean(self, ds: Dataset, days: int, identifying: list[str]) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            action = self._action(tag)
            if elem.VR == "SQ":
                self._clean_sequence(ds, elem, action, days, identifying)
            elif elem.VR == "UI":
                self._clean_uid(ds, elem, action)
            elif elem.VR in ("DA", "DT"):
                if action == "X":
                    del ds[elem.tag]
                elif tag == PATIENT_BIRTH_DATE:
                    elem.value = ""
                else:
                    shift = _shift_date if elem.VR == "DA" else _shift_datetime
                    elem.value = self._map_values(elem, lambda v, f=shift: f(v, days))
            elif elem.VR == "TM":
                if action is not None and action == "X":
                    del ds[elem.tag]  # times of day are otherwise kept with the dates
            elif tag in (PATIENT_ID, PATIENT_NAME):
                continue  # they get the pseudonym afterwards
            elif _DESCRIPTOR.search(elem.keyword or "") and elem.VR in ("LO", "SH", "ST", "LT",
                                                                        "UT", "UC"):
                if self._identifies(elem, identifying):  # Clean Descriptors
                    elem.value = self._map_values(
                        elem, lambda v: _clean_text(v, identifying))
            elif action is None:
                continue  # not in the profile's table: kept
            else:
                self._apply(ds, elem, action)

    def _identifies(self, elem: DataElement, identifying: list[str]) -> bool:
        text = str(elem.value or "").lower()
        return any(v in text for v in identifying)

    def _apply(self, ds: Dataset, elem: DataElement, action: str) -> None:
        """Table E.1-1's action, with the library's dummy values."""
        lib = self._lib
        if action == "X":
            del ds[elem.tag]
        elif action in ("Z", "X/Z"):
            lib.empty_element(elem)
        else:  # D, Z/D, X/D, X/Z/D: a dummy value keeps a Type 1 attribute present
            lib.replace_element(elem)

    def _clean_uid(self, ds: Dataset, elem: DataElement, action: str | None) -> None:
        if action == "X":
            del ds[elem.tag]
            return
        elem.value = self._map_values(elem, self._map_uid)

    def _map_uid(self, value: str) -> str:
        value = value.strip().rstrip("\x00")
        if not value or value in UID_dictionary:
            return value  # standard UIDs (SOP classes, transfer syntaxes, ...) identify nobody
        return self.uid(value)

    def _clean_sequence(self, ds: Dataset, elem: DataElement, action: str | None, days: int,
                        identifying: list[str]) -> None:
        tag = int(elem.tag)
        if action is None or tag == CONTENT_SEQUENCE or action in ("U", "X/Z/U*", "D"):
            for item in elem.value or []:
                self._clean(item, days, identifying)
        elif action == "X":
            del ds[elem.tag]
        else:  # Z, X/Z, X/D, X/Z/D: empty, so a Type 2 sequence stays present
            elem.value = Sequence()

    @staticmethod
    def _map_values(elem: DataElement, fn) -> object:
        value = elem.value
        if value is None or value == "":
            return value
        if isinstance(value, (list, tuple, MultiValue)):
            return [fn(str(v)) for v in value]
        return fn(str(value))


def scrub_labels_row(row: dict[str, str], deid: Deidentifier, keep: Iterable[str],
                     studies: dict[str, tuple[str, str]]) -> dict[str, str]:
    """A labels CSV row for the export: UIDs remapped, patient pseudonymised and study date
    shifted as in the exported objects (``studies``: source study UID -> (pseudonym,
    shifted study date)), only the ``keep`` columns."""
    pseudonym, study_date = studies.get(row.get("study_uid", ""), ("", ""))
    out = {}
    for column in keep:
        value = row.get(column, "")
        if column in ("study_uid", "sop_instance_uid", "series_uid") and value:
            value = deid.uid(value)
        elif column == "patient_id" and value:
            value = pseudonym or deid.patient_pseudonym(value)
        elif column == "study_date" and value:
            value = study_date
        out[column] = value
    return out
