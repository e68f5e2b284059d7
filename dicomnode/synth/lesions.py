"""Findings: circumscribed benign masses, spiculated or irregular malignant masses, and clusters
of fine pleomorphic calcifications; with ``variety`` (``dicomnode synth --variety``) the kinds
and sizes screening finds: masses of about 3 to 30 mm with circumscribed, lobulated, indistinct,
irregular or spiculated margins, and clusters of fine pleomorphic, amorphous or punctate
calcifications, over a wider range of contrasts.

Architectural distortion is not generated: an honest one needs the surrounding tissue pulled
towards a point (the texture itself displaced), not a shape added on top of it, and a
spiculated mass without its core would only teach the model a thin-spicule detector.

A finding is drawn once per breast (`FindingSpec`, in breast-relative terms) and placed in each
view's compressed breast (`PlacedFinding`, phantom mm), so CC and MLO, DBT, synthetic 2D and FFDM
all show the same lesion. Shapes are analytic and rendered at each output grid's own pixel size,
so lesion sizes stay real (mm) whatever the field of view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dicomnode.synth.anatomy import MU_GLAND, ViewPhantom
from dicomnode.synth.options import SLICE_MM, SizeSpec

BENIGN_MASS = "benign mass"
MALIGNANT_MASS = "malignant mass"
CALCIFICATIONS = "calcification cluster"
KINDS = (BENIGN_MASS, MALIGNANT_MASS, CALCIFICATIONS)


@dataclass(frozen=True)
class Calcification:
    offset_mm: tuple[float, float, float]  # (x, y, z) from the cluster centre
    radius_mm: float
    mu_excess: float  # 1/cm above the tissue it sits in


@dataclass(frozen=True)
class Spicule:
    direction: tuple[float, float, float]  # unit (x, y, z)
    start_mm: float  # from the centre, inside the core
    length_mm: float
    width_mm: float  # at the base; tapers to zero


@dataclass(frozen=True)
class FindingSpec:
    """One finding of one breast, independent of view."""

    kind: str
    along: float  # distance from the chest wall, fraction of the nipple distance
    angle: float  # around the chest wall-nipple axis, radians
    radial: float  # 0 on the axis .. 1 at the skin
    radius_mm: float  # mass radius, or cluster radius
    contrast: float  # mass attenuation above glandular tissue, 1/cm
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rotation: float = 0.0
    lobes: tuple[tuple[int, float, float], ...] = ()  # (order, amplitude, phase)
    edge_mm: float = 0.1  # width of the mass margin (sharp = circumscribed)
    spicules: tuple[Spicule, ...] = ()
    calcifications: tuple[Calcification, ...] = ()
    # BI-RADS-style descriptor: mass margin (circumscribed, lobulated, indistinct, irregular,
    # spiculated) or calcification morphology (fine pleomorphic, amorphous, punctate).
    margin: str = ""

    @property
    def diameter_mm(self) -> float:
        """Largest in-plane diameter of the mass core, or of the calcification cluster."""
        if self.kind == CALCIFICATIONS:
            return 2 * self.radius_mm
        return 2 * self.radius_mm * max(self.axes[:2])

    @property
    def malignant(self) -> bool:
        return self.kind != BENIGN_MASS

    @property
    def extent_mm(self) -> float:
        """In-plane radius that contains everything the finding draws."""
        if self.kind == CALCIFICATIONS:
            return self.radius_mm + 0.5
        reach = self.radius_mm * max(self.axes[:2]) * (1 + sum(abs(a) for _, a, _ in self.lobes))
        for s in self.spicules:
            reach = max(reach, s.start_mm + s.length_mm + s.width_mm)
        return reach


def sample_finding(rng: np.random.Generator, kind: str, spec: SizeSpec,
                   variety: bool = False) -> FindingSpec:
    """One finding of `kind`; `variety` draws from the wider ranges (margins, sizes,
    morphologies, contrasts) instead of the original generator's."""
    if variety:
        return _sample_varied(rng, kind, spec)
    along = float(rng.uniform(0.25, 0.75))
    angle = float(rng.uniform(0, 2 * np.pi))
    radial = float(rng.uniform(0.0, 0.7))
    if kind == CALCIFICATIONS:
        radius = float(rng.uniform(*spec.cluster_radius_mm))
        count = int(rng.integers(5, 21))
        # Fine pleomorphic: 0.1-0.5 mm across, varied shapes stand in as varied sizes.
        calcs = _calcifications(rng, radius, count, median_mm=0.22, clip_mm=(0.1, 0.5),
                                excess=(3.0, 10.0))
        return FindingSpec(kind=kind, along=along, angle=angle, radial=radial, radius_mm=radius,
                           contrast=0.0, calcifications=calcs, margin="fine pleomorphic")
    lo, hi = spec.mass_diameter_mm
    radius = float(rng.uniform(lo, hi)) / 2
    axes = (float(rng.uniform(0.85, 1.2)), float(rng.uniform(0.75, 1.0)), 1.0)
    rotation = float(rng.uniform(0, np.pi))
    if kind == BENIGN_MASS:
        # Benign masses range from lower than glandular density (fat-containing) to a little
        # above it; malignant masses are equal to or denser than glandular tissue.
        contrast = float(rng.uniform(-0.06, 0.10))
        lobes = tuple((int(m), float(rng.uniform(0, 0.04)), float(rng.uniform(0, 2 * np.pi)))
                      for m in (2, 3))
        return FindingSpec(kind=kind, along=along, angle=angle, radial=radial, radius_mm=radius,
                           contrast=contrast, axes=axes, rotation=rotation, lobes=lobes,
                           edge_mm=0.1, margin="circumscribed")
    contrast = float(np.exp(rng.uniform(np.log(0.005), np.log(0.15))))
    irregular = bool(rng.random() < 0.4)
    lobes = tuple((int(m), float(rng.uniform(0.04, 0.14 if irregular else 0.07)),
                   float(rng.uniform(0, 2 * np.pi))) for m in (3, 4, 5, 7, 9))
    spicules = () if irregular else _spicules(rng, radius, int(rng.integers(8, 19)),
                                              length=(0.6, 1.5), width_mm=(0.3, 0.8))
    return FindingSpec(kind=kind, along=along, angle=angle, radial=radial, radius_mm=radius,
                       contrast=contrast, axes=axes, rotation=rotation, lobes=lobes,
                       edge_mm=float(rng.uniform(0.2, 0.6)), spicules=spicules,
                       margin="irregular" if irregular else "spiculated")


