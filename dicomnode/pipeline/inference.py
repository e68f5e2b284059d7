"""Image -> analysis: the one way the node runs the model on an image.

The worker (the results it sends), `dicomnode evaluate` (its scores, localisation and
montages) and the benchmarks that run the worker all go through here, so an AUC that
`evaluate` reports is measured on the path the node runs: the same preprocessing, the same
input size (the checkpoint's), the same test-time augmentation and its seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dicomnode.pipeline.analysis import AttendedRegion, ClassProbabilities, ImageAnalysis
from gmic.classes import BENIGN, MALIGNANT

if TYPE_CHECKING:
    from dicomnode.pipeline.images import BreastImage
    from dicomnode.pipeline.weights import LoadedModel
    from gmic.model import GMIC, GMICOutput
    from gmic.preprocess import PreprocessTransform

# The copies of test-time augmentation are drawn from this seed unless told otherwise, so
# an image always gets the same score, in the node and in `evaluate`.
TTA_SEED = 0


@dataclass
class ModelPass:
    """One image through the model, in model-input space."""

    model_input: np.ndarray  # (D, H, W) float32: the preprocessed volume the model read
    transform: PreprocessTransform  # model input <-> source image
    output: GMICOutput  # the plain pass: saliency, crops, attention
    final: np.ndarray  # (2,) benign, malignant: the plain pass's, or the mean over copies


def run_model(model: GMIC, image: BreastImage, *, test_time_augmentations: int = 0,
              augment_px: int = 0, seed: int = TTA_SEED, dtype: str = "fp32",
              whole_breast: bool = True) -> ModelPass:
    """Preprocess one image at the model's input size and run the model. With
    whole_breast the input window grows to the whole breast crop where the breast is larger
    than the input size (rounded up to the network's stride); otherwise a window of the input
    size sits at the chest wall. With
    test_time_augmentations > 0 the final scores are the mean over that many copies
    shifted and resized at random by up to augment_px pixels (paper V-D.3); the output
    (what is drawn on the image) is always the plain pass's."""
    import torch

    from gmic.model import predict, predict_augmented
    from gmic.preprocess import preprocess

    model_input, transform = preprocess(image.pixels, image.modality, image.laterality,
                                        input_size=model.cfg.input_size,
                                        whole_breast=whole_breast)
    volume = torch.from_numpy(model_input)
    output = predict(model, volume, dtype=dtype)
    final = output.y.float().cpu()
    if test_time_augmentations > 0:
        final = predict_augmented(model, volume, test_time_augmentations, augment_px,
                                  seed=seed, dtype=dtype)
    return ModelPass(model_input, transform, output, final.numpy())


def _probabilities(values: np.ndarray) -> ClassProbabilities:
    return ClassProbabilities(benign=float(values[BENIGN]), malignant=float(values[MALIGNANT]))


def analyse_image(image: BreastImage, loaded: LoadedModel, *, dtype: str = "fp32",
                  seed: int = TTA_SEED) -> ImageAnalysis:
    """Preprocess one image, run the model, and express the result on the source image.

    Where the model's identity says so (test_time_augmentations > 0), the final scores are
    the mean over that many shifted and resized copies; everything drawn on the image comes
    from the plain pass, whose geometry is the source image's."""
    identity = loaded.identity
    result = run_model(loaded.model, image,
                       test_time_augmentations=identity.test_time_augmentations,
                       augment_px=identity.augment_px, seed=seed, dtype=dtype,
                       whole_breast=identity.whole_breast)
    output, transform = result.output, result.transform
    crop_h, crop_w = loaded.model.cfg.crop_size
    regions = []
    for (frame, row, col), weight in zip(output.crop_positions.tolist(),
                                         output.attention.float().tolist(), strict=True):
        r0, c0, h, w = transform.to_source_box(int(row), int(col), crop_h, crop_w)
        regions.append(AttendedRegion(int(frame), r0, c0, h, w, float(weight)))
    return ImageAnalysis(
        image=image, algorithm=identity,
        final=_probabilities(result.final),
        global_=_probabilities(output.y_global.float().cpu().numpy()),
        local=_probabilities(output.y_local.float().cpu().numpy()),
        regions=regions, saliency=output.saliency.float().cpu().numpy(), transform=transform)
