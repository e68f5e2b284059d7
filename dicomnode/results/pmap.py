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
from dicomnode.results.buffers import BytesArray
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
from dicomnode.results.encode import deflate_early
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
    of its own series.

    highdicom builds everything but the pixels (from a stand-in array, _PlaneMarkers); the
    pixel data is then written once, straight from the uint8 levels into the final bytes
    in the final frame order (_map_pixel_data). Building the full array and letting
    highdicom encode it copied a full-size DBT's 1 GB map four times (float conversion,
    per-frame flatten and tobytes, join, the frame reorder: about 3 s a view).
    tests/test_results_pmap.py checks the dataset is the one highdicom builds from the
    whole array (reference_parametric_map), attribute for attribute."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = factor or pmap_factor(analysis, options)
    grid = result_grid(analysis, sources, factor)
    if levels is None:
        levels = saliency_levels(analysis, class_index, factor)
    if levels.shape != (analysis.image.shape[0], grid.rows, grid.columns):
        raise ValueError(f"levels of shape {levels.shape} are not on the PM's grid")
    integer = options.pmap_values == "integer"
    dtype = np.dtype(np.uint16 if integer else np.float32)
    pm = _highdicom_map(analysis, class_index, options, sources, grid,
                        _plane_markers(levels.shape, dtype), cls=_MarkerMap)
    # highdicom stored one marker per frame: the index of the plane the frame holds
    planes = np.frombuffer(getattr(pm, _pixel_keyword(pm)), dtype=dtype).astype(np.intp)
    order = _finish_map(pm, analysis, sources[0])
    pixel_data = _map_pixel_data(levels, planes[order], integer)
    setattr(pm, _pixel_keyword(pm), pixel_data)
    if options.deflate:
        pm.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        deflate_early(pixel_data, options.deflate_level)  # while the SR is built
    return pm


def reference_parametric_map(analysis: ImageAnalysis, class_index: int,
                             options: ResultOptions | None = None,
                             sources: list[Dataset] | None = None, *,
                             factor: int | None = None) -> Dataset:
    """The same Parametric Map built the straightforward way, slowly: the whole value array
    through highdicom, then the frames reordered along the normal. The tests compare
    build_parametric_map with it."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = factor or pmap_factor(analysis, options)
    grid = result_grid(analysis, sources, factor)
    levels = saliency_levels(analysis, class_index, factor)
    array: np.ndarray
    if options.pmap_values == "integer":
        array = levels.astype(np.uint16)
    else:  # float32 values on the same 1/255 steps: 256 bit patterns, deflate well
        array = levels.astype(np.float32)
        array *= np.float32(1.0 / SALIENCY_LEVELS)
    pm = _highdicom_map(analysis, class_index, options, sources, grid, array,
                        cls=hd.pm.ParametricMap)
    groups = list(pm.PerFrameFunctionalGroupsSequence)
    order = _finish_map(pm, analysis, sources[0])
    frames = np.frombuffer(getattr(pm, _pixel_keyword(pm)), dtype=array.dtype)
    setattr(pm, _pixel_keyword(pm),
            frames.reshape(len(groups), -1)[order].tobytes())
    if options.deflate:
        pm.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return pm


def _pixel_keyword(pm: Dataset) -> str:
    return "FloatPixelData" if "FloatPixelData" in pm else "PixelData"


def _highdicom_map(analysis: ImageAnalysis, class_index: int, options: ResultOptions,
                   sources: list[Dataset], grid, array: np.ndarray, *, cls) -> Dataset:
    integer = array.dtype != np.float32
    top = float(SALIENCY_LEVELS) if integer else 1.0
    name = model_name(analysis.algorithm)
    label = CLASS_NAMES[class_index]
    with building("Parametric Map", analysis):
        pm = cls(
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
            content_description=f"{name} {label} saliency, pixel grid 1/{grid.factor}"[:64],
            content_label=LUT_LABELS[class_index],
            content_creator_name=_creator(name),
            plane_positions=grid.plane_positions,
            plane_orientation=grid.plane_orientation,
            pixel_measures=grid.pixel_measures,
            series_description=series_description(f"{label} saliency", analysis),
            institution_name=options.institution_name,
        )
    # Which weights made the values: the PM has no algorithm identification of its own.
    pm.DerivationDescription = (
        f"{name} {analysis.algorithm.version} {label} saliency; checkpoint "
        f"{analysis.algorithm.checkpoint_name} sha256 {analysis.algorithm.checkpoint_sha256}"
    )[:1024]
    return pm


def _finish_map(pm: Dataset, analysis: ImageAnalysis, src: Dataset) -> np.ndarray:
    """Frame Anatomy and the frames' order along the normal (per-frame groups reordered);
    returns the order: new frame k is highdicom's frame order[k]."""
    # Frame Laterality in Frame Anatomy; General Series Laterality must then be absent
    finish_result(pm, analysis, src)
    add_frame_anatomy(pm, analysis.image.laterality)
    return frames_along_normal(pm)