# Margins and their shares (benign / malignant) with variety; calcification morphologies.
BENIGN_MARGINS = {"circumscribed": 0.55, "lobulated": 0.35, "indistinct": 0.10}
MALIGNANT_MARGINS = {"spiculated": 0.40, "indistinct": 0.25, "irregular": 0.25,
                     "circumscribed": 0.10}
CALC_MORPHOLOGIES = {"fine pleomorphic": 0.5, "amorphous": 0.3, "punctate": 0.2}


def _choice(rng: np.random.Generator, shares: dict[str, float]) -> str:
    names = list(shares)
    return names[int(rng.choice(len(names), p=np.array(list(shares.values())) / sum(
        shares.values())))]


def _spicules(rng: np.random.Generator, radius: float, count: int, *,
              length: tuple[float, float] = (0.6, 2.0),
              width_mm: tuple[float, float] = (0.2, 0.8)) -> tuple[Spicule, ...]:
    """`count` spicules from 0.6 radius out, each `length` radii (+ 2 mm) long. The draws
    per spicule (direction, length, width, in that order) fix the output for a seed."""
    out = []
    for _ in range(count):
        d = rng.normal(size=3)
        d[2] *= 0.6  # compression flattens spicules towards the image plane
        d /= np.linalg.norm(d)
        out.append(Spicule(direction=(float(d[0]), float(d[1]), float(d[2])),
                           start_mm=0.6 * radius,
                           length_mm=float(radius * rng.uniform(*length) + 2.0),
                           width_mm=float(rng.uniform(*width_mm))))
    return tuple(out)


def _calcifications(rng: np.random.Generator, radius: float, count: int, *, median_mm: float,
                    clip_mm: tuple[float, float], excess: tuple[float, float]
                    ) -> tuple[Calcification, ...]:
    """`count` calcifications spread through a flattened ball of `radius` mm, diameters
    log-normal around `median_mm` (clipped), attenuation `excess` over tissue. The draws per
    calcification (position, diameter, excess, in that order) fix the output for a seed."""
    calcs = []
    for _ in range(count):
        while True:
            p = rng.uniform(-1, 1, 3)
            if p @ p <= 1:
                break
        diameter = float(np.clip(rng.lognormal(np.log(median_mm), 0.4), *clip_mm))
        calcs.append(Calcification(
            offset_mm=(float(p[0] * radius), float(p[1] * radius), float(p[2] * radius * 0.5)),
            radius_mm=diameter / 2, mu_excess=float(rng.uniform(*excess))))
    return tuple(calcs)


