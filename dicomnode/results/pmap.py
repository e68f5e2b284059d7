"""Parametric Maps of the saliency on the source image's frames, optionally on a decimated
grid (see geometry).

The saliency in [0, 1] is quantised to 256 levels (geometry.saliency_levels, the levels the
BINARY SEG thresholds too) and stored either as

- float32 values level/255 (ResultOptions.pmap_values "float", the default), with an
  identity Real World Value Mapping: OHIF 3.13 colours a map's stored values x100 on a
  fixed 0-100 scale (its PMAP viewport sets window 50/100 and ignores the mapping), so only
  stored values in 0..1 show in OHIF; or as
- levels 0..255 in 16-bit words ("integer"), with a Real World Value Mapping of slope 1/255
  carrying the 0-1 saliency, for viewers that apply it (in OHIF 3.13 every non-zero pixel
  would be drawn at the top of the scale). Not 8-bit words: OHIF 3.13 reads integer pixel
  data as 16-bit or else 32-bit.

Either way written with the Deflated Explicit VR Little Endian transfer syntax by default
(ResultOptions.deflate): lossless, and a map on 256 levels, mostly zero, deflates to about
1-2 % of its size at zlib level 6, about 3x that at level 1 (ResultOptions does not choose
the level: [results] deflate_level, results/encode.py), float32 on 256 levels about 1.3x
the 16-bit one.

One single-channel PM per class, each in its own series, and by default the malignant
class only (ResultOptions.pmap_classes): a viewer shows each class as its own overlay: the
frames of a two-channel PM share their positions and differ only by their real-world value
mapping, which a viewer stacking frames by position may not separate, and OHIF (3.13) makes
one display set per PM series from its first instance, so a second PM in the same series
would never be shown.

The PM IOD requires plane position and orientation, which a 2D mammogram lacks: for those
the PM gets a geometry derived from the source's PatientOrientation (geometry.
with_projection_geometry) in a frame of reference of its own, derived from the source
image, never the DBT's: a 2D projection has no place in the tomosynthesis volume.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicomnode.pipeline.analysis import ImageAnalysis
from dicomnode.results.common import (
    MANUFACTURER,
    NO_UNITS,
    PMAP_SERIES_OFFSETS,
    ResultOptions,
    building,
    model_name,
    result_uid,
    serial_number,
    series_description,
    software_versions,
    source_series_number,
)
from dicomnode.results.geometry import (
    SALIENCY_LEVELS,
    decimation_factor,
    finish_result,
    has_patient_geometry,
    read_sources,
    result_grid,
    saliency_levels,
    with_projection_geometry,
)
from gmic.classes import CLASS_NAMES

LUT_LABELS = ("BENIGN_SAL", "MALIG_SAL")
# the array built for highdicom: float32 (or uint16), one class per object, plus the uint8
# levels it is made from
_BYTES_PER_PIXEL = 5
BREAST = codes.SCT.Breast


def pm_sources(sources: list[Dataset]) -> list[Dataset]:
    """The sources as the PM needs them: 2D images get a projection geometry."""
    if has_patient_geometry(sources[0]):
        return sources
    return [with_projection_geometry(src) for src in sources]


def pmap_factor(analysis: ImageAnalysis, options: ResultOptions) -> int:
    """Decimation factor of the PM: forced, or the smallest within options.max_array_bytes."""
    return decimation_factor(analysis.image.shape, _BYTES_PER_PIXEL, options.max_array_bytes,
                             options.pmap_decimation)


def _mapping(class_index: int, algorithm_name: str, integer: bool
             ) -> hd.pm.RealWorldValueMapping:
    """Stored levels 0..255 -> saliency 0..1 (integer maps); identity on 0..1 (float)."""
    return hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABELS[class_index],
        lut_explanation=f"{algorithm_name} {CLASS_NAMES[class_index]} saliency 0-1",
        unit=NO_UNITS,
        value_range=(0, SALIENCY_LEVELS) if integer else (0.0, 1.0),
        slope=1.0 / SALIENCY_LEVELS if integer else 1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.ClassActivation,
    )


def real_world_values(pm: Dataset) -> np.ndarray:
    """A PM's pixels through its Real World Value Mapping (float64, frames x rows x cols)."""
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    stored = pm.pixel_array.reshape(int(pm.get("NumberOfFrames", 1)), pm.Rows, pm.Columns)
    return (stored.astype(np.float64) * float(mapping.RealWorldValueSlope)
            + float(mapping.RealWorldValueIntercept))


def pmap_class_indices(options: ResultOptions) -> list[int]:
    """The classes (CLASS_NAMES indices) that get a Parametric Map, in CLASS_NAMES order."""
    return [i for i, name in enumerate(CLASS_NAMES) if name in options.pmap_classes]