class _MarkerMap(hd.pm.ParametricMap):
    """highdicom's ParametricMap storing, instead of each frame's pixels, its first pixel:
    with _plane_markers, the index of the plane the frame holds (everything else it
    writes does not depend on the pixel values)."""

    def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
        return planes[:1].tobytes()


class _PlaneMarkers(np.ndarray):
    """A (planes, rows, columns) array without memory: every pixel of plane d is d. Its
    flatten (what highdicom calls per frame) gives the first pixel only."""

    def flatten(self, order="C"):  # type: ignore[override]
        return np.asarray(self).reshape(-1)[:1].copy()


def _plane_markers(shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    index = np.arange(shape[0], dtype=dtype)
    markers = np.lib.stride_tricks.as_strided(index, shape=shape,
                                              strides=(dtype.itemsize, 0, 0), writeable=False)
    return markers.view(_PlaneMarkers)


def _map_pixel_data(levels: np.ndarray, planes: np.ndarray, integer: bool) -> bytes:
    """The pixel data of frames levels[planes[0]], levels[planes[1]], ...: 16-bit levels
    or float32 level/255 (the same float32 product as levels.astype(float32) * (1/255)),
    written once, into the bytes object itself (buffers.BytesArray)."""
    out = BytesArray((len(planes), *levels.shape[1:]), np.uint16 if integer else np.float32)
    scale = np.float32(1.0 / SALIENCY_LEVELS)
    for k, plane in enumerate(planes):
        if integer:
            out.array[k] = levels[plane]
        else:
            np.multiply(levels[plane], scale, out=out.array[k], dtype=np.float32)
    return out.finish()


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


def frames_along_normal(pm: Dataset) -> np.ndarray:
    """Order the per-frame functional groups by position along the orientation's normal
    (row direction x column direction), the order in which viewers built on cornerstone3D
    (OHIF) stack the source into a volume, and return that order (new frame k is frame
    order[k]); the caller stores the pixel data in it. OHIF 3.13 copies a Parametric Map's
    pixel data into that volume frame by frame in storage order, ignoring the frames'
    positions; highdicom writes them in the opposite order, so OHIF drew each slice's map
    on its mirror slice."""
    groups = pm.get("PerFrameFunctionalGroupsSequence")
    shared = pm.SharedFunctionalGroupsSequence[0]
    count = int(pm.get("NumberOfFrames", 1))
    if not groups or len(groups) < 2 or "PlaneOrientationSequence" not in shared:
        return np.arange(count)
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    distances = [float(np.dot(g.PlanePositionSequence[0].ImagePositionPatient, normal))
                 for g in groups]
    order = np.argsort(distances, kind="stable")
    if not np.array_equal(order, np.arange(len(order))):
        pm.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    return order


def _creator(name: str) -> str:
    # Person Name: the software as the creator, "^" separates name components
    return f"{name.replace('^', ' ')}^dicomnode"


