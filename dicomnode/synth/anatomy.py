"""The breast phantom of one view: outline, thickness, skin, pectoral muscle, glandular tissue.

Coordinates are "phantom" coordinates in mm: x from the chest wall (x = 0, image column 0)
towards the nipple, y down the image rows, z through the compressed breast (z = 0 at the first
DBT slice). Right breasts are mirrored only when written, so everything here has the chest wall
on the left.

Tissue is described by linear attenuation (1/cm, at a mammographic ~20 keV) on a coarse grid
(COARSE_MM in-plane, SLICE_MM in depth) because its texture is dominated by low spatial
frequencies (power spectrum ~1/f^3); the output grids get it by linear upsampling plus a
fine-scale texture layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sparse
from scipy import fft, ndimage

from dicomnode.synth.options import COARSE_FACTOR, COARSE_MM, SLICE_MM, SizeSpec

# Linear attenuation at ~20 keV (1/cm), after Johns & Yaffe 1987 / Hammerstein 1979.
MU_FAT = 0.46
MU_GLAND = 0.80
MU_SKIN = 0.80
MU_MUSCLE = 0.78
SKIN_MM = 1.2
SUBCUTANEOUS_FAT_MM = 4.0

# BI-RADS density a-d -> volumetric glandular fraction of the breast (typical values).
DENSITY_FRACTION = {"a": 0.06, "b": 0.15, "c": 0.30, "d": 0.50}
DENSITY_PREVALENCE = {"a": 0.10, "b": 0.40, "c": 0.40, "d": 0.10}

# Limited-angle reconstruction: half the tube sweep, and how structures from other depths
# spread into a slice (half the signal is the slice itself, the rest its blurred neighbours).
HALF_SWEEP_RAD = np.deg2rad(12.5)
IN_SLICE_WEIGHT = 0.5
OUT_OF_PLANE_REACH = 6  # slices
OUT_OF_PLANE_DECAY = 2.5  # slices


def power_law_field(rng: np.random.Generator, shape: tuple[int, ...],
                    spacing_mm: tuple[float, ...], beta: float = 3.0,
                    f_min: float = 0.02, f_high: float | None = None) -> np.ndarray:
    """Gaussian random field with power spectrum ~ 1/(f^2 + f_min^2)^(beta/2), zero mean, unit std.

    f in cycles/mm. `f_high` keeps only frequencies above it (a fine-detail layer).
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    spectrum = fft.rfftn(noise, workers=1)
    del noise
    f2 = np.zeros(spectrum.shape, dtype=np.float32)
    for axis, (n, d) in enumerate(zip(shape, spacing_mm, strict=True)):
        freqs = fft.rfftfreq(n, d) if axis == len(shape) - 1 else fft.fftfreq(n, d)
        view = [1] * len(shape)
        view[axis] = -1
        f2 = f2 + (freqs.astype(np.float32) ** 2).reshape(view)
    amp = (f2 + np.float32(f_min**2)) ** np.float32(-beta / 4.0)
    if f_high is not None:
        amp *= 1.0 - np.exp(-f2 / np.float32(f_high**2))
    spectrum *= amp
    del amp, f2
    field = fft.irfftn(spectrum, s=shape, workers=1).astype(np.float32, copy=False)
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _linear_weights(n_out: int, n_in: int, factor: float) -> sparse.csr_matrix:
    # Pixel-centre aligned linear interpolation; output pixel i sits at input (i+0.5)/f - 0.5.
    centre = np.clip((np.arange(n_out) + 0.5) / factor - 0.5, 0, n_in - 1)
    i0 = np.floor(centre).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (centre - i0).astype(np.float32)
    rows = np.arange(n_out)
    return sparse.csr_matrix(
        (np.concatenate([1 - w1, w1]), (np.concatenate([rows, rows]), np.concatenate([i0, i1]))),
        shape=(n_out, n_in))


