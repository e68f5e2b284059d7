"""What every result object shares: options, identity of the producing software, codes,
and the source headers read back from the files the analysis came from."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.analysis import AlgorithmIdentity, ImageAnalysis
from dicomnode.config import check_cad_operating_points
from dicomnode.errors import DicomnodeError

MANUFACTURER = "dicomnode"
NOT_FOR_CLINICAL_USE = "not for clinical use"

# Series numbers of the result series: offset + the source series number, so a viewer's
# series list keeps each result next to the others made from the same source.
SR_SERIES_OFFSET = 7000
SEG_SERIES_OFFSET = 8000
# one Parametric Map series per class (CLASS_NAMES order): malignant 9000+, benign 10000+
PMAP_SERIES_OFFSETS = (10000, 9000)


class ResultsError(DicomnodeError):
    """A result object cannot be built from this analysis or source (message says why)."""


@dataclass(frozen=True)
class ResultOptions:
    """How the result objects are built. The lead's config `[results]` section maps here.

    thresholds: operating point per class (benign, malignant) on the saliency in [0, 1];
        pixels above it are flagged in the BINARY SEG and counted in the SR.
    seg_type: "binary" (default; what OHIF displays) or "fractional" (PROBABILITY).
    max_array_bytes: cap on the in-memory pixel array of one PM (4 bytes per pixel, one
        class per object) and of the SEG (1 byte x 2 segments per pixel); the smallest
        integer decimation of the pixel grid that fits is chosen. The default, 2 GiB, keeps
        a full-size DBT at source resolution, the only grid OHIF 3.13 overlays.
    pmap_decimation / seg_decimation: force a factor instead (1 = source resolution).
    seg_omit_empty_frames: False keeps every frame of every segment (highdicom #214: viewers
        place such SEGs more reliably; BINARY frames are bit-packed, so it stays small).
    make_seg: False writes no SEG.
    cad_operating_points: the Mammography CAD SR's operating points, thresholds on the
        malignant saliency, most specific (highest) first: operating point n is reached by
        a region whose peak is at or above the n-th. The last is the floor: nothing below
        it is marked.
    cad_presentation_required: CAD marks at this operating point or a more specific one
        are "Presentation Required"; the others "Presentation Optional".
    """

    thresholds: tuple[float, float] = (0.5, 0.5)
    seg_type: Literal["binary", "fractional"] = "binary"
    max_array_bytes: int = 2048 * 1024 * 1024
    pmap_decimation: int | None = None
    seg_decimation: int | None = None
    seg_omit_empty_frames: bool = False
    make_seg: bool = True
    institution_name: str | None = None
    cad_operating_points: tuple[float, ...] = (0.5, 0.35, 0.25)
    cad_presentation_required: int = 1

    def __post_init__(self) -> None:
        check_cad_operating_points(self.cad_operating_points, self.cad_presentation_required)
        if len(self.thresholds) != 2 or not all(0.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be two values in [0, 1), got {self.thresholds!r}")
        if self.seg_type not in ("binary", "fractional"):
            raise ValueError(f"seg_type must be binary or fractional, got {self.seg_type!r}")
        if self.max_array_bytes < 1024:
            raise ValueError(f"max_array_bytes is too small: {self.max_array_bytes}")
        for name in ("pmap_decimation", "seg_decimation"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# Project-private codes (PS3.16 8.2: "99" + an owner). Standard codes where one exists.
PRIVATE_SCHEME = "99DCMNODE"
_PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME, name="dicomnode result codes", responsible_organization="dicomnode")


def private_code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


def coding_schemes() -> list[CodingSchemeIdentificationItem]:
    return [_PRIVATE_SCHEME_ITEM]


PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
LATERALITY_CODES = {"L": codes.SCT.Left, "R": codes.SCT.Right}
# SEG segment numbers and the SNOMED CT property types they hold, in CLASS_NAMES order.
SEGMENT_PROPERTIES = (
    ("Benign finding", hd.sr.CodedConcept("3898006", "SCT", "Neoplasm, benign")),
    ("Malignant finding", hd.sr.CodedConcept("86049000", "SCT", "Malignant neoplasm, primary")),
)


def model_name(algorithm: AlgorithmIdentity) -> str:
    return algorithm.name or "GMIC"


def serial_number(algorithm: AlgorithmIdentity) -> str:
    # The checkpoint's hash identifies the weights; DeviceSerialNumber (LO) holds 64 chars.
    return (algorithm.checkpoint_sha256 or algorithm.checkpoint_name or "unknown")[:64]


def result_uid(analysis: ImageAnalysis, options: ResultOptions, *labels: object) -> hd.UID:
    """A UID that a rerun of the same work reproduces: same source files (a replaced
    instance is archived under a new name), same weights, same options. A job that runs
    again after its worker died then rewrites and re-sends the same objects instead of
    sending the PACS a second copy under new UIDs."""
    algorithm = analysis.algorithm
    # other test-time copies give other scores: other objects, other UIDs
    copies = ([f"tta={algorithm.test_time_augmentations}x{algorithm.augment_px}"]
              if algorithm.test_time_augmentations else [])
    entropy = [*(p.name for p in analysis.image.source_paths),
               algorithm.checkpoint_sha256, repr(options), *copies, *map(str, labels)]
    return hd.UID(str(generate_uid(entropy_srcs=entropy)))


def device_uid(algorithm: AlgorithmIdentity) -> str:
    """Stable device observer UID per (algorithm, checkpoint): the same weights, one UID."""
    return str(generate_uid(entropy_srcs=[algorithm.name, algorithm.checkpoint_sha256,
                                          algorithm.checkpoint_name]))


def algorithm_parameters(algorithm: AlgorithmIdentity) -> dict[str, str]:
    params = {"checkpoint": algorithm.checkpoint_name}
    if algorithm.checkpoint_sha256:
        params["checkpoint_sha256"] = algorithm.checkpoint_sha256
    if algorithm.description:  # e.g. what it was trained on, "not for clinical use"
        params["description"] = algorithm.description
    if algorithm.test_time_augmentations:
        params["test_time_augmentations"] = (f"{algorithm.test_time_augmentations} copies, "
                                             f"up to {algorithm.augment_px} px")
    return params


def algorithm_sequence(algorithm: AlgorithmIdentity,
                       extra: dict[str, str] | None = None) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification for SEG segments and the PM."""
    return hd.AlgorithmIdentificationSequence(
        name=model_name(algorithm), family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version or "unknown",
        parameters={**algorithm_parameters(algorithm), **(extra or {})})


