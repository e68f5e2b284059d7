"""`dicomnode evaluate`'s computation: predictions of one or more checkpoints per modality on
labelled images, image-wise and breast-wise AUC with bootstrap CIs (paper VI-B), modality
ensembles (Table II), and DSC / PxAP of the saliency maps against ground-truth SEG masks,
max-projected on DBT (VI-C, Table III)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicomnode.errors import DicomnodeError
from dicomnode.ops.logs import kv
from dicomnode.pipeline.images import read_pixels
from dicomnode.training.data import Example
from gmic.classes import CLASS_NAMES, MALIGNANT

if TYPE_CHECKING:
    from dicomnode.pipeline.analysis import AlgorithmIdentity
    from dicomnode.pipeline.weights import LoadedModel

log = logging.getLogger("dicomnode.evaluate")

MODALITY_NAMES = {"ffdm": "FFDM", "s2d": "Synthetic 2D", "dbt": "DBT"}
MODALITY_ORDER = ("ffdm", "s2d", "dbt")


@dataclass
class LoadedCheckpoint:
    path: Path
    model: Any  # gmic.model.GMIC
    modality: str
    identity: AlgorithmIdentity  # as the node would name it; one plain pass

    def as_node_runs_it(self, tta: int, augment_px: int, whole_breast: bool = True
                        ) -> LoadedModel:
        """The model as the worker holds it with [model] test_time_augmentations = tta and
        [model] whole_breast."""
        from dicomnode.pipeline.weights import LoadedModel

        identity = dataclasses.replace(self.identity, test_time_augmentations=max(tta, 0),
                                       augment_px=augment_px if tta > 0 else 0,
                                       whole_breast=whole_breast)
        return LoadedModel(self.model, identity, next(self.model.parameters()).device)


@dataclass
class ImageScore:
    """Predictions for one image: per checkpoint and their mean (the ensemble)."""

    example: Example
    per_checkpoint: list[np.ndarray]  # (2,) each: benign, malignant
    # "dsc_malignant" etc. -> one value per checkpoint
    localisation: dict[str, list[float]] = field(default_factory=dict)
    ensemble_localisation: dict[str, float] = field(default_factory=dict)
    # The malignant saliency a reader would see marked (the checkpoints' mean map,
    # max-projected, on the source grid): its peak ("peak") and its peak under each class's
    # ground-truth finding ("benign", "malignant"), where the SEG has one.
    malignant_saliency: dict[str, float] = field(default_factory=dict)

    @property
    def y(self) -> np.ndarray:
        return np.mean(self.per_checkpoint, axis=0)


def load_checkpoints(paths: Sequence[str | Path], device) -> list[LoadedCheckpoint]:
    from dicomnode.pipeline.weights import algorithm_identity
    from dicomnode.training.runner import CheckpointUnusable
    from gmic.checkpoint import CheckpointError, load_checkpoint

    out = []
    for p in paths:
        try:
            model, meta = load_checkpoint(p, map_location=device)
        except CheckpointError as exc:
            raise CheckpointUnusable(f"--checkpoint: {exc}") from None
        modality = model.cfg.modality
        out.append(LoadedCheckpoint(Path(p), model.eval(), modality,
                                    algorithm_identity(modality, Path(p), meta)))
    return out


def _project_saliency(saliency: np.ndarray, transform) -> np.ndarray:
    """(D, 2, h, w) model-space saliency -> (2, H, W) on the source grid, max over slices
    first (paper VI-C: max-projection in depth)."""
    projected = saliency.max(axis=0)  # (2, h, w)
    flat = dataclasses.replace(transform, source_shape=(1, *transform.source_shape[1:]))
    return np.stack([flat.map_to_source(projected[c][None])[0] for c in range(2)])


def _localisation(saliency_src: np.ndarray, masks: dict[str, np.ndarray] | None,
                  threshold: float) -> dict[str, float]:
    from gmic.metrics import dice, pixel_average_precision

    out: dict[str, float] = {}
    if masks is None:
        return out
    for c, name in enumerate(CLASS_NAMES):
        mask = masks.get(name)
        if mask is None or not mask.any() or mask.shape != saliency_src.shape[1:]:
            continue
        out[f"dsc_{name}"] = dice(saliency_src[c], mask, threshold)
        out[f"pxap_{name}"] = pixel_average_precision(saliency_src[c], mask)
    return out


def malignant_saliency_peaks(malignant: np.ndarray, masks: dict[str, np.ndarray] | None
                             ) -> dict[str, float]:
    """The malignant map's peak, and its peak under each class's ground-truth finding."""
    out = {"peak": float(malignant.max())}
    for name in CLASS_NAMES:
        mask = (masks or {}).get(name)
        if mask is not None and mask.shape == malignant.shape and mask.any():
            out[name] = float(malignant[mask].max())
    return out


def score_images(examples: Sequence[Example], checkpoints: Sequence[LoadedCheckpoint],
                 masks: dict[str, dict[str, np.ndarray]], *, tta: int = 0,
                 augment_px: int = 100, threshold: float = 0.5, seed: int = 0,
                 progress: bool = False, whole_breast: bool = True
                 ) -> dict[str, list[ImageScore]]:
    """Run every checkpoint on every image of its modality as the node's worker does
    (dicomnode.pipeline.inference.analyse_image, with tta test-time copies drawn from seed: the
    worker's [model] test_time_augmentations and augment_px); localisation where a mask
    exists."""
    from dicomnode.pipeline.inference import analyse_image

    by_modality: dict[str, list[LoadedModel]] = defaultdict(list)
    for c in checkpoints:
        by_modality[c.modality].append(c.as_node_runs_it(tta, augment_px, whole_breast))
    results: dict[str, list[ImageScore]] = defaultdict(list)
    todo = [e for e in examples if e.header.modality in by_modality]
    for n, example in enumerate(todo, start=1):
        image = read_pixels(example.header)
        mask = next((masks[u] for u in example.header.sop_instance_uids if u in masks), None)
        score = ImageScore(example, [])
        projected = []
        for loaded in by_modality[example.header.modality]:
            analysis = analyse_image(image, loaded, seed=seed)
            score.per_checkpoint.append(np.array([analysis.final.benign,
                                                  analysis.final.malignant]))
            src = _project_saliency(analysis.saliency, analysis.transform)
            projected.append(src)
            for key, value in _localisation(src, mask, threshold).items():
                score.localisation.setdefault(key, []).append(value)
        mean = np.mean(projected, axis=0)
        score.ensemble_localisation = _localisation(mean, mask, threshold)
        score.malignant_saliency = malignant_saliency_peaks(mean[MALIGNANT], mask)
        results[example.header.modality].append(score)
        if progress:
            log.info("event=evaluate_image %s", kv(n=n, of=len(todo), uid=example.uid,
                                                     modality=example.header.modality))
    return dict(results)


# ------------------------------------------------------------------------------ AUC tables


def _auc_cell(labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int
              ) -> dict[str, Any] | None:
    from gmic.metrics import MetricError, bootstrap_auc

    try:
        return bootstrap_auc(labels, scores, resamples=resamples, seed=seed).to_dict()
    except MetricError:
        return None


def breast_predictions(scores: Sequence[ImageScore]) -> dict[tuple[str, str], tuple[np.ndarray,
                                                                                      np.ndarray]]:
    """Per breast (study, laterality): (labels (2,), mean prediction over its views)."""
    groups: dict[tuple[str, str], list[ImageScore]] = defaultdict(list)
    for s in scores:
        groups[s.example.breast_key].append(s)
    return {key: (np.max([s.example.labels for s in items], axis=0),
                  np.mean([s.y for s in items], axis=0))
            for key, items in groups.items()}


def auc_tables(results: dict[str, list[ImageScore]], *, resamples: int = 1000, seed: int = 0
               ) -> dict[str, Any]:
    """Image-wise rows per modality; breast-wise rows per modality and per ensemble of
    modalities (mean of the modalities' breast predictions, on breasts seen by all)."""
    modalities = [m for m in MODALITY_ORDER if m in results]
    image_rows, breast_rows = [], []
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"image": {}, "breast": {}}
    for m in modalities:
        labels = np.stack([s.example.labels for s in results[m]])
        preds = np.stack([s.y for s in results[m]])
        row = {"name": MODALITY_NAMES[m], "modalities": [m], "images": len(labels)}
        for c, name in enumerate(CLASS_NAMES):
            row[name] = _auc_cell(labels[:, c], preds[:, c], resamples, seed)
        image_rows.append(row)
        curves["image"][MODALITY_NAMES[m]] = (labels, preds)
    breasts = {m: breast_predictions(results[m]) for m in modalities}
    combos = [c for r in range(1, len(modalities) + 1)
              for c in itertools.combinations(modalities, r)]
    for combo in combos:
        keys = sorted(set.intersection(*(set(breasts[m]) for m in combo)))
        if not keys:
            continue
        labels = np.stack([breasts[combo[0]][k][0] for k in keys])
        preds = np.stack([np.mean([breasts[m][k][1] for m in combo], axis=0) for k in keys])
        if len(combo) == len(modalities) and len(combo) == 3:
            name = "All 3 modalities"
        else:
            name = " + ".join(MODALITY_NAMES[m] for m in combo)
        row = {"name": name, "modalities": list(combo), "breasts": len(keys)}
        for c, cls in enumerate(CLASS_NAMES):
            row[cls] = _auc_cell(labels[:, c], preds[:, c], resamples, seed)
        breast_rows.append(row)
        curves["breast"][name] = (labels, preds)
    return {"image": image_rows, "breast": breast_rows, "curves": curves}


def localisation_table(results: dict[str, list[ImageScore]]) -> list[dict[str, Any]]:
    """Per modality: mean over images with a visible finding of each class, per checkpoint;
    then mean and std over checkpoints, and the ensemble's value (paper Table III)."""
    rows = []
    for m in [m for m in MODALITY_ORDER if m in results]:
        name = MODALITY_NAMES[m] + (" max-projected" if m == "dbt" else "")
        row: dict[str, Any] = {"name": name, "modality": m}
        for metric in ("dsc_malignant", "dsc_benign", "pxap_malignant", "pxap_benign"):
            per_image = [s.localisation[metric] for s in results[m] if metric in s.localisation]
            ensemble = [s.ensemble_localisation[metric] for s in results[m]
                        if metric in s.ensemble_localisation]
            if not per_image:
                row[metric] = None
                continue
            per_ckpt = np.mean(np.asarray(per_image), axis=0)  # (checkpoints,)
            row[metric] = {"mean": float(per_ckpt.mean()), "std": float(per_ckpt.std()),
                           "ensemble": float(np.mean(ensemble)), "images": len(per_image),
                           "checkpoints": int(per_ckpt.size)}
        rows.append(row)
    return rows


def marks_table(results: dict[str, list[ImageScore]], thresholds: Sequence[float]
                ) -> list[dict[str, Any]]:
    """What a reader sees marked, per modality: at each operating point (a threshold on the
    malignant saliency, as the SEG and the CAD SR draw it), the share of images without any
    finding marked anywhere, of benign findings (in images without a malignant one) under a
    malignant mark, and of malignant findings under one; and the AUC of a malignant
    finding's peak malignant saliency against a benign finding's (0.5: the malignant map
    marks masses, not malignancy)."""
    from gmic.metrics import roc_auc

    rows = []
    for modality in MODALITY_ORDER:
        scores = [s for s in results.get(modality, []) if s.malignant_saliency]
        if not scores:
            continue
        peaks = {
            "normal": [s.malignant_saliency["peak"] for s in scores
                       if not s.example.malignant and not s.example.benign],
            "benign": [s.malignant_saliency["benign"] for s in scores
                       if not s.example.malignant and "benign" in s.malignant_saliency],
            "malignant": [s.malignant_saliency["malignant"] for s in scores
                          if "malignant" in s.malignant_saliency]}
        points = [{"threshold": float(t),
                   **{k: (sum(v >= t for v in values), len(values))
                      for k, values in peaks.items()}}
                  for t in sorted(set(thresholds), reverse=True)]
        separation = None
        if peaks["malignant"] and peaks["benign"]:
            separation = roc_auc([1] * len(peaks["malignant"]) + [0] * len(peaks["benign"]),
                                 peaks["malignant"] + peaks["benign"])
        rows.append({"modality": modality, "name": MODALITY_NAMES[modality],
                     "points": points, "malignant_over_benign": separation})
    return rows


def marks_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(marked_total: tuple[int, int]) -> str:
        marked, total = marked_total
        return "n/a" if not total else f"{100 * marked / total:.1f}% ({marked} of {total})"

    lines = ["", "## Malignant marks at the operating points", "",
             "What a reader sees marked: malignant saliency (max over slices, mean of the "
             "checkpoints) at or above each threshold, as the SEG and the CAD SR draw it. "
             "Normal: images without any finding, marked anywhere. Benign / malignant: the "
             "images' ground-truth findings of that class (benign: in images without a "
             "malignant one) with a mark on them. Last column: AUC of a malignant finding's "
             "peak malignant saliency against a benign finding's (0.5: the map marks masses, "
             "not malignancy).", "",
             "| model | operating point | normal images marked | benign findings marked "
             "malignant | malignant findings marked | malignant over benign |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        separation = row["malignant_over_benign"]
        for n, point in enumerate(row["points"]):
            last = ("n/a" if separation is None else f"{separation:.3f}") if n == 0 else ""
            lines.append(f"| {row['name']} | {point['threshold']:g} | {cell(point['normal'])} "
                         f"| {cell(point['benign'])} | {cell(point['malignant'])} | {last} |")
    return "\n".join(lines) + "\n"


def require_examples(examples: Sequence[Example], checkpoints: Sequence[LoadedCheckpoint],
                     labels_path: Path) -> None:
    have = {e.header.modality for e in examples}
    missing = sorted({c.modality for c in checkpoints} - have)
    if missing:
        raise DicomnodeError(f"{labels_path}: no labelled {', '.join(missing)} images to "
                             "evaluate the checkpoints of that modality on")


# ------------------------------------------------------------------ findings hidden in 2D


def conspicuity(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Contrast-to-noise of a finding in a 2D image: (mean inside the mask - mean of a ring
    around it) / standard deviation of the ring. Overlapping dense tissue in a projection
    raises the ring's mean and spread, so a hidden finding scores low."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    radius = max(2, int(round(np.sqrt(mask.sum() / np.pi))))
    ring = ndimage.binary_dilation(mask, iterations=radius) & ~mask
    if ring.sum() < 8:
        return None
    inside = image[mask].astype(np.float64)
    around = image[ring].astype(np.float64)
    return float((inside.mean() - around.mean()) / max(around.std(), 1e-9))


def hidden_findings_table(results: dict[str, list[ImageScore]],
                          masks: dict[str, dict[str, np.ndarray]], *, resamples: int = 1000,
                          seed: int = 0) -> dict[str, Any] | None:
    """Breast-wise malignant AUC of each modality on malignant breasts split by how visible
    their finding is in the synthetic 2D projection (conspicuity, the better of the breast's
    s2d views; halves at the median), each half against all breasts without a malignant
    finding. Shows whether DBT keeps finding what overlapping tissue hides in the 2D image.
    None without s2d images and their malignant masks."""
    if "s2d" not in results:
        return None
    visibility: dict[tuple[str, str], float] = {}
    for score in results["s2d"]:
        example = score.example
        mask = next((masks[u]["malignant"] for u in example.header.sop_instance_uids
                     if u in masks), None)
        if not example.malignant or mask is None or not mask.any():
            continue
        pixels = np.asarray(read_pixels(example.header).pixels, dtype=np.float32)
        image = pixels[0] if pixels.ndim == 3 else pixels
        if image.shape != mask.shape:
            continue
        value = conspicuity(image, mask)
        if value is not None:
            key = example.breast_key
            visibility[key] = max(visibility.get(key, -np.inf), value)
    if len(visibility) < 4:
        return None
    median = float(np.median(list(visibility.values())))
    groups = {"hidden in 2D (conspicuity below the median)":
              {k for k, v in visibility.items() if v < median},
              "visible in 2D (at or above the median)":
              {k for k, v in visibility.items() if v >= median}}
    rows = []
    for m in [m for m in MODALITY_ORDER if m in results]:
        breasts = breast_predictions(results[m])
        negatives = [k for k, (labels, _) in breasts.items() if not labels[1]]
        row: dict[str, Any] = {"name": MODALITY_NAMES[m], "modality": m}
        for group, keys in groups.items():
            chosen = [k for k in keys if k in breasts] + negatives
            labels = np.array([breasts[k][0][1] for k in chosen])
            preds = np.array([breasts[k][1][1] for k in chosen])
            row[group] = _auc_cell(labels, preds, resamples, seed)
        rows.append(row)
    return {"median_conspicuity": median, "malignant_breasts": len(visibility),
            "groups": list(groups), "rows": rows}


def hidden_findings_markdown(table: dict[str, Any]) -> str:
    lines = ["", "## Malignant findings hidden by overlapping tissue in the 2D projection", "",
             f"Breast-wise malignant AUC; {table['malignant_breasts']} malignant breasts split "
             f"at the median contrast-to-noise of their finding in the synthetic 2D image "
             f"({table['median_conspicuity']:.2f}); each half against every breast without a "
             "malignant finding.", "",
             "| model | " + " | ".join(table["groups"]) + " |",
             "|---|" + "---:|" * len(table["groups"])]
    for row in table["rows"]:
        cells = []
        for group in table["groups"]:
            cell = row[group]
            cells.append("n/a" if cell is None else
                         f"{cell['auc']:.3f} ({cell['ci_low']:.3f}-{cell['ci_high']:.3f})")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ AUC by group (transfer)

# What `evaluate --group-by` can split by: attributes of the breast (its study's texture
# family, vendor style, density; labels.csv columns of those names) or of its findings
# (labels.csv lesion_kinds, lesion_margins, lesion_sizes_mm: ';'-separated, one per finding,
# as `dicomnode synth` writes them).
BREAST_GROUPINGS = ("family", "vendor", "density")
FINDING_GROUPINGS = ("lesion_kind", "margin", "size")
GROUPINGS = BREAST_GROUPINGS + FINDING_GROUPINGS
SIZE_BINS_MM = (5.0, 10.0, 20.0)  # "<5 mm", "5-10 mm", "10-20 mm", ">=20 mm"


def size_bin(diameter_mm: float) -> str:
    edges = SIZE_BINS_MM
    if diameter_mm < edges[0]:
        return f"<{edges[0]:g} mm"
    for lo, hi in itertools.pairwise(edges):
        if diameter_mm < hi:
            return f"{lo:g}-{hi:g} mm"
    return f">={edges[-1]:g} mm"


@dataclass(frozen=True)
class FindingAttributes:
    kind: str
    margin: str
    size_mm: float | None

    @property
    def class_index(self) -> int:
        """The class the finding counts for: benign for a kind that says so, else malignant."""
        return 0 if "benign" in self.kind.lower() else 1


@dataclass
class BreastAttributes:
    values: dict[str, str] = field(default_factory=dict)  # family, vendor, density
    findings: list[FindingAttributes] = field(default_factory=list)


def read_attributes(labels_path: Path) -> dict[str, dict[str, Any]]:
    """Per SOP Instance UID: the labels file's grouping columns (family, vendor, density) and
    its findings (lesion_kinds, lesion_margins, lesion_sizes_mm). Rows without the columns
    give empty values."""
    import csv

    out: dict[str, dict[str, Any]] = {}
    with Path(labels_path).open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            uid = (row.get("sop_instance_uid") or "").strip()
            if not uid:
                continue
            kinds = [k for k in (row.get("lesion_kinds") or "").split(";") if k]
            margins = (row.get("lesion_margins") or "").split(";")
            sizes = (row.get("lesion_sizes_mm") or "").split(";")
            findings = []
            for n, kind in enumerate(kinds):
                size = sizes[n] if n < len(sizes) else ""
                findings.append(FindingAttributes(
                    kind=kind, margin=margins[n] if n < len(margins) else "",
                    size_mm=float(size) if size else None))
            out[uid] = {"values": {k: (row.get(k) or "").strip() for k in BREAST_GROUPINGS},
                        "findings": findings}
    return out


def breast_attributes(scores: Sequence[ImageScore], attributes: dict[str, dict[str, Any]]
                      ) -> dict[tuple[str, str], BreastAttributes]:
    """A breast's attributes: the first non-empty value over its images, and the findings of
    the image that lists the most (every view of a breast shows the same findings)."""
    out: dict[tuple[str, str], BreastAttributes] = defaultdict(BreastAttributes)
    for s in scores:
        found = next((attributes[u] for u in s.example.header.sop_instance_uids
                      if u in attributes), None)
        if found is None:
            continue
        breast = out[s.example.breast_key]
        for key, value in found["values"].items():
            if value and not breast.values.get(key):
                breast.values[key] = value
        if len(found["findings"]) > len(breast.findings):
            breast.findings = list(found["findings"])
    return dict(out)


def _finding_group(finding: FindingAttributes, grouping: str) -> str | None:
    if grouping == "lesion_kind":
        return finding.kind or None
    if grouping == "margin":
        return f"{finding.kind}: {finding.margin}" if finding.margin else None
    if grouping == "size":
        return None if finding.size_mm is None else size_bin(finding.size_mm)
    raise ValueError(f"not a finding grouping: {grouping}")


def group_auc_table(results: dict[str, list[ImageScore]], attributes: dict[str, dict[str, Any]],
                    grouping: str, *, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Breast-wise AUC of each modality per group, with bootstrap CIs.

    Breast attributes (family, vendor, density): each group's breasts, positive and negative,
    on their own: how well the model does on, e.g., a texture family it never saw. Finding
    attributes (lesion_kind, margin, size): for each class, the breasts positive for it that
    hold a finding of that class in the group, against every breast negative for it: how
    well the model finds, e.g., 3-5 mm masses."""
    if grouping not in GROUPINGS:
        raise DicomnodeError(f"--group-by {grouping}: use one of {', '.join(GROUPINGS)}")
    rows: list[dict[str, Any]] = []
    groups_seen: set[str] = set()
    for m in [m for m in MODALITY_ORDER if m in results]:
        breasts = breast_predictions(results[m])
        attrs = breast_attributes(results[m], attributes)
        membership: dict[str, set[tuple[str, str]]] = defaultdict(set)
        per_class: dict[tuple[str, int], set[tuple[str, str]]] = defaultdict(set)
        for key, a in attrs.items():
            if grouping in BREAST_GROUPINGS:
                if a.values.get(grouping):
                    membership[a.values[grouping]].add(key)
                continue
            for f in a.findings:
                group = _finding_group(f, grouping)
                if group is not None:
                    membership[group].add(key)
                    per_class[(group, f.class_index)].add(key)
        for group in sorted(membership):
            groups_seen.add(group)
            row: dict[str, Any] = {"name": MODALITY_NAMES[m], "modality": m, "group": group}
            for c, cls in enumerate(CLASS_NAMES):
                if grouping in BREAST_GROUPINGS:
                    chosen = [k for k in membership[group] if k in breasts]
                else:
                    positives = [k for k in per_class.get((group, c), ())
                                 if k in breasts and breasts[k][0][c]]
                    chosen = positives + [k for k, (lab, _) in breasts.items() if not lab[c]]
                labels = np.array([breasts[k][0][c] for k in chosen])
                preds = np.array([breasts[k][1][c] for k in chosen])
                row[cls] = _auc_cell(labels, preds, resamples, seed) if len(chosen) else None
                row[f"{cls}_positive"] = int(labels.sum()) if len(chosen) else 0
                row[f"{cls}_breasts"] = len(chosen)
            rows.append(row)
    return {"grouping": grouping, "groups": sorted(groups_seen), "rows": rows}


def group_markdown(table: dict[str, Any]) -> str:
    grouping = table["grouping"]
    if grouping in BREAST_GROUPINGS:
        how = (f"each {grouping}'s breasts on their own (positive and negative)")
    else:
        how = ("per class, the breasts positive for it with a finding of that class in the "
               "group, against every breast negative for it")
    lines = ["", f"## Breast-wise AUC by {grouping}", "",
             f"95% bootstrap CIs; {how}. Small groups have wide intervals.", "",
             f"| model | {grouping} | malignant | pos / breasts | benign | pos / breasts |",
             "|---|---|---|---:|---|---:|"]

    def cell(value: dict[str, Any] | None) -> str:
        return ("n/a" if value is None else
                f"{value['auc']:.3f} ({value['ci_low']:.3f}-{value['ci_high']:.3f})")

    for row in table["rows"]:
        lines.append(f"| {row['name']} | {row['group']} | {cell(row['malignant'])} | "
                     f"{row['malignant_positive']} / {row['malignant_breasts']} | "
                     f"{cell(row['benign'])} | {row['benign_positive']} / "
                     f"{row['benign_breasts']} |")
    return "\n".join(lines) + "\n"
