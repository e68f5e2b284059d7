"""Parametric Maps of the benign and malignant saliency (float32) on the source image's
frames, optionally on a decimated grid (see geometry).

One single-channel PM per class, each in its own series ("malignant saliency", "benign
saliency"), so a viewer shows each class as its own overlay: the frames of a two-channel PM
share their positions and differ only by their real-world value mapping, which a viewer
stacking frames by position may not separate, and OHIF (3.13) makes one display set per PM
series from its first instance, so a second PM in the same series would never be shown.

The PM IOD requires plane position and orientation, which a 2D mammogram lacks: for those
the PM gets a geometry derived from the source's PatientOrientation (geometry.
with_projection_geometry) in the source's frame of reference.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomnode.analysis import CLASS_NAMES, ImageAnalysis
from dicomnode.results.common import (
    MANUFACTURER,
    NO_UNITS,
    PMAP_SERIES_OFFSETS,
    ResultOptions,
    building,
    model_name,
    read_sources,
    result_uid,
    serial_number,
    series_description,
    source_series_number,
)
from dicomnode.results.geometry import (
    decimation_factor,
    finish_result,
    has_patient_geometry,
    result_grid,
    saliency_frames,
    with_projection_geometry,
)

LUT_LABELS = ("BENIGN_SAL", "MALIG_SAL")
_BYTES_PER_PIXEL = 4  # float32, one class per object


def pm_sources(sources: list[Dataset]) -> list[Dataset]:
    """The sources as the PM needs them: 2D images get a projection geometry."""
    if has_patient_geometry(sources[0]):
        return sources
    return [with_projection_geometry(src) for src in sources]


def pmap_factor(analysis: ImageAnalysis, options: ResultOptions) -> int:
    """Decimation factor of the PM: forced, or the smallest within options.max_array_bytes."""
    return decimation_factor(analysis.image.shape, _BYTES_PER_PIXEL, options.max_array_bytes,
                             options.pmap_decimation)


def _mapping(class_index: int, algorithm_name: str) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABELS[class_index],
        lut_explanation=f"{algorithm_name} {CLASS_NAMES[class_index]} saliency",
        unit=NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=codes.DCM.ClassActivation,
    )


def build_parametric_maps(analysis: ImageAnalysis, options: ResultOptions | None = None,
                          sources: list[Dataset] | None = None) -> list[Dataset]:
    """[benign PM, malignant PM], each its own series in the source's study and frame of
    reference."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = pmap_factor(analysis, options)
    return [build_parametric_map(analysis, class_index, options, sources, factor=factor)
            for class_index in range(len(CLASS_NAMES))]


def build_parametric_map(analysis: ImageAnalysis, class_index: int,
                         options: ResultOptions | None = None,
                         sources: list[Dataset] | None = None, *, factor: int | None = None
                         ) -> Dataset:
    """The saliency of one class (CLASS_NAMES order) as a Parametric Map, the only instance
    of its own series."""
    options = options or ResultOptions()
    sources = pm_sources(sources if sources is not None else read_sources(analysis))
    factor = factor or pmap_factor(analysis, options)
    grid = result_grid(analysis, sources, factor)
    depth = analysis.image.shape[0]
    array = np.empty((depth, grid.rows, grid.columns), dtype=np.float32)
    for d, frame in saliency_frames(analysis, class_index, factor):
        array[d] = frame
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
            software_versions=analysis.algorithm.version or "unknown",
            device_serial_number=serial_number(analysis.algorithm),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[_mapping(class_index, name)],
            voi_lut_transformations=[hd.VOILUTTransformation(
                window_center=0.5, window_width=1.0, window_explanation="SALIENCY 0-1")],
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
    finish_result(pm, analysis, sources[0], series_laterality=True)
    frames_along_normal(pm)
    return pm


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
    pixels = np.frombuffer(pm.FloatPixelData, dtype="<f4")  # the maps are float32
    pm.FloatPixelData = pixels.reshape(len(groups), -1)[order].tobytes()
    pm.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]


def _creator(name: str) -> str:
    # Person Name: the software as the creator, "^" separates name components
    return f"{name.replace('^', ' ')}^dicomnode"