def _sample_varied(rng: np.random.Generator, kind: str, spec: SizeSpec) -> FindingSpec:
    along = float(rng.uniform(0.15, 0.85))
    angle = float(rng.uniform(0, 2 * np.pi))
    radial = float(rng.uniform(0.0, 0.8))
    if kind == CALCIFICATIONS:
        morphology = _choice(rng, CALC_MORPHOLOGIES)
        lo, hi = spec.cluster_radius_mm
        radius = float(rng.uniform(0.6 * lo, 1.5 * hi))
        count = int(rng.integers(3, 41))
        median, excess = {"fine pleomorphic": (0.22, (3.0, 10.0)),
                          "amorphous": (0.15, (1.5, 4.0)),
                          "punctate": (0.35, (4.0, 12.0))}[morphology]
        calcs = _calcifications(rng, radius, count, median_mm=median, clip_mm=(0.08, 0.8),
                                excess=excess)
        return FindingSpec(kind=kind, along=along, angle=angle, radial=radial, radius_mm=radius,
                           contrast=0.0, calcifications=calcs, margin=morphology)
    lo, hi = spec.varied_mass_diameter_mm
    radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 2
    axes = (float(rng.uniform(0.8, 1.25)), float(rng.uniform(0.7, 1.0)), 1.0)
    rotation = float(rng.uniform(0, np.pi))
    if kind == BENIGN_MASS:
        margin = _choice(rng, BENIGN_MARGINS)
        contrast = float(rng.uniform(-0.06, 0.12))
    else:
        margin = _choice(rng, MALIGNANT_MARGINS)
        contrast = float(np.exp(rng.uniform(np.log(0.005), np.log(0.2))))
    amplitude = {"circumscribed": (0.0, 0.04), "lobulated": (0.08, 0.2),
                 "indistinct": (0.02, 0.08), "irregular": (0.06, 0.16),
                 "spiculated": (0.03, 0.08)}[margin]
    orders = (2, 3) if margin in ("circumscribed", "lobulated") else (3, 4, 5, 7, 9)
    lobes = tuple((int(m), float(rng.uniform(*amplitude)), float(rng.uniform(0, 2 * np.pi)))
                  for m in orders)
    edge = {"circumscribed": (0.05, 0.15), "lobulated": (0.05, 0.2), "indistinct": (0.8, 2.5),
            "irregular": (0.2, 0.6), "spiculated": (0.2, 0.6)}[margin]
    spicules = (_spicules(rng, radius, int(rng.integers(6, 21))) if margin == "spiculated"
                else ())
    return FindingSpec(kind=kind, along=along, angle=angle, radial=radial, radius_mm=radius,
                       contrast=contrast, axes=axes, rotation=rotation, lobes=lobes,
                       edge_mm=float(rng.uniform(*edge)), spicules=spicules, margin=margin)


@dataclass
class PlacedFinding:
    """A finding inside one view's compressed breast (phantom mm)."""

    spec: FindingSpec
    centre_mm: tuple[float, float, float]  # (x, y, z)
    z_axis_mm: float  # half-extent in depth after compression
    index: int = 0  # finding number within the breast

    @property
    def z_extent_mm(self) -> float:
        if self.spec.kind == CALCIFICATIONS:
            return max(abs(c.offset_mm[2]) + c.radius_mm for c in self.spec.calcifications)
        reach = self.z_axis_mm * (1 + sum(abs(a) for _, a, _ in self.spec.lobes))
        for s in self.spec.spicules:
            reach = max(reach, (s.start_mm + s.length_mm) * abs(s.direction[2]) + s.width_mm)
        return reach