def series_description(kind: str, analysis: ImageAnalysis) -> str:
    image = analysis.image
    where = " ".join(p for p in (image.laterality, image.view, image.modality.upper()) if p)
    return f"{model_name(analysis.algorithm)} {kind} {where} ({NOT_FOR_CLINICAL_USE})"[:64]


def source_series_number(sources: list[Dataset]) -> int:
    try:
        return int(sources[0].get("SeriesNumber", 0) or 0) % 1000
    except (TypeError, ValueError):
        return 0


@contextmanager
def building(what: str, analysis: ImageAnalysis) -> Iterator[None]:
    """Run highdicom quietly (it logs every module it copies at INFO) and turn what it
    rejects (ValueError/TypeError naming the problem) into a ResultsError naming the image."""
    logger = logging.getLogger("highdicom")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    except (ValueError, TypeError) as exc:
        image = analysis.image
        uid = image.sop_instance_uids[0] if len(set(image.sop_instance_uids)) == 1 \
            else image.series_uid
        raise ResultsError(f"cannot build the {what} of image {uid}: {exc}") from exc
    finally:
        logger.setLevel(level)


def read_sources(analysis: ImageAnalysis) -> list[Dataset]:
    """Headers (no pixel data) of the source image, one per file, in slice order, with
    their geometry normalised as highdicom needs it (see geometry.normalise_source)."""
    from dicomnode.results.geometry import normalise_source

    paths = analysis.image.source_paths
    if not paths:
        raise ResultsError(f"image {analysis.image.series_uid} has no source files to reference")
    out = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ResultsError(f"{path}: cannot read the source header back: {exc}") from exc
        out.append(normalise_source(ds, path))
    return out