class Upsampler:
    """Separable linear upsampling of coarse 2D maps onto one output grid (sparse, fast)."""

    def __init__(self, coarse_shape: tuple[int, int], out_shape: tuple[int, int],
                 factor: float) -> None:
        self.out_shape = out_shape
        self._wy = _linear_weights(out_shape[0], coarse_shape[0], factor)
        self._wx = _linear_weights(out_shape[1], coarse_shape[1], factor)

    def __call__(self, coarse: np.ndarray, rows: slice = slice(None),
                 cols: slice = slice(None)) -> np.ndarray:
        tmp = np.asarray(self._wx[cols] @ coarse.T, dtype=np.float32)  # (x_out, y_in)
        return np.ascontiguousarray(self._wy[rows] @ tmp.T, dtype=np.float32)


@dataclass
class ViewPhantom:
    """One compressed breast as one view sees it (shared by its DBT, synthetic 2D and FFDM)."""

    view: str  # "CC" | "MLO"
    height_mm: float
    width_mm: float
    thickness_mm: float
    nipple_mm: float  # nipple distance from the chest wall
    rows: int  # DBT / synthetic 2D grid
    cols: int
    slices: int
    outline: np.ndarray  # coarse (ny, nx) bool
    thickness: np.ndarray  # coarse (ny, nx) local compressed thickness, mm
    inside: np.ndarray  # coarse (nz, ny, nx) float32 fraction of each voxel inside the breast
    mu: np.ndarray  # coarse (nz, ny, nx) float32 attenuation, 0 outside
    pectoral: np.ndarray | None  # coarse (ny, nx) bool, MLO only
    # Texture family and its drawn parameters (dicomnode.synth.texture), recorded per image.
    texture: dict = field(default_factory=lambda: {"family": "powerlaw"})

    @property
    def coarse_shape(self) -> tuple[int, int]:
        return self.outline.shape  # type: ignore[return-value]

    def chord(self, x_mm: float) -> tuple[float, float]:
        """(top, bottom) y in mm of the breast outline at distance x_mm from the chest wall."""
        col = int(np.clip(x_mm / COARSE_MM, 0, self.outline.shape[1] - 1))
        rows = np.flatnonzero(self.outline[:, col])
        if rows.size == 0:
            return self.height_mm / 2, self.height_mm / 2
        return float(rows[0] * COARSE_MM), float((rows[-1] + 1) * COARSE_MM)


def _snap(mm: float, step_mm: float) -> float:
    return max(1, round(mm / step_mm)) * step_mm


