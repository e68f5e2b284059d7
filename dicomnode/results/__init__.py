"""Result objects of one analysed image, built with highdicom, in the source's study:

- a Comprehensive 3D SR (TID 1500) with the probabilities, attended regions and the
  flagged-region summary (:mod:`dicomnode.results.sr`);
- a SEG of the flagged regions, BINARY or FRACTIONAL (:mod:`dicomnode.results.seg`);
- Parametric Maps of the saliency, malignant by default, benign on request, each in its
  own series (:mod:`dicomnode.results.pmap`);

and per study, a Mammography CAD SR (TID 4000) of its DBT images with the marks on their
slices (:func:`build_cad_sr`, :mod:`dicomnode.results.cad_sr`).

    results = build_results(analysis, breast, ResultOptions())
    for ds in results.datasets: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.pipeline.analysis import BreastAnalysis, ImageAnalysis
from dicomnode.results.cad_sr import build_cad_sr
from dicomnode.results.common import ResultOptions, ResultsError, identify_result
from dicomnode.results.geometry import read_sources, saliency_levels
from dicomnode.results.pmap import (
    build_parametric_map,
    build_parametric_maps,
    pmap_class_indices,
    pmap_factor,
)
from dicomnode.results.seg import SegmentationResult, build_segmentation, seg_factor
from dicomnode.results.sr import build_sr
from gmic.classes import CLASS_NAMES

__all__ = ["ResultOptions", "ResultSet", "ResultsError", "SegmentationResult", "build_cad_sr",
           "build_results", "build_parametric_map", "build_parametric_maps",
           "build_segmentation", "build_sr", "identify_result", "read_sources"]


@dataclass
class ResultSet:
    """The result objects of one source image (each its own new series)."""

    sr: Dataset
    seg: Dataset | None
    pmaps: list[Dataset] = field(default_factory=list)  # ResultOptions.pmap_classes, a series each
    segmentation: SegmentationResult | None = None  # the SEG with its flagged-pixel counts

    @property
    def datasets(self) -> list[Dataset]:
        """Everything to store and send: SEG and PMs before the SR that refers to the SEG."""
        return [*([self.seg] if self.seg is not None else []), *self.pmaps, self.sr]


def build_results(analysis: ImageAnalysis, breast: BreastAnalysis | None = None,
                  options: ResultOptions | None = None) -> ResultSet:
    """SR, SEG and Parametric Maps of one analysed image; `breast` adds the breast-level
    probabilities to the SR. Source headers are read once from analysis.image.source_paths.

    The saliency is resampled to the source grid once per class and shared by the SEG and
    the Parametric Maps when they are on the same grid (geometry.saliency_levels). Every
    object gets the IHE AIR identification (common.identify_result)."""
    options = options or ResultOptions()
    sources = read_sources(analysis)
    levels: dict[int, np.ndarray] = {}
    binary = options.make_seg and options.seg_type == "binary"
    shared = binary and seg_factor(analysis, sources, options) == pmap_factor(analysis, options)
    if shared:
        factor = pmap_factor(analysis, options)
        levels = {c: saliency_levels(analysis, c, factor)
                  for c in range(len(CLASS_NAMES))}
    segmentation = (build_segmentation(analysis, options, sources, levels=levels or None)
                    if options.make_seg else None)
    pmaps = build_parametric_maps(
        analysis, options, sources,
        levels={c: levels[c] for c in pmap_class_indices(options) if c in levels} or None)
    levels.clear()
    sr = build_sr(analysis, breast, segmentation, options, sources)
    results = ResultSet(sr=sr, seg=segmentation.dataset if segmentation else None,
                        pmaps=pmaps, segmentation=segmentation)
    for ds in results.datasets:
        identify_result(ds, analysis.algorithm, sources[0])
    return results
