"""`dicomnode evaluate`: AUCs with bootstrap CIs, modality ensembles, DSC/PxAP against the
ground-truth SEG masks, and a report (markdown, JSON, ROC curves, montages)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dicomnode.commands.usage import OneLineCommand


@click.command(cls=OneLineCommand)
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A checkpoint; repeat for ensembles (same modality: mean of the "
                   "checkpoints; other modalities: breast-wise modality ensembles).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Read images and SEG masks from this folder instead of the archive.")
@click.option("--subset", type=click.Choice(["all", "train", "val", "test"]), default="all",
              show_default=True, help="Evaluate on this patient split (as `train` made it).")
@click.option("--split", "split_text", default="0.8,0.1,0.1", show_default=True,
              help="Patient fractions TRAIN,VAL,TEST used to make the split.")
@click.option("--split-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="split.json of a training run: --subset takes that run's studies.")
@click.option("--tta", type=int, default=None,
              help="Random shift/resize copies averaged per image (paper: 10); default: "
                   "[model] test_time_augmentations, what the node does.")
@click.option("--augment-px", type=int, default=None,
              help="Largest shift/resize of a copy, model-input pixels; default: [model] "
                   "augment_px.")
@click.option("--window", type=click.Choice(["whole", "chest-wall"]), default=None,
              help="whole: the model reads the whole breast (input grown to the breast crop "
                   "where it is larger than the input size); chest-wall: a window of the "
                   "input size at the chest wall. Default: [model] whole_breast.")
@click.option("--group-by", "group_by", multiple=True,
              type=click.Choice(["family", "vendor", "density", "lesion_kind", "margin", "size"]),
              help="Also breast-wise AUC per group, from the labels file's columns as "
                   "`dicomnode synth` writes them (repeatable): texture family, vendor style, "
                   "density; or the findings' kind, margin, size (<5, 5-10, 10-20, >=20 mm).")
@click.option("--threshold", type=float, default=0.5, show_default=True,
              help="Saliency threshold for DSC.")
@click.option("--bootstrap", "resamples", type=int, default=1000, show_default=True)
@click.option("--montages", type=int, default=3, show_default=True,
              help="Highest-scoring and missed cases drawn per modality.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.pass_context
def evaluate(ctx: click.Context, labels: Path, checkpoints: tuple[Path, ...], out: Path,
             images: Path | None, subset: str, split_text: str, split_file: Path | None,
             tta: int | None, augment_px: int | None, window: str | None,
             group_by: tuple[str, ...], threshold: float, resamples: int,
             montages: int, seed: int, device: str | None) -> None:
    """Evaluate checkpoints on labelled images and write a report to OUT: AUCs with
    bootstrap CIs, localisation, and the malignant marks a reader would see at the node's
    operating points ([results] malignant_operating_point, cad_operating_points)."""
    from dicomnode.cli import load_cli_config
    from dicomnode.pipeline.weights import resolve_device
    from dicomnode.training import evaluation as ev
    from dicomnode.training import evaluation_report as report
    from dicomnode.training.data import seg_masks, split_by_patient
    from dicomnode.training.runner import load_labelled, parse_fractions, read_split_studies

    config = load_cli_config(ctx)
    fractions = parse_fractions(split_text)
    # Scored as the worker scores: the node's test-time augmentation unless told otherwise.
    tta = config.model.test_time_augmentations if tta is None else tta
    augment_px = config.model.augment_px if augment_px is None else augment_px
    whole_breast = config.model.whole_breast if window is None else window == "whole"
    loaded = ev.load_checkpoints(checkpoints, resolve_device(device or config.model.device))
    data = load_labelled(config, labels, None, images)
    examples = data.examples
    if subset != "all" and split_file is not None:
        studies = set(read_split_studies(split_file, subset))
        examples = [e for e in examples if e.header.study_uid in studies]
    elif subset != "all":
        examples = split_by_patient(examples, fractions)[subset]
    ev.require_examples(examples, loaded, data.labels_path)
    masks = seg_masks(data.index.seg_paths)
    results = ev.score_images(examples, loaded, masks, tta=tta, augment_px=augment_px,
                              threshold=threshold, seed=seed, progress=True,
                              whole_breast=whole_breast)
    aucs = ev.auc_tables(results, resamples=resamples, seed=seed)
    localisation = ev.localisation_table(results)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"labels": str(labels), "source": data.index.source, "subset": subset,
            "checkpoints": [str(c.path) for c in loaded], "resamples": resamples,
            "threshold": threshold, "tta": tta, "augment_px": augment_px if tta > 0 else 0,
            "window": "whole breast" if whole_breast else "chest wall"}
    per_image = [{"sop_instance_uid": s.example.uid, "modality": m,
                  "study_uid": s.example.header.study_uid, "laterality": s.example.laterality,
                  "view": s.example.header.view, "benign": s.example.benign,
                  "malignant": s.example.malignant, "y_benign": float(s.y[0]),
                  "y_malignant": float(s.y[1]), **s.ensemble_localisation}
                 for m, scores in results.items() for s in scores]
    report.write_tables(out, aucs, localisation, meta, per_image)
    hidden = ev.hidden_findings_table(results, masks, resamples=resamples, seed=seed)
    if hidden is not None:
        _add_section(out, ev.hidden_findings_markdown(hidden), "hidden_findings.json", hidden)
    # Judged as a reader sees it: the marks drawn at the node's own operating points.
    marks = ev.marks_table(results, [config.results.malignant_operating_point,
                                     *config.results.cad_operating_points])
    if marks:
        _add_section(out, ev.marks_markdown(marks), "marks.json", marks)
    if group_by:
        attributes = ev.read_attributes(labels)
        tables = [ev.group_auc_table(results, attributes, g, resamples=resamples, seed=seed)
                  for g in group_by]
        _add_section(out, "".join(ev.group_markdown(t) for t in tables), "groups.json",
                     tables)
    report.roc_figures(out, aucs["curves"])
    if montages > 0:
        folder = out / "montages"
        folder.mkdir(exist_ok=True)
        for modality, scores in results.items():
            model = next(c.model for c in loaded if c.modality == modality)
            for n, (kind, score) in enumerate(report.pick_cases(scores, montages)):
                name = f"{modality}_{kind}_{n:02d}_{score.example.uid}.png"
                report.montage(folder / name, score, model,
                               f"{ev.MODALITY_NAMES[modality]} {kind}")
    click.echo((out / "report.md").read_text())


def _add_section(out: Path, markdown: str, json_name: str, payload: object) -> None:
    """One more section of the report: its text appended to report.md, its figures as
    JSON beside it."""
    with open(out / "report.md", "a") as fh:
        fh.write(markdown)
    (out / json_name).write_text(json.dumps(payload, indent=1))
