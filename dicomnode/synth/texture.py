"""Anatomical texture families of the fibroglandular tissue.

A model trained on one generator learns that generator (DESIGN.md, "Synthetic data at clinical
scale"): each family here makes the glandular tissue out of different structures, so that
training on some families and evaluating on another says whether a model learnt lesions or
learnt a texture. Every family returns a zero-mean, unit-variance field on the coarse anatomy
grid (nz, ny, nx); the phantom thresholds it to the breast's density as before, so the
families differ in shape, not in how much glandular tissue there is.

- ``powerlaw``: Gaussian random field with a ~1/f^beta power spectrum (Burgess et al.; the
  original generator, and the built-in weights' training data).
- ``ligament``: Cooper's ligaments and fibroglandular strands: many random elongated
  ellipsoids, oriented towards the nipple with a random spread, over a faint low-frequency
  background.
- ``lumpy``: clustered lumpy background (Bochud, Abbey & Eckstein's extension of Rolland &
  Barrett's lumpy background): Poisson clusters of Poisson numbers of anisotropic Gaussian
  blobs at random orientations.
- ``mixture``: fatty / dense mixture: large regions of dense tissue against fat, broken by
  round fat lobules (the lobular "bubbles" of anthropomorphic phantoms such as Bakic's).

Random shapes are rendered by splatting impulses at their centres and filtering each
orientation bin with an anisotropic Gaussian in the Fourier domain: one FFT pair per bin,
whatever the number of shapes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft

from dicomnode.synth.anatomy import power_law_field

FAMILIES = ("powerlaw", "ligament", "lumpy", "mixture")
ORIENTATION_BINS = 12


def _normalise(field: np.ndarray) -> np.ndarray:
    field -= field.mean()
    field /= max(float(field.std()), 1e-12)
    return field


def _freqs(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    out = []
    for axis, (n, d) in enumerate(zip(shape, spacing, strict=True)):
        f = fft.rfftfreq(n, d) if axis == len(shape) - 1 else fft.fftfreq(n, d)
        view = [1] * len(shape)
        view[axis] = -1
        out.append(f.astype(np.float32).reshape(view))
    return out


def oriented_splats(shape: tuple[int, int, int], spacing: tuple[float, float, float],
                    centres: np.ndarray, amplitudes: np.ndarray, angles: np.ndarray,
                    sigma_long: float, sigma_short: float, sigma_z: float,
                    bins: int = ORIENTATION_BINS) -> np.ndarray:
    """Sum of anisotropic Gaussians (mm sigmas) at `centres` ((N, 3) voxel (z, y, x)), their
    long axis in the image plane at `angles` (radians from the x axis, towards the nipple),
    quantised to `bins` orientations (over pi: a Gaussian is symmetric)."""
    out = np.zeros(shape, dtype=np.float32)
    if len(centres) == 0:
        return out
    fz, fy, fx = _freqs(shape, spacing)
    idx = np.clip(np.rint(centres).astype(np.int64), 0, np.array(shape) - 1)
    which = np.floor((np.mod(angles, np.pi) / np.pi) * bins + 0.5).astype(np.int64) % bins
    two_pi2 = np.float32(2 * math.pi ** 2)
    for b in range(bins):
        chosen = which == b
        if not chosen.any():
            continue
        impulses = np.zeros(shape, dtype=np.float32)
        np.add.at(impulses, tuple(idx[chosen].T), amplitudes[chosen].astype(np.float32))
        theta = math.pi * b / bins
        c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        f_long = fx * c + fy * s
        f_short = fy * c - fx * s
        gain = np.exp(-two_pi2 * (np.float32(sigma_long ** 2) * f_long ** 2
                                  + np.float32(sigma_short ** 2) * f_short ** 2
                                  + np.float32(sigma_z ** 2) * fz ** 2))
        spectrum = fft.rfftn(impulses, workers=1)
        del impulses
        spectrum *= gain
        out += fft.irfftn(spectrum, s=shape, workers=1).astype(np.float32, copy=False)
    return out


def _count(volume_mm3: float, per_cm3: float, cap: int = 400_000) -> int:
    return int(min(max(volume_mm3 / 1000.0 * per_cm3, 8), cap))


def _uniform_points(rng: np.random.Generator, shape: tuple[int, int, int], n: int
                    ) -> np.ndarray:
    return rng.uniform(0, 1, (n, 3)) * (np.array(shape) - 1)


def texture_field(family: str, rng: np.random.Generator, shape: tuple[int, int, int],
                  spacing: tuple[float, float, float], nipple_yx_mm: tuple[float, float],
                  variety: bool = True) -> tuple[np.ndarray, dict[str, float | str]]:
    """Zero-mean unit-variance field of one family on the coarse grid (nz, ny, nx), and the
    parameters drawn for it (recorded per image so that evaluation can group by them).

    ``nipple_yx_mm``: where ligaments point to. ``variety`` False gives the powerlaw family its
    fixed historical parameters (beta 3, f_min 0.04); the other families always vary."""
    if family not in FAMILIES:
        raise ValueError(f"unknown texture family {family!r}; use one of {', '.join(FAMILIES)}")
    nz, ny, nx = shape
    volume_mm3 = nz * ny * nx * spacing[0] * spacing[1] * spacing[2]
    params: dict[str, float | str] = {"family": family}
    if family == "powerlaw":
        beta = float(rng.uniform(2.6, 3.4)) if variety else 3.0
        f_min = float(rng.uniform(0.03, 0.06)) if variety else 0.04
        params.update(beta=round(beta, 3), f_min=round(f_min, 4))
        return power_law_field(rng, shape, spacing, beta=beta, f_min=f_min), params

    if family == "ligament":
        length = float(rng.uniform(2.5, 8.0))  # sigma along the strand, mm
        width = float(rng.uniform(0.25, 0.7))
        depth = float(rng.uniform(0.5, 1.5))
        per_cm3 = float(rng.uniform(8.0, 30.0))
        spread = float(rng.uniform(np.deg2rad(10), np.deg2rad(45)))
        background = float(rng.uniform(0.3, 0.8))
        n = _count(volume_mm3, per_cm3)
        centres = _uniform_points(rng, shape, n)
        y_mm = centres[:, 1] * spacing[1]
        x_mm = centres[:, 2] * spacing[2]
        # towards the nipple, each strand with its own deviation
        angles = np.arctan2(nipple_yx_mm[0] - y_mm, nipple_yx_mm[1] - x_mm + 1e-3)
        angles = angles + rng.normal(0, spread, n)
        amplitudes = rng.lognormal(0.0, 0.5, n)
        strands = _normalise(oriented_splats(shape, spacing, centres, amplitudes, angles,
                                             length, width, depth))
        base = power_law_field(rng, shape, spacing, beta=3.0, f_min=0.03)
        strands += np.float32(background) * base
        params.update(strand_sigma_mm=round(length, 2), strand_width_mm=round(width, 2),
                      strands_per_cm3=round(per_cm3, 1),
                      spread_deg=round(float(np.rad2deg(spread)), 1),
                      background=round(background, 2))
        return _normalise(strands), params

    if family == "lumpy":
        clusters_per_cm3 = float(rng.uniform(6.0, 20.0))
        blobs_per_cluster = float(rng.uniform(4.0, 20.0))
        cluster_sigma = float(rng.uniform(1.0, 3.0))  # mm
        blob_long = float(rng.uniform(0.5, 1.5))
        blob_ratio = float(rng.uniform(0.3, 0.9))
        n_clusters = _count(volume_mm3, clusters_per_cm3, cap=50_000)
        cluster_centres = _uniform_points(rng, shape, n_clusters)
        counts = rng.poisson(blobs_per_cluster, n_clusters)
        owners = np.repeat(np.arange(n_clusters), counts)
        offsets_mm = rng.normal(0, cluster_sigma, (owners.size, 3))
        offsets_mm[:, 0] *= 0.5  # compressed in depth
        centres = cluster_centres[owners] + offsets_mm / np.array(spacing)
        angles = rng.uniform(0, np.pi, owners.size)
        amplitudes = rng.lognormal(0.0, 0.3, owners.size)
        lumps = oriented_splats(shape, spacing, centres, amplitudes, angles, blob_long,
                                blob_long * blob_ratio, max(0.6, blob_long * blob_ratio),
                                bins=4)
        params.update(clusters_per_cm3=round(clusters_per_cm3, 2),
                      blobs_per_cluster=round(blobs_per_cluster, 1),
                      cluster_sigma_mm=round(cluster_sigma, 2), blob_sigma_mm=round(blob_long, 2),
                      blob_ratio=round(blob_ratio, 2))
        return _normalise(lumps), params

    # mixture: dense regions against fat, holed by fat lobules
    region_f_min = float(rng.uniform(0.012, 0.03))
    lobule_sigma = float(rng.uniform(1.0, 2.5))  # mm
    lobules_per_cm3 = float(rng.uniform(10.0, 30.0)) * (2.0 / lobule_sigma) ** 3
    lobule_weight = float(rng.uniform(1.0, 2.0))
    # Sharp-edged regions: dense where the smooth field is high, fat elsewhere.
    regions = np.tanh(2.0 * power_law_field(rng, shape, spacing, beta=3.5, f_min=region_f_min))
    n = _count(volume_mm3, lobules_per_cm3)
    centres = _uniform_points(rng, shape, n)
    lobules = _normalise(oriented_splats(shape, spacing, centres, rng.lognormal(0, 0.3, n),
                                         np.zeros(n), lobule_sigma, lobule_sigma,
                                         lobule_sigma * 0.8, bins=1))
    regions -= np.float32(lobule_weight) * lobules
    params.update(region_f_min=round(region_f_min, 4), lobule_sigma_mm=round(lobule_sigma, 2),
                  lobules_per_cm3=round(lobules_per_cm3, 2),
                  lobule_weight=round(lobule_weight, 2))
    return _normalise(regions), params
