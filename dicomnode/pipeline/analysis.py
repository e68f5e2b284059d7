"""What one model run found, in the source images' terms: the hand-off from the worker
(which runs gmic) to the result builders (SR, SEG, Parametric Map, CAD SR)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicomnode.pipeline.images import BreastImage
from gmic.preprocess import PreprocessTransform


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Which model produced a result: written into every result object."""

    name: str  # "3D-GMIC" (DBT) or "GMIC" (FFDM, synthetic 2D)
    version: str  # dicomnode version
    checkpoint_name: str  # "builtin:dbt" or the checkpoint file's name
    checkpoint_sha256: str
    description: str = ""  # e.g. "trained on synthetic phantoms; not for clinical use"
    # Scores are the mean over this many shifted/resized copies (up to augment_px pixels);
    # 0: one plain pass ([model] test_time_augmentations).
    test_time_augmentations: int = 0
    augment_px: int = 0
    # The model reads the whole breast crop, the input window grown past the checkpoint's
    # input size where the breast is larger ([model] whole_breast); False: a window of the
    # input size at the chest wall, which leaves most of a full-size breast unread.
    whole_breast: bool = True


@dataclass(frozen=True)
class AttendedRegion:
    """One of the K patches the local network looked at, on the source image."""

    frame_index: int  # 0-based slice of BreastImage.pixels (frame_numbers[frame_index] in DICOM)
    row0: int  # source pixels, clipped to the image
    col0: int
    height: int
    width: int
    attention: float  # gated-attention weight; the K weights sum to 1

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) centre in source pixel coordinates (pixel centres at integers)."""
        return self.row0 + (self.height - 1) / 2, self.col0 + (self.width - 1) / 2


@dataclass(frozen=True)
class ClassProbabilities:
    benign: float
    malignant: float


@dataclass
class ImageAnalysis:
    """The model's result for one source image (a DBT volume or a 2D view)."""

    image: BreastImage
    algorithm: AlgorithmIdentity
    final: ClassProbabilities  # y = (y_global + y_local) / 2
    global_: ClassProbabilities  # y_global
    local: ClassProbabilities  # y_local
    regions: list[AttendedRegion]
    # (D, 2, h, w) float32 in [0, 1], model-input space, channels in gmic.classes.CLASS_NAMES order
    saliency: np.ndarray
    transform: PreprocessTransform

    def saliency_on_source(self, class_index: int, order: int = 1) -> np.ndarray:
        """(D, H, W) float32 saliency of one class on the source image's pixel grid."""
        return self.transform.map_to_source(self.saliency[:, class_index], order=order)


@dataclass
class BreastAnalysis:
    """Breast-level predictions: mean over views (CC, MLO) per modality, then over
    modalities (the paper's breast-wise predictions and modality ensembles)."""

    laterality: str
    final: ClassProbabilities
    per_modality: dict[str, ClassProbabilities] = field(default_factory=dict)
    images: list[ImageAnalysis] = field(default_factory=list)
