"""The one configuration object of 3D-GMIC / 2D GMIC (Park et al., section V).

Defaults follow the paper and the published models. Everything the model needs is here,
so a checkpoint that carries this object rebuilds exactly the network it was saved from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODALITIES = ("dbt", "ffdm", "s2d")

# Input sizes of paper V-D.3: equal field of view for all modalities.
DBT_INPUT_SIZE = (2116, 1339)
FFDM_INPUT_SIZE = (2866, 1814)

# The global network downsamples by 64 (stride-2 conv, stride-2 pool, four stride-2 stages).
GLOBAL_DOWNSAMPLING = 64


class GMICConfigError(ValueError):
    """A configuration value is out of range; the message names the field and the fix."""


@dataclass(frozen=True)
class GMICConfig:
    """Hyperparameters of one model.

    percent_t is relative to ONE slice's saliency area (paper V-B.3): the number of pooled
    voxels is round(h * w * percent_t) whatever the number of slices, so it may exceed 1.
    zeta is the +/- slice half-width of ROI suppression and training-time slice sampling;
    10 is the paper's default, its ablation (Table V) found 5 slightly better.
    """

    modality: str = "dbt"
    input_size: tuple[int, int] = DBT_INPUT_SIZE
    num_classes: int = 2
    num_crops: int = 12  # K; the paper samples K in {8, 12, 16} for DBT, {4, 6, 8} in 2D
    percent_t: float = 1.6  # published DBT models: 1.1-2.3
    zeta: int = 10
    crop_size: tuple[int, int] = (256, 256)
    saliency_init_log10_w: float = -2.5  # log10(w) ~ U(-3, -2) in the paper's search
    beta: float = 10 ** -5.54  # log10(beta) ~ U(-6.54, -4.54) for DBT
    norm_groups: int = 8  # GroupNorm groups in the global network (paper V-B.1)
    slice_chunk: int = 8  # slices per pass of the global network; 0 = all at once
    activation_checkpointing: bool = True  # recompute each chunk in backward (training)
    attention_dim: int = 128  # L of eq. 4
    # Base width of the local ResNet-18 (64 in the paper and the published models, giving
    # S = 8 * 64 = 512 features per patch); narrower for small models such as the built-in
    # weights trained on synthetic phantoms.
    local_width: int = 64

    def __post_init__(self) -> None:
        # Accept lists (JSON / checkpoint round trips) but store tuples: the object is frozen.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        problems = []
        if self.modality not in MODALITIES:
            problems.append(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            problems.append(f"input_size must be (height, width) > 0, got {self.input_size}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            problems.append(f"crop_size must be (height, width) > 0, got {self.crop_size}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.num_crops < 1:
            problems.append(f"num_crops (K) must be >= 1, got {self.num_crops}")
        if not self.percent_t > 0:
            problems.append(f"percent_t must be > 0, got {self.percent_t}")
        if self.zeta < 0:
            problems.append(f"zeta must be >= 0, got {self.zeta}")
        if self.beta < 0:
            problems.append(f"beta must be >= 0, got {self.beta}")
        if self.slice_chunk < 0:
            problems.append(f"slice_chunk must be >= 0 (0 = all slices), got {self.slice_chunk}")
        if self.norm_groups < 1 or 16 % self.norm_groups:
            problems.append(f"norm_groups must divide 16 (the narrowest stage), got "
                            f"{self.norm_groups}")
        if self.attention_dim < 1:
            problems.append(f"attention_dim must be >= 1, got {self.attention_dim}")
        if self.local_width < 1:
            problems.append(f"local_width must be >= 1, got {self.local_width}")
        if problems:
            raise GMICConfigError("invalid GMIC configuration: " + "; ".join(problems))

    @property
    def saliency_init_w(self) -> float:
        return 10.0 ** self.saliency_init_log10_w

    @property
    def local_features(self) -> int:
        """S of eq. 4: channels of the local network's last stage."""
        return 8 * self.local_width

    @property
    def map_size(self) -> tuple[int, int]:
        """Saliency map (h, w) for a full input (2116x1339 -> 33x21)."""
        return global_map_size(*self.input_size)

    def replace(self, **changes: Any) -> GMICConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GMICConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GMICConfigError(f"unknown GMIC configuration fields {unknown}; "
                                  f"known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def dbt(cls, **changes: Any) -> GMICConfig:
        """3D-GMIC for tomosynthesis (96-ish slices of 2116x1339)."""
        return cls(**changes)

    @classmethod
    def ffdm(cls, **changes: Any) -> GMICConfig:
        """2D GMIC for full-field digital mammography (paper V-D.2)."""
        base: dict[str, Any] = dict(modality="ffdm", input_size=FFDM_INPUT_SIZE, num_crops=6,
                                    percent_t=0.02, beta=10 ** -4.5, zeta=0)
        return cls(**{**base, **changes})

    @classmethod
    def s2d(cls, **changes: Any) -> GMICConfig:
        """2D GMIC for synthetic 2D mammograms (same field of view as DBT slices)."""
        base: dict[str, Any] = dict(modality="s2d", input_size=DBT_INPUT_SIZE, num_crops=6,
                                    percent_t=0.02, beta=10 ** -4.5, zeta=0)
        return cls(**{**base, **changes})

    @classmethod
    def for_modality(cls, modality: str, **changes: Any) -> GMICConfig:
        factories = {"dbt": cls.dbt, "ffdm": cls.ffdm, "s2d": cls.s2d}
        if modality not in factories:
            raise GMICConfigError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return factories[modality](**changes)


def global_map_size(height: int, width: int) -> tuple[int, int]:
    """Output (h, w) of the global network for an (height, width) input."""

    def out(n: int) -> int:
        n = (n + 2 * 3 - 7) // 2 + 1  # 7x7 conv, stride 2, pad 3
        n = (n - 3) // 2 + 1  # 3x3 max-pool, stride 2, no padding
        for _ in range(4):  # four stride-2 stages (3x3 conv, pad 1)
            n = (n + 2 - 3) // 2 + 1
        return n

    return out(height), out(width)
