"""IHE IOCM rejection note: a Key Object Selection Document titled "Rejected for Quality
Reasons" (113001, DCM) that tells a PACS to hide result objects the node sent before and has
since superseded (a study that grew after its results went out gets new study-level
objects; the old ones must not stay next to them).

    note = build_rejection_note(superseded_headers)

The note's identity depends only on the set of instances it rejects, so a run that repeats
after a crash writes and sends the same note again, not a second one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.results.common import MANUFACTURER, NOT_FOR_CLINICAL_USE, ResultsError

REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # (113001, DCM)
REJECTION_SERIES_NUMBER = 6999
DESCRIPTION = "superseded by the results of the study as now received"


def rejection_uid(rejected_uids: Sequence[str], label: str) -> str:
    return str(generate_uid(entropy_srcs=["iocm-rejection", *sorted(rejected_uids), label]))


def build_rejection_note(rejected: Sequence[Dataset]) -> Dataset:
    """The KOS that rejects ``rejected`` (headers of result objects of one study, as sent).

    Raises ResultsError when they are not one study's or highdicom refuses them."""
    if not rejected:
        raise ResultsError("a rejection note needs at least one instance to reject")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ResultsError(f"a rejection note covers one study, got {len(studies)}")
    uids = [str(ds.SOPInstanceUID) for ds in rejected]
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=list(rejected),
            description=DESCRIPTION)
        note = hd.ko.KeyObjectSelectionDocument(
            evidence=list(rejected), content=content,
            series_instance_uid=rejection_uid(uids, "series"),
            series_number=REJECTION_SERIES_NUMBER,
            sop_instance_uid=rejection_uid(uids, "instance"), instance_number=1,
            manufacturer=MANUFACTURER)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot build the rejection note: {exc}") from exc
    finally:
        logger.setLevel(level)
    note.SeriesDescription = f"Rejected results ({NOT_FOR_CLINICAL_USE})"[:64]
    note.SoftwareVersions = __version__
    return note
