"""The evaluation report: tables like paper Tables II/III (markdown + JSON), ROC curves and
per-image montages like paper Fig. 6. matplotlib (Agg) is imported only here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.training.evaluation import ImageScore
from gmic.classes import CLASS_NAMES


def _cell(value: dict[str, Any] | None) -> str:
    if not value:
        return "n/a"
    return f"{value['auc']:.3f} ({value['ci_low']:.3f}-{value['ci_high']:.3f})"


def _loc_cell(value: dict[str, Any] | None, key: str) -> str:
    if not value:
        return "n/a"
    if key == "mean":
        return f"{value['mean']:.3f} ± {value['std']:.3f}"
    return f"{value['ensemble']:.3f}"


def markdown(aucs: dict[str, Any], localisation: list[dict[str, Any]], meta: dict[str, Any]
             ) -> str:
    lines = ["# dicomnode evaluation", ""]
    lines += [f"- labels: `{meta['labels']}`", f"- images from: {meta['source']}",
              f"- subset: {meta['subset']}",
              f"- checkpoints: {', '.join('`' + c + '`' for c in meta['checkpoints'])}",
              "- scores: as the node's worker computes them, "
              + (f"mean over {meta['tta']} shifted/resized copies (up to "
                 f"{meta['augment_px']} px) per image" if meta.get("tta")
                 else "one plain pass per image")
              + (f"; input window: {meta['window']}" if meta.get("window") else ""),
              f"- 95% CIs: percentile bootstrap, {meta['resamples']} resamples", ""]
    lines += ["## Breast-wise AUC (paper Table II)", "",
              "| Modality | Malignant | Benign | Breasts |", "|---|---|---|---|"]
    for row in aucs["breast"]:
        lines.append(f"| {row['name']} | {_cell(row['malignant'])} | {_cell(row['benign'])} | "
                     f"{row['breasts']} |")
    lines += ["", "## Image-wise AUC", "", "| Modality | Malignant | Benign | Images |",
              "|---|---|---|---|"]
    for row in aucs["image"]:
        lines.append(f"| {row['name']} | {_cell(row['malignant'])} | {_cell(row['benign'])} | "
                     f"{row['images']} |")
    lines += ["", "## Localisation (paper Table III)", "",
              "Mean ± std over checkpoints of the mean over images with a visible finding; "
              "ensemble = mean saliency of the checkpoints. DBT: saliency and masks "
              f"max-projected over slices. DSC threshold {meta['threshold']}.", "",
              "| | DSC(M) | DSC(B) | PxAP(M) | PxAP(B) |", "|---|---|---|---|---|"]
    metrics = ("dsc_malignant", "dsc_benign", "pxap_malignant", "pxap_benign")
    for row in localisation:
        lines.append(f"| {row['name']} | " + " | ".join(_loc_cell(row[m], "mean")
                                                         for m in metrics) + " |")
    for row in localisation:
        lines.append(f"| {row['name']} ensemble | " + " | ".join(_loc_cell(row[m], "ensemble")
                                                                  for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, aucs: dict[str, Any], localisation: list[dict[str, Any]],
                 meta: dict[str, Any], images: list[dict[str, Any]]) -> None:
    (out / "report.md").write_text(markdown(aucs, localisation, meta))
    payload = {"meta": meta, "breast": aucs["breast"], "image": aucs["image"],
               "localisation": localisation, "images": images}
    (out / "report.json").write_text(json.dumps(payload, indent=1))


def roc_figures(out: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
                ) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmic.metrics import MetricError, roc_auc, roc_curve

    written = []
    for level, rows in curves.items():
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
        for c, cls in enumerate(CLASS_NAMES):
            ax = axes[c]
            for name, (labels, preds) in rows.items():
                try:
                    auc = roc_auc(labels[:, c], preds[:, c])
                except MetricError:
                    continue
                fpr, tpr, _ = roc_curve(labels[:, c], preds[:, c])
                ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})")
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{level}-wise, {cls}")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out / f"roc_{level}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def pick_cases(scores: Sequence[ImageScore], count: int) -> list[tuple[str, ImageScore]]:
    """The `count` highest malignant scores, and the `count` malignant images scored lowest
    (missed)."""
    ranked = sorted(scores, key=lambda s: -float(s.y[1]))
    top = [("top", s) for s in ranked[:count]]
    positives = [s for s in ranked if s.example.malignant]
    missed = [("missed", s) for s in positives[::-1][:count]]
    return top + missed


def montage(path: Path, score: ImageScore, model, title: str) -> None:
    """Input, patch map, benign and malignant saliency, top patches with attention (Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from dicomnode.pipeline.images import read_pixels
    from dicomnode.pipeline.inference import run_model

    plain = run_model(model, read_pixels(score.example.header))  # what the node draws from
    out, volume = plain.output, plain.model_input
    shown = volume.max(axis=0)
    saliency = out.saliency.float().cpu().numpy().max(axis=0)  # (2, h, w)
    positions = out.crop_positions.cpu().numpy()
    attention = out.attention.float().cpu().numpy()
    ch, cw = model.cfg.crop_size
    h, w = shown.shape
    k = len(positions)
    order = np.argsort(-attention)
    fig = plt.figure(figsize=(4 * 4 + 1.6 * min(k, 6), 5.5))
    grid = fig.add_gridspec(2, 4 + min(k, 6) // 2 + min(k, 6) % 2)
    panels = [fig.add_subplot(grid[:, i]) for i in range(4)]
    panels[0].imshow(shown, cmap="gray")
    panels[0].set_title("input" + (" (max projection)" if volume.shape[0] > 1 else ""))
    panels[1].imshow(shown, cmap="gray")
    for rank, i in enumerate(order):
        s, r, c = positions[i]
        panels[1].add_patch(Rectangle((c, r), cw, ch, fill=False, linewidth=1.5,
                                      edgecolor=plt.cm.autumn(rank / max(k - 1, 1))))
        panels[1].text(c, r, f"{rank + 1}", color="yellow", fontsize=7, va="bottom")
    panels[1].set_title("patch map")
    for j, cls in enumerate(CLASS_NAMES):
        ax = panels[2 + j]
        ax.imshow(shown, cmap="gray")
        ax.imshow(saliency[j], cmap="jet", alpha=0.45, vmin=0, vmax=1, extent=(0, w, h, 0))
        ax.set_title(f"{cls} saliency")
    for rank, i in enumerate(order[:6]):
        s, r, c = positions[i]
        ax = fig.add_subplot(grid[rank % 2, 4 + rank // 2])
        ax.imshow(volume[s, r:r + ch, c:c + cw], cmap="gray")
        ax.set_title(f"a={attention[i]:.2f} slice {s}", fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    y = score.y
    fig.suptitle(f"{title}: malignant {y[1]:.3f} (label {score.example.malignant}), benign "
                 f"{y[0]:.3f} (label {score.example.benign})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
