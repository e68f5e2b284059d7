"""What every result object shares: options, identity of the producing software and codes.
(The source headers are read back by geometry.read_sources.)"""

from __future__ import annotations

import datetime
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.config import check_cad_operating_points
from dicomnode.errors import DicomnodeError
from dicomnode.pipeline.analysis import AlgorithmIdentity, ImageAnalysis
from gmic.classes import CLASS_NAMES

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
    make_seg: False writes no SEG (the SR then has no flagged-region groups).
    pmap_classes: which classes (CLASS_NAMES) get a Parametric Map; malignant only by
        default (docs/viewer.md says why), ("benign", "malignant") on request.
    pmap_values: "float" (default): float32 values on 256 levels, what OHIF 3.13 shows;
        "integer": levels 0..255 in 16-bit words with a Real World Value Mapping (slope
        1/255) for viewers that apply the mapping (see pmap.py).
    deflate: write Parametric Maps and SEGs with the Deflated Explicit VR Little
        Endian transfer syntax (lossless; the maps are mostly zero, so a few % of their
        size). False: Explicit VR Little Endian, for a PACS that refuses deflate (the SCU
        also falls back by itself when a peer does not accept it).
    deflate_level: the zlib level the objects will be written at ([results]
        deflate_level); a deflated map's or SEG's pixel data starts deflating at it in the
        background as soon as the object is built (encode.deflate_early), and writing it
        at that level takes the blocks done. Written at another level, the object is
        deflated anew (the same bytes, the background work wasted).
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
    pmap_classes: tuple[str, ...] = ("malignant",)
    pmap_values: Literal["float", "integer"] = "float"
    deflate: bool = True
    deflate_level: int = 6

    def __post_init__(self) -> None:
        check_cad_operating_points(self.cad_operating_points, self.cad_presentation_required)
        if len(self.thresholds) != 2 or not all(0.0 <= t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be two values in [0, 1), got {self.thresholds!r}")
        if self.seg_type not in ("binary", "fractional"):
            raise ValueError(f"seg_type must be binary or fractional, got {self.seg_type!r}")
        if self.max_array_bytes < 1024:
            raise ValueError(f"max_array_bytes is too small: {self.max_array_bytes}")
        if not isinstance(self.deflate_level, int) or not 1 <= self.deflate_level <= 9:
            raise ValueError(f"deflate_level must be 1..9, got {self.deflate_level!r}")
        if self.pmap_values not in ("float", "integer"):
            raise ValueError(f"pmap_values must be float or integer, got {self.pmap_values!r}")
        unknown = [c for c in self.pmap_classes if c not in CLASS_NAMES]
        if unknown:
            raise ValueError(f"pmap_classes: {unknown!r} not in {CLASS_NAMES!r}")
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
# What a SEG segment is: a region the algorithm selected (saliency above its operating
# point for one class), not a lesion of known histology. Category "Spatial and Relational
# Concept" (CID 7150), type "Selected region" (DCM 111099, the mammography CAD code for "a
# region of an image selected for a particular purpose", CID 6014/6054); the class is in
# the label. In CLASS_NAMES order: (segment label, property type).
SEGMENT_CATEGORY = codes.SCT.SpatialAndRelationalConcept
SELECTED_REGION = hd.sr.CodedConcept("111099", "DCM", "Selected region")
SEGMENT_PROPERTIES = (
    ("Benign-flagged region", SELECTED_REGION),
    ("Malignant-flagged region", SELECTED_REGION),
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
    # the chest-wall window reads less of a large breast: other findings, other objects
    if not algorithm.whole_breast:
        copies.append("window=chest-wall")
    entropy = [*(p.name for p in analysis.image.source_paths),
               algorithm.checkpoint_sha256, repr(options), *copies, *map(str, labels)]
    return hd.UID(str(generate_uid(entropy_srcs=entropy)))


# UIDs under "2.25" (PS3.5 B.2) from name-based UUIDs in the project's own namespace.
_WEIGHTS_NAMESPACE = uuid.UUID("2f6d9c1e-4b7a-5e38-9a0c-6d1e8b3f4a25")
PROCESSING_ALGORITHM = hd.sr.CodedConcept("109103", "DCM", "Processing Algorithm")


def weights_device_uid(algorithm: AlgorithmIdentity) -> str:
    """IHE AIR Device UID: derived from the hash of the checkpoint's bytes, so it changes
    exactly when the weights change (and is the same on every node that runs them)."""
    identity = algorithm.checkpoint_sha256 or f"unhashed:{algorithm.checkpoint_name}"
    return f"2.25.{uuid.uuid5(_WEIGHTS_NAMESPACE, f'dicomnode-weights/{identity}').int}"


def software_versions(algorithm: AlgorithmIdentity) -> list[str]:
    """Software Versions (LO, VM 1-n): the node's version and the weights' identity."""
    weights = (algorithm.checkpoint_sha256[:16] if algorithm.checkpoint_sha256
               else algorithm.checkpoint_name or "unknown")
    return [f"dicomnode {algorithm.version or __version__}"[:64],
            f"{model_name(algorithm)} weights sha256:{weights}"[:64]]


def identify_result(ds: Dataset, algorithm: AlgorithmIdentity, source: Dataset | None = None,
                    *, now: datetime.datetime | None = None) -> Dataset:
    """IHE AI Results (AIR) identification of a result object, applied the same way to
    every kind (SR, SEG, Parametric Map, CAD SR) after its builder made it:

    - a Contributing Equipment item with purpose (109103, DCM, "Processing Algorithm"),
      manufacturer, model name, software versions and a Device UID derived from the
      weights (weights_device_uid);
    - Software Versions naming the node and the weights;
    - Series Date / Time (from the Content Date / Time, else now);
    - Institution Name as the source has it.

    Idempotent: a second call replaces its own Contributing Equipment item.
    """
    device = weights_device_uid(algorithm)
    versions = software_versions(algorithm)
    ds.SoftwareVersions = versions
    institution = source.get("InstitutionName") if source is not None else None
    if institution:
        ds.InstitutionName = institution
    when = now or datetime.datetime.now()
    if not ds.get("SeriesDate"):
        ds.SeriesDate = ds.get("ContentDate") or when.strftime("%Y%m%d")
    if not ds.get("SeriesTime"):
        ds.SeriesTime = ds.get("ContentTime") or when.strftime("%H%M%S")
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    if ds.get("InstitutionName"):
        item.InstitutionName = ds.InstitutionName
    item.ManufacturerModelName = model_name(algorithm)[:64]
    item.DeviceSerialNumber = serial_number(algorithm)
    item.SoftwareVersions = versions
    item.DeviceUID = device
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    item.ContributionDateTime = f"{ds.SeriesDate}{ds.SeriesTime}"
    item.ContributionDescription = (
        f"{model_name(algorithm)} ({algorithm.checkpoint_name}) made this object "
        f"({NOT_FOR_CLINICAL_USE})")[:1024]
    kept = [i for i in ds.get("ContributingEquipmentSequence", [])
            if i.get("DeviceUID") != device]
    ds.ContributingEquipmentSequence = Sequence([*kept, item])
    return ds


def reproducible_dimension_organization(ds: Dataset) -> Dataset:
    """highdicom draws a random Dimension Organization UID for every SEG and Parametric Map;
    a rerun must send the same content under the same SOP Instance UID (result_uid), so it
    is derived from that UID, in the organization and in every dimension index naming it."""
    organizations = ds.get("DimensionOrganizationSequence")
    if not organizations:
        return ds
    uid = str(generate_uid(entropy_srcs=["dimension organization", str(ds.SOPInstanceUID)]))
    drawn = {str(item.DimensionOrganizationUID) for item in organizations}
    for item in organizations:
        item.DimensionOrganizationUID = uid
    for index in ds.get("DimensionIndexSequence", []):
        if str(index.get("DimensionOrganizationUID", "")) in drawn:
            index.DimensionOrganizationUID = uid
    return ds


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
    if not algorithm.whole_breast:
        params["window"] = "chest wall, the checkpoint's input size"
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
