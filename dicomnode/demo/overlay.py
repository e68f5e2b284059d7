"""PNG overlays of one image's results for a person to look at: the input, the patch map
(the attended regions) and the benign and malignant saliency maps over the image.

matplotlib with the Agg backend (no display needed). The layout is exact: every panel shows
the image at one fixed scale at a known place in the PNG (:func:`overlay_layout`), so a
check can compare an overlay panel with the input panel pixel for pixel. Saliency is blended
with an opacity that grows with its value (absolute scale 0-1, the Parametric Map's), so
where the model sees nothing the overlay shows the plain input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PANELS = ("input", "patches", "benign", "malignant")
PANEL_HEIGHT = 440  # PNG pixels of the image in each panel
MARGIN = 12
TITLE_BAND = 64  # figure title (two lines)
PANEL_TITLE_BAND = 40  # panel titles (two lines)
FOOTER_BAND = 66  # colour bar, patch legend
DPI = 100
MAX_ALPHA = 0.75
SALIENCY_CMAP = "jet"


@dataclass(frozen=True)
class Panel:
    x0: int  # PNG pixels, origin top-left
    y0: int
    width: int
    height: int
    scale: float  # PNG pixels per image pixel


@dataclass(frozen=True)
class OverlayLayout:
    width: int
    height: int
    panels: dict[str, Panel]

    def to_png(self, panel: str, row: float, col: float) -> tuple[int, int]:
        """PNG (y, x) of the centre of image pixel (row, col) in a panel."""
        p = self.panels[panel]
        return (int(p.y0 + (row + 0.5) * p.scale), int(p.x0 + (col + 0.5) * p.scale))


def overlay_layout(rows: int, cols: int) -> OverlayLayout:
    """Where each panel lies in the PNG of an image of rows x cols pixels."""
    scale = PANEL_HEIGHT / rows
    width = max(1, round(cols * scale))
    height = PANEL_HEIGHT
    y0 = TITLE_BAND + PANEL_TITLE_BAND
    panels = {name: Panel(MARGIN + i * (width + MARGIN), y0, width, height, scale)
              for i, name in enumerate(PANELS)}
    total_w = MARGIN + len(PANELS) * (width + MARGIN)
    total_h = y0 + height + FOOTER_BAND
    return OverlayLayout(total_w, total_h, panels)


@dataclass(frozen=True)
class Box:
    """A patch: image pixels [row0, row1) x [col0, col1); `tag` is drawn in its corner,
    `label` in the legend under the panel."""

    row0: float
    col0: float
    row1: float
    col1: float
    tag: str
    label: str
    on_shown_slice: bool = True


@dataclass(frozen=True)
class Marker:
    """A ground-truth finding: centre and radius in image pixels."""

    row: float
    col: float
    radius: float
    label: str
    malignant: bool


@dataclass
class OverlayImage:
    """Everything one PNG shows; arrays are 2D on the image's pixel grid (saliency may be on
    a coarser grid of the same extent)."""

    title: str
    subtitle: str
    image: np.ndarray  # the input slice
    input_title: str
    boxes: list[Box]
    patches_title: str
    benign_image: np.ndarray  # the slice under the benign saliency
    benign: np.ndarray
    benign_title: str
    malignant: np.ndarray  # over `image`
    malignant_title: str
    benign_outline: np.ndarray | None = None  # SEG, bool
    malignant_outline: np.ndarray | None = None
    truth: list[Marker] = field(default_factory=list)


def _otsu(values: np.ndarray) -> float:
    """The threshold between background and breast (Otsu, 256 bins)."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean * total) ** 2 / (weight * (total - weight))
    return float(centres[int(np.nanargmax(between[:-1]))]) if total else float(values.min())


def display_range(image: np.ndarray) -> tuple[float, float]:
    """Grey window of a mammogram: the breast's tissue (above the Otsu threshold), from its
    darkest to its brightest pixels (robust percentiles)."""
    values = image.astype(np.float32).ravel()
    if values.size == 0 or values.min() == values.max():
        return 0.0, 1.0
    breast = values[values > _otsu(values)]
    if breast.size < 16:
        breast = values
    lo, hi = np.percentile(breast, [0.5, 99.8])
    return float(lo), float(max(hi, lo + 1e-6))


def grey(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """(rows, cols, 3) float RGB in [0, 1]."""
    lo, hi = window or display_range(image)
    g = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1)
    return np.repeat(g[..., np.newaxis], 3, axis=2)


def _resize_nearest(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape == shape:
        return array
    rows = np.minimum((np.arange(shape[0]) * array.shape[0] / shape[0]).astype(int),
                      array.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) * array.shape[1] / shape[1]).astype(int),
                      array.shape[1] - 1)
    return array[rows][:, cols]


def blend(rgb: np.ndarray, saliency: np.ndarray, cmap: str = SALIENCY_CMAP) -> np.ndarray:
    """The image with the saliency (0-1) over it: opacity MAX_ALPHA * saliency."""
    import matplotlib

    values = np.clip(_resize_nearest(saliency.astype(np.float32), rgb.shape[:2]), 0, 1)
    colours = matplotlib.colormaps[cmap](values)[..., :3]
    alpha = (MAX_ALPHA * values)[..., np.newaxis]
    return np.clip(rgb * (1 - alpha) + colours * alpha, 0, 1)


