"""Acquisition models: DBT reconstruction, synthetic 2D from the DBT volume, and FFDM.

All three see the same phantom and findings. Images are built in attenuation units (1/cm for
DBT slices, dimensionless line integrals for projections), then mapped to stored values:
- DBT slice k: the slice itself plus blurred neighbours (`tomo_blur`), so a finding is sharp in
  the slices it occupies and smeared, fainter, in the others; noisy (low dose per projection).
- Synthetic 2D: computed from the reconstructed volume (sum through depth plus a little of the
  maximum), so overlapping dense tissue lowers a mass's conspicuity as in a projection.
- FFDM: a separate exposure of the same compressed breast at 0.07 mm with its own noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.synth.anatomy import (
    HALF_SWEEP_RAD,
    MU_FAT,
    MU_GLAND,
    OUT_OF_PLANE_REACH,
    Upsampler,
    ViewPhantom,
    power_law_field,
    tomo_blur,
)
from dicomnode.synth.lesions import (
    CALCIFICATIONS,
    PlacedFinding,
    Roi,
    calc_slab,
    cluster_disc,
    mass_mu,
    mass_slab,
    roi_around,
    slice_range,
)
from dicomnode.synth.options import COARSE_FACTOR, COARSE_MM, DBT_PIXEL_MM, FFDM_PIXEL_MM, SLICE_MM
from gmic.classes import BENIGN_SEGMENT, MALIGNANT_SEGMENT

# Stored-value mapping.
DBT_BITS = 12
DBT_OFFSET = 40.0
DBT_GAIN = 2600.0  # per 1/cm: fat ~1240, glandular ~2120
DBT_NOISE_MU = 0.035  # 1/cm
S2D_BITS = 12
FFDM_BITS = 14
FFDM_NOISE = 0.008  # line-integral units
S2D_MAX_WEIGHT_CM = 0.1  # how much of the maximum through depth a synthetic 2D adds
FINE_TEXTURE_MU = 0.03  # fine glandular detail layer, 1/cm
TONE_SHOULDER = 1.1  # attenuation at which the for-presentation tone curve bends over


@dataclass(frozen=True)
class Acquisition:
    """Detector and processing of one study's machine. The defaults are the original
    generator's (every image alike); `sample_acquisition` draws varied ones."""

    dbt_noise_mu: float = DBT_NOISE_MU  # DBT slice noise, 1/cm
    ffdm_noise: float = FFDM_NOISE  # FFDM noise, line-integral units
    blur_px: float = 0.0  # detector / reconstruction blur, Gaussian sigma in pixels
    tone_shoulder: float = TONE_SHOULDER  # for-presentation tone curve of the projections
    tone_gamma: float = 1.0
    dbt_gain: float = DBT_GAIN  # stored value per 1/cm at 12 bits
    dbt_bits: int = DBT_BITS
    s2d_bits: int = S2D_BITS
    ffdm_bits: int = FFDM_BITS
    vendor: str = "dicomnode"  # header style (dicomnode.synth.dicom_writer.VENDOR_STYLES)

    def record(self) -> dict[str, str]:
        """The columns labels.csv records for each image."""
        return {"vendor": self.vendor, "noise_scale": f"{self.dbt_noise_mu / DBT_NOISE_MU:.3f}",
                "blur_px": f"{self.blur_px:.2f}", "tone_gamma": f"{self.tone_gamma:.3f}",
                "tone_shoulder": f"{self.tone_shoulder:.3f}"}


def sample_acquisition(rng: np.random.Generator, vendors: tuple[str, ...]) -> Acquisition:
    """A machine: noise 0.5-2x, blur up to 1.2 px, tone curve, bit depths, header style."""
    noise = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    dbt_bits = int(rng.choice([10, 12, 14]))
    return Acquisition(
        dbt_noise_mu=DBT_NOISE_MU * noise, ffdm_noise=FFDM_NOISE * noise,
        blur_px=float(rng.uniform(0.0, 1.2)), tone_shoulder=float(rng.uniform(0.8, 1.6)),
        tone_gamma=float(rng.uniform(0.7, 1.4)),
        dbt_gain=DBT_GAIN * float(rng.uniform(0.8, 1.2)) * 2.0 ** (dbt_bits - DBT_BITS),
        dbt_bits=dbt_bits, s2d_bits=int(rng.choice([10, 12])),
        ffdm_bits=int(rng.choice([12, 14])), vendor=str(rng.choice(list(vendors))))


