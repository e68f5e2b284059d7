"""Result objects of one analysed image, built with highdicom, in the source's study:

- a Comprehensive 3D SR (TID 1500) with the probabilities, attended regions and the
  flagged-region summary (:mod:`dicomnode.results.sr`);
- a SEG of the flagged regions, BINARY or FRACTIONAL (:mod:`dicomnode.results.seg`);
- two Parametric Maps, benign and malignant saliency, each in its own series
  (:mod:`dicomnode.results.pmap`);

and per study, a Mammography CAD SR (TID 4000) of its DBT images with the marks on their
slices (:func:`build_cad_sr`, :mod:`dicomnode.results.cad_sr`).

    results = build_results(analysis, breast, ResultOptions())
    for ds in results.datasets: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from dicomnode.analysis import BreastAnalysis, ImageAnalysis
from dicomnode.results.cad_sr import build_cad_sr
from dicomnode.results.common import ResultOptions, ResultsError, read_sources
from dicomnode.results.pmap import build_parametric_map, build_parametric_maps
from dicomnode.results.seg import SegmentationResult, build_segmentation
from dicomnode.results.sr import build_sr

__all__ = ["ResultOptions", "ResultSet", "ResultsError", "SegmentationResult", "build_cad_sr",
           "build_results", "build_parametric_map", "build_parametric_maps",
           "build_segmentation", "build_sr", "read_sources"]


@dataclass
class ResultSet:
    """The result objects of one source image (each its own new series)."""

    sr: Dataset
    seg: Dataset | None
    pmaps: list[Dataset] = field(default_factory=list)  # [benign, malignant], a series each
    segmentation: SegmentationResult | None = None  # the SEG with its flagged-pixel counts

    @property
    def datasets(self) -> list[Dataset]:
        """Everything to store and send: SEG and PMs before the SR that refers to the SEG."""
        return [*([self.seg] if self.seg is not None else []), *self.pmaps, self.sr]


def build_results(analysis: ImageAnalysis, breast: BreastAnalysis | None = None,
                  options: ResultOptions | None = None) -> ResultSet:
    """SR, SEG and Parametric Maps of one analysed image; `breast` adds the breast-level
    probabilities to the SR. Source headers are read once from analysis.image.source_paths."""
    options = options or ResultOptions()
    sources = read_sources(analysis)
    segmentation = build_segmentation(analysis, options, sources) if options.make_seg else None
    pmaps = build_parametric_maps(analysis, options, sources)
    sr = build_sr(analysis, breast, segmentation, options, sources)
    return ResultSet(sr=sr, seg=segmentation.dataset if segmentation else None, pmaps=pmaps,
                     segmentation=segmentation)