def place_finding(spec: FindingSpec, phantom: ViewPhantom, index: int) -> PlacedFinding:
    """Position of a breast's finding in one view; shrinks towards the breast centre to fit."""
    thickness = phantom.thickness_mm
    if spec.kind == CALCIFICATIONS:
        z_axis = min(spec.radius_mm * 0.5, 0.3 * thickness)
    else:
        z_axis = min(spec.radius_mm * spec.axes[2] * 0.8, 0.3 * thickness)
    angle = spec.angle + (np.pi / 4 if phantom.view == "MLO" else 0.0)
    extent = spec.extent_mm if spec.kind == CALCIFICATIONS else spec.radius_mm * max(spec.axes)
    along, radial = spec.along, spec.radial
    for _ in range(30):
        x = along * phantom.nipple_mm
        top, bottom = phantom.chord(x)
        half = (bottom - top) / 2
        y = (top + bottom) / 2 + radial * max(half - extent - 1.0, 0.0) * math.cos(angle)
        z = thickness / 2 + radial * max(thickness / 2 - z_axis - 1.0, 0.0) * math.sin(angle)
        if _fits(phantom, x, y, extent, z_axis):
            break
        radial *= 0.8
        along = 0.5 + (along - 0.5) * 0.85
    # Rendered scale is in mm: when the breast is too small the finding may touch the skin.
    return PlacedFinding(spec=spec, centre_mm=(float(x), float(y), float(z)),
                         z_axis_mm=float(z_axis), index=index)


def _fits(phantom: ViewPhantom, x: float, y: float, extent: float, z_axis: float) -> bool:
    ny, nx = phantom.outline.shape
    step = phantom.height_mm / ny
    for dx, dy in ((0, 0), (extent, 0), (-extent, 0), (0, extent), (0, -extent)):
        i, j = int((y + dy) / step), int((x + dx) / step)
        if not (0 <= i < ny and 0 <= j < nx) or not phantom.outline[i, j]:
            return False
        if phantom.pectoral is not None and phantom.pectoral[i, j]:
            return False
    i, j = int(y / step), int(x / step)
    return bool(phantom.thickness[i, j] >= 2 * z_axis + 2.0)


# ---------------------------------------------------------------------------------------------
# Rendering on a pixel grid


@dataclass(frozen=True)
class Roi:
    """Pixel window [r0, r1) x [c0, c1) of an output grid with pixel size `pixel_mm`."""

    r0: int
    r1: int
    c0: int
    c1: int
    pixel_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre (y, x) in mm."""
        ys = (np.arange(self.r0, self.r1, dtype=np.float32) + 0.5) * self.pixel_mm
        xs = (np.arange(self.c0, self.c1, dtype=np.float32) + 0.5) * self.pixel_mm
        return ys, xs

    def slices(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)


def roi_around(centre_mm: tuple[float, float], radius_mm: float, pixel_mm: float,
               shape: tuple[int, int]) -> Roi | None:
    x, y = centre_mm
    r0 = max(int(math.floor((y - radius_mm) / pixel_mm)), 0)
    r1 = min(int(math.ceil((y + radius_mm) / pixel_mm)) + 1, shape[0])
    c0 = max(int(math.floor((x - radius_mm) / pixel_mm)), 0)
    c1 = min(int(math.ceil((x + radius_mm) / pixel_mm)) + 1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return None
    return Roi(r0, r1, c0, c1, pixel_mm)


def mass_slab(f: PlacedFinding, roi: Roi, z0: float, z1: float, nsub: int = 3) -> np.ndarray:
    """Fraction of each pixel's column inside the mass, averaged over the slab [z0, z1] mm."""
    spec = f.spec
    cx, cy, cz = f.centre_mm
    ys, xs = roi.coords()
    dy = (ys - cy)[:, None]
    dx = (xs - cx)[None, :]
    cos_r, sin_r = math.cos(spec.rotation), math.sin(spec.rotation)
    u = dx * cos_r + dy * sin_r
    v = -dx * sin_r + dy * cos_r
    ax, ay = spec.radius_mm * spec.axes[0], spec.radius_mm * spec.axes[1]
    az = f.z_axis_mm
    theta = np.arctan2(v / ay, u / ax)
    lobes = np.ones_like(theta)
    for order, amp, phase in spec.lobes:
        lobes += np.float32(amp) * np.cos(order * theta + phase).astype(np.float32)
    planar = (u / ax) ** 2 + (v / ay) ** 2
    scale = min(ax, ay, az)
    edge = max(spec.edge_mm, roi.pixel_mm)
    out = np.zeros(roi.shape, dtype=np.float32)
    for k in range(nsub):
        dz = z0 + (k + 0.5) * (z1 - z0) / nsub - cz
        rho = np.sqrt(planar + (dz / az) ** 2)
        occ = np.clip(0.5 + (lobes - rho) * scale / edge, 0, 1)
        for s in spec.spicules:
            _spicule_into(occ, s, dx, dy, dz, roi.pixel_mm)
        out += occ
    out /= nsub
    return out