@dataclass
class LesionMasks:
    """Label maps (0 none, 1 benign, 2 malignant) of one view, stored sparsely."""

    dbt: dict[int, np.ndarray]  # DBT slice index -> (rows, cols) uint8, only slices with labels
    s2d: np.ndarray  # (rows, cols) uint8 on the DBT / synthetic 2D grid
    ffdm: np.ndarray  # (rows, cols) uint8 on the FFDM grid


@dataclass
class RenderedView:
    dbt: np.ndarray | None  # (slices, rows, cols) uint16
    s2d: np.ndarray | None
    ffdm: np.ndarray | None
    masks: LesionMasks
    thickness_mm: float  # compressed breast thickness


def ffdm_shape(phantom: ViewPhantom) -> tuple[int, int]:
    return round(phantom.height_mm / FFDM_PIXEL_MM), round(phantom.width_mm / FFDM_PIXEL_MM)


def _label(f: PlacedFinding) -> int:
    return MALIGNANT_SEGMENT if f.spec.malignant else BENIGN_SEGMENT


def _paint(target: np.ndarray, window: tuple[slice, slice], mask: np.ndarray, label: int) -> None:
    region = target[window]
    # Malignant wins where a benign and a malignant finding overlap.
    np.maximum(region, np.where(mask, np.uint8(label), np.uint8(0)), out=region)


@dataclass
class _LesionStack:
    """One finding on the DBT grid: reconstructed contribution and physical occupancy."""

    finding: PlacedFinding
    roi: Roi
    first: int  # first DBT slice of `recon`
    recon: np.ndarray  # (n, ry, rx) reconstructed attenuation added to those slices
    mass_projection: np.ndarray  # (ry, rx) line integral of the mass (not calcifications)
    masks: dict[int, np.ndarray]  # slice -> (ry, rx) bool


def _lesion_stack(f: PlacedFinding, phantom: ViewPhantom, up: Upsampler) -> _LesionStack | None:
    nz = phantom.slices
    # Pad rows for the out-of-plane smear along the tube sweep.
    pad_mm = 3 * OUT_OF_PLANE_REACH * SLICE_MM * np.tan(HALF_SWEEP_RAD) + 1.0
    x, y, _ = f.centre_mm
    roi = roi_around((x, y), f.spec.extent_mm + pad_mm, DBT_PIXEL_MM, (phantom.rows, phantom.cols))
    if roi is None:
        return None
    occupied = slice_range(f, nz)
    first = max(occupied.start - OUT_OF_PLANE_REACH, 0)
    last = min(occupied.stop + OUT_OF_PLANE_REACH, nz)
    rows, cols = roi.slices()
    delta = np.zeros((last - first,) + roi.shape, dtype=np.float32)
    projection = np.zeros(roi.shape, dtype=np.float32)
    masks: dict[int, np.ndarray] = {}
    is_cluster = f.spec.kind == CALCIFICATIONS
    disc = cluster_disc(f, roi) if is_cluster else None
    for k in occupied:
        z0, z1 = k * SLICE_MM, (k + 1) * SLICE_MM
        if is_cluster:
            # Calcifications: attenuation integrated through the slab / slab thickness.
            delta[k - first] = calc_slab(f, roi, z0, z1) / np.float32(SLICE_MM * 0.1)
            masks[k] = disc
            continue
        occ = mass_slab(f, roi, z0, z1)
        if not occ.any():
            continue
        tissue = up(phantom.mu[k], rows, cols)
        # The mass replaces the tissue it sits in.
        mass = occ * (np.float32(mass_mu(f)) - tissue)
        delta[k - first] = mass
        projection += mass * np.float32(SLICE_MM * 0.1)
        m = occ >= 0.5
        if m.any():
            masks[k] = m
    recon = tomo_blur(delta, DBT_PIXEL_MM) if last - first > 1 else delta
    return _LesionStack(f, roi, first, recon, projection, masks)