def build_parametric_maps(analysis: ImageAnalysis, options: ResultOptions | None = None,
                          sources: list[Dataset] | None = None,
                          levels: dict[int, np.ndarray] | None = None) -> list[Dataset]:
    """One PM per class of options.pmap_classes (CLASS_NAMES order), each its own series in
    the source's study. `levels`: saliency_levels already computed on the PM's grid."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = pmap_factor(analysis, options)
    return [build_parametric_map(analysis, class_index, options, sources, factor=factor,
                                 levels=(levels or {}).get(class_index))
            for class_index in pmap_class_indices(options)]


def build_parametric_map(analysis: ImageAnalysis, class_index: int,
                         options: ResultOptions | None = None,
                         sources: list[Dataset] | None = None, *, factor: int | None = None,
                         levels: np.ndarray | None = None) -> Dataset:
    """The saliency of one class (CLASS_NAMES order) as a Parametric Map, the only instance
    of its own series."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = factor or pmap_factor(analysis, options)
    grid = result_grid(analysis, sources, factor)
    if levels is None:
        levels = saliency_levels(analysis, class_index, factor)
    if levels.shape != (analysis.image.shape[0], grid.rows, grid.columns):
        raise ValueError(f"levels of shape {levels.shape} are not on the PM's grid")
    integer = options.pmap_values == "integer"
    array: np.ndarray
    if integer:
        array = levels.astype(np.uint16)
        top = float(SALIENCY_LEVELS)
    else:  # float32 values on the same 1/255 steps: 256 bit patterns, deflate well
        array = levels.astype(np.float32)
        array *= np.float32(1.0 / SALIENCY_LEVELS)
        top = 1.0
    name = model_name(analysis.algorithm)
    label = CLASS_NAMES[class_index]
    with building("Parametric Map", analysis):
        pm = hd.pm.ParametricMap(
            source_images=sources,
            pixel_array=array,
            series_instance_uid=result_uid(analysis, options, "pmap-series", label),
            series_number=PMAP_SERIES_OFFSETS[class_index] + source_series_number(sources),
            sop_instance_uid=result_uid(analysis, options, "pmap", class_index),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=name,
            # several values (dicomnode, the weights); highdicom's hint says one
            software_versions=software_versions(analysis.algorithm),  # type: ignore[arg-type]
            device_serial_number=serial_number(analysis.algorithm),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[_mapping(class_index, name, integer)],
            # a list: highdicom splits a plain string into one value per character
            voi_lut_transformations=[hd.VOILUTTransformation(
                window_center=[top / 2], window_width=[top + 1 if integer else top],
                window_explanation=["SALIENCY 0-1"])],
            content_description=f"{name} {label} saliency, pixel grid 1/{factor}"[:64],
            content_label=LUT_LABELS[class_index],
            content_creator_name=_creator(name),
            plane_positions=grid.plane_positions,
            plane_orientation=grid.plane_orientation,
            pixel_measures=grid.pixel_measures,
            series_description=series_description(f"{label} saliency", analysis),
            institution_name=options.institution_name,
        )
    del array
    # Which weights made the values: the PM has no algorithm identification of its own.
    pm.DerivationDescription = (
        f"{name} {analysis.algorithm.version} {label} saliency; checkpoint "
        f"{analysis.algorithm.checkpoint_name} sha256 {analysis.algorithm.checkpoint_sha256}"
    )[:1024]
    # Frame Laterality in Frame Anatomy; General Series Laterality must then be absent
    finish_result(pm, analysis, sources[0])
    add_frame_anatomy(pm, analysis.image.laterality)
    frames_along_normal(pm)
    if options.deflate:
        pm.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return pm


def frame_anatomy(laterality: str | None) -> Dataset:
    """Frame Anatomy functional group item: the breast, with its Frame Laterality (L, R;
    U when unknown)."""
    item = Dataset()
    region = Dataset()
    region.CodeValue = BREAST.value
    region.CodingSchemeDesignator = BREAST.scheme_designator
    region.CodeMeaning = BREAST.meaning
    item.AnatomicRegionSequence = Sequence([region])
    item.FrameLaterality = laterality if laterality in ("L", "R") else "U"
    return item


def add_frame_anatomy(obj: Dataset, laterality: str | None) -> None:
    """Frame Anatomy in the shared functional groups (the same breast for every frame)."""
    obj.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = Sequence(
        [frame_anatomy(laterality)])


def frames_along_normal(pm: Dataset) -> None:
    """Store the frames in order of position along the orientation's normal (row direction
    x column direction), the order in which viewers built on cornerstone3D (OHIF) stack the
    source into a volume. OHIF 3.13 copies a Parametric Map's pixel data into that volume
    frame by frame in storage order, ignoring the frames' positions; highdicom writes them in
    the opposite order, so OHIF drew each slice's map on its mirror slice."""
    groups = pm.get("PerFrameFunctionalGroupsSequence")
    shared = pm.SharedFunctionalGroupsSequence[0]
    if not groups or len(groups) < 2 or "PlaneOrientationSequence" not in shared:
        return
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    distances = [float(np.dot(g.PlanePositionSequence[0].ImagePositionPatient, normal))
                 for g in groups]
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return
    keyword, dtype = (("FloatPixelData", "<f4") if "FloatPixelData" in pm
                      else ("PixelData", "<u2"))  # float32 or 16-bit integer maps
    frames = np.frombuffer(getattr(pm, keyword), dtype=dtype).reshape(len(groups), -1)
    # highdicom's order is usually the exact reverse: a view, copied once by tobytes
    reverse = np.array_equal(order, np.arange(len(order))[::-1])
    setattr(pm, keyword, (frames[::-1] if reverse else frames[order]).tobytes())
    pm.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]


def _creator(name: str) -> str:
    # Person Name: the software as the creator, "^" separates name components
    return f"{name.replace('^', ' ')}^dicomnode"


