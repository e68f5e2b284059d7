"""Reading back the probabilities from an SR this package wrote (demo summaries, checks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from dicomnode.results.sr import ATTENTION_WEIGHT, METHODS, PROBABILITY_CONCEPTS
from gmic.classes import CLASS_NAMES

_MEASUREMENT_GROUP = ("125007", "DCM")
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_METHOD = ("370129005", "SCT")
_TRACKING_ID = ("112039", "DCM")
_CLASS_OF = {(c.value, c.scheme_designator): name
             for c, name in zip(PROBABILITY_CONCEPTS, CLASS_NAMES, strict=True)}
_METHOD_OF = {(c.value, c.scheme_designator): name for name, c in METHODS.items()}


@dataclass
class SRSummary:
    """{method: {class: probability}} for the image ("final", "global", "local") and the
    breast ("breast"), and the attention weights of the attended regions in order."""

    study_uid: str
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    attention: list[float] = field(default_factory=list)


def _code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, keyword)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def read_sr_summary(sr: Dataset) -> SRSummary:
    summary = SRSummary(study_uid=str(sr.StudyInstanceUID))
    attention_code = (ATTENTION_WEIGHT.value, ATTENTION_WEIGHT.scheme_designator)
    for section in sr.ContentSequence:
        if _code(section) != _IMAGING_MEASUREMENTS:
            continue
        for group in section.ContentSequence:
            if _code(group) != _MEASUREMENT_GROUP:
                continue
            for num in group.ContentSequence:
                if num.ValueType != "NUM":
                    continue
                value = float(num.MeasuredValueSequence[0].NumericValue)
                if _code(num) == attention_code:
                    summary.attention.append(value)
                    continue
                cls = _CLASS_OF.get(_code(num))
                method = next((_METHOD_OF.get(_code(c, "ConceptCodeSequence"))
                               for c in num.get("ContentSequence", [])
                               if c.ValueType == "CODE" and _code(c) == _METHOD), None)
                if cls and method:
                    summary.probabilities.setdefault(method, {})[cls] = value
    return summary