def build_view_phantom(rng: np.random.Generator, view: str, spec: SizeSpec,
                       breast: BreastParams, family: str = "powerlaw",
                       texture_rng: np.random.Generator | None = None,
                       variety: bool = False) -> ViewPhantom:
    """Compressed breast of one view: outline, thickness profile, skin, muscle, glandular tissue.

    `family` names the glandular texture (dicomnode.synth.texture), drawn from `texture_rng`;
    the default (powerlaw, no variety) is the original generator, drawn from `rng`, so that
    its output is unchanged byte for byte.
    """
    coarse_mm = COARSE_MM
    height = _snap(breast.height_mm, coarse_mm)
    width = _snap(breast.width_mm, coarse_mm)
    thickness = breast.thickness_mm + (rng.uniform(1.0, 5.0) if view == "MLO" else 0.0)
    thickness = float(np.clip(round(thickness), spec.thickness_mm[0], spec.thickness_mm[1] + 5))
    ny, nx, nz = round(height / coarse_mm), round(width / coarse_mm), round(thickness / SLICE_MM)
    y = (np.arange(ny, dtype=np.float32) + 0.5) * coarse_mm
    x = (np.arange(nx, dtype=np.float32) + 0.5) * coarse_mm

    margin = rng.uniform(0.06, 0.12) * width
    nipple = width - margin
    p = breast.shape_exponent
    if view == "CC":
        centre = height * (0.5 + rng.uniform(-0.03, 0.03))
        half = height * rng.uniform(0.42, 0.47)
    else:  # MLO: the breast runs up into the axilla, off the top of the image
        centre = height * rng.uniform(0.58, 0.64)
        half = centre * rng.uniform(1.02, 1.12)
    # Superellipse outline, with a gently varying radius so no two breasts match.
    yy, xx = np.meshgrid(y, x, indexing="ij")
    u = np.abs((yy - centre) / half)
    angle = np.arctan2(yy - centre, xx)
    wobble = 1.0 + sum(rng.uniform(-0.03, 0.03) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                       for k in (2, 3, 5))
    reach = nipple * wobble * np.clip(1.0 - u**p, 0, None) ** (1.0 / p)
    outline = xx <= reach

    pectoral = None
    if view == "MLO":
        top_width = nipple * rng.uniform(0.25, 0.42)
        length = height * rng.uniform(0.40, 0.65)
        bulge = rng.uniform(0.0, 0.12)
        t = np.clip(yy / length, 0, None)
        edge = top_width * (1.0 - t) * (1.0 + bulge * np.sin(np.pi * np.clip(t, 0, 1)))
        pectoral = (xx <= edge) & outline

    # Signed distance to the skin (not through the chest wall, nor into the axilla off the
    # top), smoothed so the upsampled outline is not a staircase of coarse pixels.
    pad_top = ny if view == "MLO" else 0
    padded = np.pad(outline, ((pad_top, 0), (nx, 0)), mode="edge")
    signed = (ndimage.distance_transform_edt(padded) - ndimage.distance_transform_edt(~padded)
              - 0.5)[-ny:, -nx:]
    signed = ndimage.gaussian_filter(signed, 1.0).astype(np.float32) * np.float32(coarse_mm)
    edge_dist = np.clip(signed, 0, None)
    half_t = thickness / 2
    # Compressed breast edge is rounded: a half-circle of diameter T meets the paddles.
    frac = np.clip(edge_dist / half_t, 0, 1)
    local_t = (thickness * np.sqrt(1.0 - (1.0 - frac) ** 2)).astype(np.float32)
    outline = signed > 0

    z = ((np.arange(nz, dtype=np.float32) + 0.5) * SLICE_MM)[:, None, None]
    from_mid = np.abs(z - np.float32(half_t))
    inside = np.clip((local_t[None] / 2 - from_mid) / SLICE_MM + 0.5, 0, 1).astype(np.float32)
    depth = np.minimum(local_t[None] / 2 - from_mid, edge_dist[None])  # below the skin, mm

    # Fibroglandular tissue: a thresholded 1/f^3 field, kept out of the subcutaneous fat and
    # most dense behind the nipple, thresholded to this breast's density.
    # f_min sets the largest tissue "lumps" (~1/f_min mm); larger ones would make every
    # projection a few bright clouds.
    if family == "powerlaw" and not variety:
        tissue = power_law_field(rng, (nz, ny, nx), (SLICE_MM, coarse_mm, coarse_mm), beta=3.0,
                                 f_min=0.04)
        texture: dict = {"family": "powerlaw", "beta": 3.0, "f_min": 0.04}
    else:
        from dicomnode.synth.texture import texture_field

        tissue, texture = texture_field(family, texture_rng or rng, (nz, ny, nx),
                                        (SLICE_MM, coarse_mm, coarse_mm),
                                        (float(centre), float(nipple)), variety=variety)
    central = np.exp(-((yy - centre) / (0.9 * half)) ** 2 - ((xx - 0.45 * nipple) / nipple) ** 2)
    tissue += np.float32(2.0) * central[None].astype(np.float32)
    fat_layer = min(SUBCUTANEOUS_FAT_MM, 0.12 * thickness)
    envelope = np.clip((depth - fat_layer) / min(6.0, 0.2 * thickness), 0, 1)
    if pectoral is not None:
        envelope[:, pectoral] = 0
    core = envelope > 0.5
    target = float(np.clip(breast.gland_fraction / max(core.mean() / max(
        (inside > 0.5).mean(), 1e-6), 1e-6), 0.01, 0.95))
    sample = tissue[core]
    if sample.size > 200_000:
        sample = sample[rng.integers(0, sample.size, 200_000)]
    threshold = float(np.quantile(sample, 1.0 - target)) if sample.size else 0.0
    gland = (1.0 / (1.0 + np.exp(-(tissue - threshold) / 0.25))).astype(np.float32)
    gland *= envelope.astype(np.float32)
    del tissue, sample

    mu = np.full_like(inside, MU_FAT)
    mu += gland * np.float32(MU_GLAND - MU_FAT)
    skin = np.clip((SKIN_MM - depth) / coarse_mm + 0.5, 0, 1).astype(np.float32)
    mu += skin * np.float32(MU_SKIN - MU_FAT) * (1 - gland)
    if pectoral is not None:
        mu[:, pectoral] = MU_MUSCLE
    mu *= inside
    del depth, skin, gland

    return ViewPhantom(view=view, height_mm=height, width_mm=width, thickness_mm=thickness,
                       nipple_mm=float(nipple), rows=ny * COARSE_FACTOR, cols=nx * COARSE_FACTOR,
                       slices=nz, outline=outline, thickness=local_t, inside=inside, mu=mu,
                       pectoral=pectoral, texture=texture)