def render_overlay(path: Path, data: OverlayImage) -> OverlayLayout:
    """Write the PNG; returns its layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    rows, cols = data.image.shape
    layout = overlay_layout(rows, cols)
    fig = plt.figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI)
    window = display_range(data.image)
    shown = {
        "input": grey(data.image, window),
        "patches": grey(data.image, window),
        "benign": blend(grey(data.benign_image, window), data.benign),
        "malignant": blend(grey(data.image, window), data.malignant),
    }
    titles = {"input": data.input_title, "patches": data.patches_title,
              "benign": data.benign_title, "malignant": data.malignant_title}
    axes = {}
    for name, panel in layout.panels.items():
        ax = fig.add_axes((panel.x0 / layout.width,
                           1 - (panel.y0 + panel.height) / layout.height,
                           panel.width / layout.width, panel.height / layout.height))
        ax.imshow(shown[name], extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
                  interpolation="bilinear", aspect="auto")
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.set_axis_off()
        fig.text((panel.x0 + panel.width / 2) / layout.width,
                 1 - (panel.y0 - 4) / layout.height, titles[name], ha="center", va="bottom",
                 fontsize=9, linespacing=1.25)
        axes[name] = ax

    ax = axes["patches"]
    colours = plt.cm.autumn(np.linspace(0, 0.85, max(len(data.boxes), 1)))
    tag_width = 24 / layout.panels["patches"].scale  # image pixels
    # the most attended drawn last (on top); tags of boxes at one place side by side
    for n in reversed(range(len(data.boxes))):
        box, colour = data.boxes[n], colours[n]
        before = sum(1 for b in data.boxes[:n] if (b.row0, b.col0) == (box.row0, box.col0))
        ax.add_patch(Rectangle((box.col0 - 0.5, box.row0 - 0.5), box.col1 - box.col0,
                               box.row1 - box.row0, fill=False, linewidth=2.0,
                               edgecolor=colour, linestyle="-" if box.on_shown_slice else "--"))
        ax.text(box.col0 + 2 + before * tag_width, box.row0 + 2, box.tag, color="black",
                fontsize=7.5, va="top", ha="left",
                bbox={"facecolor": colour, "alpha": 0.85, "pad": 1.2, "linewidth": 0})
    _legend(fig, layout, [(box.label, colour) for box, colour in
                          zip(data.boxes, colours, strict=False)])
    for name in ("input", "patches"):
        for n, marker in enumerate(data.truth):
            colour = "#ff3030" if marker.malignant else "#30c0ff"
            axes[name].add_patch(Circle((marker.col, marker.row), marker.radius, fill=False,
                                        linestyle=":", linewidth=1.6, edgecolor=colour))
            if name == "input":  # labels alternate below and above their circles
                below = n % 2 == 0
                axes[name].text(marker.col, marker.row + (1 if below else -1) * (
                    marker.radius + 4), marker.label, color=colour, fontsize=8,
                    ha="center", va="top" if below else "bottom", weight="bold",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.2, "linewidth": 0})
    for name, outline in (("benign", data.benign_outline),
                          ("malignant", data.malignant_outline)):
        if outline is not None and outline.any() and not outline.all():
            axes[name].contour(outline.astype(np.float32), levels=[0.5], colors="white",
                               linewidths=1.2)

    fig.text(0.5, 1 - 8 / layout.height, data.title, ha="center", va="top", fontsize=11.5,
             weight="bold")
    fig.text(0.5, 1 - 32 / layout.height, data.subtitle, ha="center", va="top", fontsize=9)
    _colour_bar(fig, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return layout


def _legend(fig, layout: OverlayLayout, entries: list[tuple[str, object]]) -> None:
    """The patches' labels under the patch map, in their colours: one per line, or two per
    line (at most eight) when there are more than four."""
    panel = layout.panels["patches"]
    columns = 1 if len(entries) <= 4 else 2
    for n, (text, colour) in enumerate(entries[:4 * columns]):
        x = panel.x0 + (n % columns) * panel.width / columns
        y = panel.y0 + panel.height + 5 + (n // columns) * 14
        fig.text(x / layout.width, 1 - y / layout.height, "\u25a0 " + text, color="black",
                 fontsize=8 if columns == 1 else 7, va="top", ha="left")
        fig.text(x / layout.width, 1 - y / layout.height, "\u25a0", color=colour,
                 fontsize=8 if columns == 1 else 7, va="top", ha="left")


def _colour_bar(fig, layout: OverlayLayout) -> None:
    benign, malignant = layout.panels["benign"], layout.panels["malignant"]
    x0 = benign.x0 + benign.width // 4
    x1 = malignant.x0 + malignant.width * 3 // 4
    y = benign.y0 + benign.height + 10
    ax = fig.add_axes((x0 / layout.width, 1 - (y + 10) / layout.height,
                       (x1 - x0) / layout.width, 10 / layout.height))
    ramp = np.linspace(0, 1, 256)[np.newaxis]
    rgb = blend(np.full((1, 256, 3), 0.5), ramp)
    ax.imshow(rgb, aspect="auto", extent=(0, 1, 0, 1))
    ax.set_yticks([])
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(labelsize=7, length=2, pad=1)
    ax.set_xlabel("saliency (Parametric Map value; over mid-grey)", fontsize=7.5, labelpad=1)