def _spicule_into(occ: np.ndarray, s: Spicule, dx: np.ndarray, dy: np.ndarray, dz: float,
                  pixel_mm: float) -> None:
    ux, uy, uz = s.direction
    t_lo, t_hi = s.start_mm, s.start_mm + s.length_mm
    if abs(uz) > 1e-3:  # only the part of the spicule within its width of this plane
        a, b = (dz - s.width_mm) / uz, (dz + s.width_mm) / uz
        t_lo, t_hi = max(t_lo, min(a, b)), min(t_hi, max(a, b))
    elif abs(dz) > s.width_mm:
        return
    if t_hi <= t_lo:
        return
    # Bounding box of that part, in ROI pixels.
    xs = dx[0]
    ys = dy[:, 0]
    bx = sorted((ux * t_lo, ux * t_hi))
    by = sorted((uy * t_lo, uy * t_hi))
    pad = s.width_mm + pixel_mm
    cols = np.flatnonzero((xs >= bx[0] - pad) & (xs <= bx[1] + pad))
    rows = np.flatnonzero((ys >= by[0] - pad) & (ys <= by[1] + pad))
    if cols.size == 0 or rows.size == 0:
        return
    sy = slice(rows[0], rows[-1] + 1)
    sx = slice(cols[0], cols[-1] + 1)
    px, py = dx[:, sx], dy[sy, :]
    t = np.clip(px * ux + py * uy + dz * uz, s.start_mm, s.start_mm + s.length_mm)
    dist = np.sqrt((px - t * ux) ** 2 + (py - t * uy) ** 2 + (dz - t * uz) ** 2)
    half_width = 0.5 * s.width_mm * (1.0 - (t - s.start_mm) / s.length_mm)
    sub = np.clip(0.5 + (half_width - dist) / pixel_mm, 0, 1)
    np.maximum(occ[sy, sx], sub, out=occ[sy, sx])


def calc_slab(f: PlacedFinding, roi: Roi, z0: float | None, z1: float | None) -> np.ndarray:
    """Calcification attenuation integrated through [z0, z1] (None: all depths), in 1/cm * cm.

    Calcifications smaller than a pixel are drawn at 0.6 pixel radius with the same volume
    (partial volume), so a 0.1 mm calcification neither vanishes between pixel centres nor
    saturates.
    """
    cx, cy, cz = f.centre_mm
    ys, xs = roi.coords()
    out = np.zeros(roi.shape, dtype=np.float32)
    for c in f.spec.calcifications:
        px, py, pz = cx + c.offset_mm[0], cy + c.offset_mm[1], cz + c.offset_mm[2]
        r = max(c.radius_mm, 0.6 * roi.pixel_mm)
        gain = (c.radius_mm / r) ** 3
        if z0 is not None and (pz + r < z0 or pz - r > z1):
            continue
        rows = np.flatnonzero(np.abs(ys - py) <= r)
        cols = np.flatnonzero(np.abs(xs - px) <= r)
        if rows.size == 0 or cols.size == 0:
            continue
        sy, sx = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        rho2 = (ys[sy, None] - py) ** 2 + (xs[None, sx] - px) ** 2
        h = np.sqrt(np.clip(r * r - rho2, 0, None))
        if z0 is None:
            chord = 2 * h
        else:
            chord = np.clip(np.minimum(z1, pz + h) - np.maximum(z0, pz - h), 0, None)
        out[sy, sx] += chord * np.float32(0.1 * c.mu_excess * gain)  # mm -> cm
    return out


def cluster_disc(f: PlacedFinding, roi: Roi) -> np.ndarray:
    """Region a reader would outline around a calcification cluster."""
    cx, cy, _ = f.centre_mm
    ys, xs = roi.coords()
    radius = f.spec.radius_mm + 0.5
    return ((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2) <= radius * radius


def mass_mu(f: PlacedFinding) -> float:
    return MU_GLAND + f.spec.contrast


def slice_range(f: PlacedFinding, slices: int) -> range:
    """DBT slices the finding physically occupies."""
    cz = f.centre_mm[2]
    ext = f.z_extent_mm
    lo = max(int(math.floor((cz - ext) / SLICE_MM)), 0)
    hi = min(int(math.floor((cz + ext) / SLICE_MM)) + 1, slices)
    return range(lo, hi)