@dataclass(frozen=True)
class BreastParams:
    """What two views of one breast share (the compression differs per view)."""

    height_mm: float
    width_mm: float
    thickness_mm: float
    shape_exponent: float
    gland_fraction: float


def sample_breast(rng: np.random.Generator, spec: SizeSpec, density: str) -> BreastParams:
    lo, hi = spec.thickness_mm
    thickness = float(np.clip(rng.normal((lo + hi) / 2 - 0.1 * (hi - lo), (hi - lo) / 4), lo, hi))
    fraction = DENSITY_FRACTION[density] * float(rng.uniform(0.8, 1.25))
    return BreastParams(height_mm=float(rng.uniform(*spec.height_mm)),
                        width_mm=float(rng.uniform(*spec.width_mm)),
                        thickness_mm=thickness, shape_exponent=float(rng.uniform(1.8, 2.6)),
                        gland_fraction=fraction)


def tomo_blur(volume: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Limited-angle reconstruction of a (z, y, x) attenuation volume, as a linear model.

    Each slice keeps IN_SLICE_WEIGHT of itself and receives the rest from slices d away,
    weighted ~exp(-|d|/decay) and smeared along the tube sweep (image rows, parallel to the
    chest wall) by d * tan(half sweep): an object is sharp only in the slices it occupies.
    """
    weights = np.exp(-np.arange(1, OUT_OF_PLANE_REACH + 1) / OUT_OF_PLANE_DECAY)
    weights = (1.0 - IN_SLICE_WEIGHT) * weights / (2 * weights.sum())
    out = volume * np.float32(IN_SLICE_WEIGHT)
    nz = volume.shape[0]
    # Only slices with signal need smearing (a lesion's stack is mostly empty margin).
    active = np.flatnonzero(volume.reshape(nz, -1).any(axis=1))
    lo, hi = (int(active[0]), int(active[-1]) + 1) if active.size else (0, 0)
    blurred = np.zeros_like(volume)
    for d, w in enumerate(weights, start=1):
        if d >= nz:
            # Beyond the volume: the weight still belongs to the slice (keeps the mean).
            out += volume * np.float32(2 * w)
            continue
        sigma_rows = d * SLICE_MM * np.tan(HALF_SWEEP_RAD) / pixel_mm
        if hi > lo:
            ndimage.gaussian_filter1d(volume[lo:hi], sigma_rows, axis=1, mode="nearest",
                                      truncate=3.0, output=blurred[lo:hi])
        out[d:] += np.float32(w) * blurred[:-d]
        out[:-d] += np.float32(w) * blurred[d:]
        # Slices near the top/bottom lack neighbours on one side: give them their own signal.
        out[:d] += np.float32(w) * volume[:d]
        out[-d:] += np.float32(w) * volume[-d:]
    return out
