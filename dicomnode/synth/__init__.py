"""Synthetic breast screening studies (DBT + FFDM + synthetic 2D) with ground truth.

    from dicomnode.synth import generate_studies, SynthOptions
    records = generate_studies(Path("out"), SynthOptions(studies=2, size="small", seed=1))
"""

from dicomnode.synth.options import FAMILIES, SynthOptions, parse_families, parse_modalities
from dicomnode.synth.study import FindingRecord, ImageRecord, StudyRecord, generate_studies

__all__ = ["FAMILIES", "FindingRecord", "ImageRecord", "StudyRecord", "SynthOptions",
           "generate_studies", "parse_families", "parse_modalities"]