def render_view(phantom: ViewPhantom, findings: list[PlacedFinding], rng_dbt: np.random.Generator,
                rng_ffdm: np.random.Generator, want_dbt: bool, want_s2d: bool,
                want_ffdm: bool, mirror: bool = False,
                acquisition: Acquisition | None = None) -> RenderedView:
    """Pixel data and lesion label maps of one view in the modalities asked for.

    `mirror` flips columns (a right breast hangs with its chest wall on the right); the DBT
    volume is written flipped slice by slice, never copied whole.
    """
    acq = acquisition or Acquisition()
    rows, cols = phantom.rows, phantom.cols
    up = Upsampler(phantom.coarse_shape, (rows, cols), COARSE_FACTOR)
    stacks = [s for s in (_lesion_stack(f, phantom, up) for f in findings) if s is not None]

    # Masks on the DBT / synthetic 2D grid.
    dbt_masks: dict[int, np.ndarray] = {}
    s2d_mask = np.zeros((rows, cols), dtype=np.uint8)
    for s in stacks:
        for k, m in s.masks.items():
            target = dbt_masks.setdefault(k, np.zeros((rows, cols), dtype=np.uint8))
            _paint(target, s.roi.slices(), m, _label(s.finding))
            _paint(s2d_mask, s.roi.slices(), m, _label(s.finding))

    dbt = s2d = None
    if want_dbt or want_s2d:
        dbt, s2d = _render_dbt(phantom, stacks, up, rng_dbt, keep_volume=want_dbt,
                               mirror=mirror, acq=acq)
        if not want_s2d:
            s2d = None
    ffdm = ffdm_mask = None
    if want_ffdm:
        ffdm, ffdm_mask = _render_ffdm(phantom, stacks, rng_ffdm, acq)
    if ffdm_mask is None:
        ffdm_mask = np.zeros(ffdm_shape(phantom), dtype=np.uint8)
    if mirror:
        s2d = None if s2d is None else np.ascontiguousarray(s2d[:, ::-1])
        ffdm = None if ffdm is None else np.ascontiguousarray(ffdm[:, ::-1])
        dbt_masks = {k: np.ascontiguousarray(m[:, ::-1]) for k, m in dbt_masks.items()}
        s2d_mask = np.ascontiguousarray(s2d_mask[:, ::-1])
        ffdm_mask = np.ascontiguousarray(ffdm_mask[:, ::-1])
    return RenderedView(dbt=dbt, s2d=s2d, ffdm=ffdm,
                        masks=LesionMasks(dbt=dbt_masks, s2d=s2d_mask, ffdm=ffdm_mask),
                        thickness_mm=phantom.thickness_mm)


def _fine_texture(rng: np.random.Generator, shape: tuple[int, int], pixel_mm: float) -> np.ndarray:
    # Detail finer than the coarse anatomy grid (above ~0.7 cycles/mm), still ~1/f^3.
    return power_law_field(rng, shape, (pixel_mm, pixel_mm), beta=3.0, f_high=0.7)


def _render_dbt(phantom: ViewPhantom, stacks: list[_LesionStack], up: Upsampler,
                rng: np.random.Generator, keep_volume: bool, mirror: bool,
                acq: Acquisition | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    acq = acq or Acquisition()
    rows, cols, nz = phantom.rows, phantom.cols, phantom.slices
    recon = tomo_blur(phantom.mu, COARSE_MM)
    # One fine-detail field, larger than the image: each slice takes its own window of it
    # (cheap, and uncorrelated between slices at these offsets).
    margin = 128
    fine = _fine_texture(rng, (rows + margin, cols + margin), DBT_PIXEL_MM)
    fine *= np.float32(FINE_TEXTURE_MU / (MU_GLAND - MU_FAT))
    offsets = rng.integers(0, margin, size=(nz, 2))
    volume = np.empty((nz, rows, cols), dtype=np.uint16) if keep_volume else None
    total = np.zeros((rows, cols), dtype=np.float32)  # sum through depth, 1/cm * slices
    peak = np.zeros((rows, cols), dtype=np.float32)
    gland = np.empty((rows, cols), dtype=np.float32)
    top = float(2**acq.dbt_bits - 1)
    for k in range(nz):
        value = up(recon[k])
        inside = up(phantom.inside[k])
        np.multiply(inside, np.float32(-MU_FAT), out=gland)
        gland += value  # attenuation above fat, 1/cm
        np.clip(gland, 0, MU_GLAND - MU_FAT, out=gland)
        dy, dx = offsets[k]
        gland *= fine[dy:dy + rows, dx:dx + cols]
        value += gland
        for s in stacks:
            j = k - s.first
            if 0 <= j < s.recon.shape[0]:
                value[s.roi.slices()] += s.recon[j]
        if acq.blur_px > 0:
            value = ndimage.gaussian_filter(value, acq.blur_px, mode="nearest")
        noise = rng.standard_normal((rows, cols), dtype=np.float32)
        noise *= np.float32(acq.dbt_noise_mu)
        value += noise
        excess = inside
        excess *= np.float32(-MU_FAT)
        excess += value
        total += excess
        np.maximum(peak, excess, out=peak)
        if volume is not None:
            value *= np.float32(acq.dbt_gain)
            value += np.float32(DBT_OFFSET)
            np.clip(value, 0, top, out=value)
            np.rint(value, out=value)
            volume[k] = value[:, ::-1] if mirror else value
    del recon, fine
    # Synthetic 2D: the sum through depth is the projection; a little of the maximum keeps
    # calcifications crisp as vendors' synthetic views do.
    thickness = up(phantom.thickness)
    s2d_att = total * np.float32(SLICE_MM * 0.1) + np.float32(S2D_MAX_WEIGHT_CM) * peak
    s2d_att += _equalised_thickness(thickness, phantom.thickness_mm)
    s2d = _tone(s2d_att, thickness > 0.5, acq.s2d_bits, acq.tone_shoulder, acq.tone_gamma)
    return volume, s2d


def _equalised_thickness(local_t: np.ndarray, thickness_mm: float) -> np.ndarray:
    # For-presentation processing flattens the thickness fall-off at the breast edge, leaving a
    # soft edge; without it the periphery would be black.
    return np.float32(0.3) * np.clip(local_t / np.float32(thickness_mm), 0, 1) ** np.float32(0.35)


def _tone(attenuation: np.ndarray, breast: np.ndarray, bits: int,
          shoulder: float = TONE_SHOULDER, gamma: float = 1.0) -> np.ndarray:
    """For-presentation look: brighter with attenuation, soft shoulder, dark background."""
    top = 2**bits - 1
    curve = 1 - np.exp(-np.clip(attenuation, 0, None) / np.float32(shoulder))
    if gamma != 1.0:
        curve **= np.float32(gamma)
    out = np.float32(0.85 * top) * curve
    out += np.float32(0.01 * top)
    out[~breast] = np.float32(0.01 * top)
    return np.rint(np.clip(out, 0, top)).astype(np.uint16)


def _render_ffdm(phantom: ViewPhantom, stacks: list[_LesionStack],
                 rng: np.random.Generator, acq: Acquisition | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    acq = acq or Acquisition()
    shape = ffdm_shape(phantom)
    up = Upsampler(phantom.coarse_shape, shape, COARSE_MM / FFDM_PIXEL_MM)
    excess = (phantom.mu - np.float32(MU_FAT) * phantom.inside).sum(axis=0)
    excess *= np.float32(SLICE_MM * 0.1)
    attenuation = up(excess)
    thickness = up(phantom.thickness)
    gland = np.clip(attenuation / np.float32(0.3), 0, 1)
    attenuation += np.float32(0.1 * FINE_TEXTURE_MU * 3) * gland * _fine_texture(
        rng, shape, FFDM_PIXEL_MM)
    mask = np.zeros(shape, dtype=np.uint8)
    for s in stacks:
        f = s.finding
        x, y, _ = f.centre_mm
        roi = roi_around((x, y), f.spec.extent_mm + 0.5, FFDM_PIXEL_MM, shape)
        if roi is None:
            continue
        window = roi.slices()
        if f.spec.kind == CALCIFICATIONS:
            attenuation[window] += calc_slab(f, roi, None, None)
            _paint(mask, window, cluster_disc(f, roi), _label(f))
            continue
        # Resample the mass's projection from the DBT grid (mass margins are coarser than
        # 0.1 mm, unlike calcifications, which are drawn at 0.07 mm above).
        ys, xs = roi.coords()
        ri = ys / np.float32(DBT_PIXEL_MM) - 0.5 - s.roi.r0
        ci = xs / np.float32(DBT_PIXEL_MM) - 0.5 - s.roi.c0
        grid = np.meshgrid(ri, ci, indexing="ij")
        attenuation[window] += ndimage.map_coordinates(s.mass_projection, grid, order=1,
                                                       mode="constant")
        any_slice = np.zeros(s.roi.shape, dtype=np.uint8)
        for m in s.masks.values():
            any_slice |= m
        lesion = ndimage.map_coordinates(any_slice, grid, order=0, mode="constant") > 0
        _paint(mask, window, lesion, _label(f))
    if acq.blur_px > 0:
        attenuation = ndimage.gaussian_filter(attenuation, acq.blur_px, mode="nearest")
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6) * np.float32(acq.ffdm_noise / 0.47)
    attenuation += noise
    attenuation += _equalised_thickness(thickness, phantom.thickness_mm)
    return (_tone(attenuation, thickness > 0.5, acq.ffdm_bits, acq.tone_shoulder,
                  acq.tone_gamma), mask)
