"""`dicomnode tune`: the paper's random hyperparameter search (V-D.6). Each trial trains into
OUT/trial_NNN (rerunning resumes unfinished trials and skips finished ones); the best --keep
trials by validation malignant AUC are copied to OUT/best_1.pt, best_2.pt, ... and the
checkpoints of the others are deleted."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import click

from dicomnode.commands.train import model_options
from dicomnode.commands.usage import OneLineCommand


@click.command(cls=OneLineCommand)
@model_options
@click.option("--trials", type=int, required=True, help="Random-search trials (paper: 40).")
@click.option("--keep", type=int, default=5, show_default=True,
              help="Trials kept, best validation malignant AUC first (paper: 5).")
@click.pass_context
def tune(ctx: click.Context, labels: Path, modality: str, out: Path, images: Path | None,
         init: Path | None, epochs: int, batch_size: int, patience: int, augment_px: int,
         split_text: str, input_size: str | None, crop_size: str | None, zeta: int | None,
         slice_chunk: int | None, local_width: int | None,
         activation_checkpointing: bool | None, seed: int, device: str | None,
         precision: str, cache_dir: Path | None, no_progress: bool, trials: int,
         keep: int) -> None:
    """Random search over lr, w, t, K and beta; keeps the best models."""
    from dicomnode.cli import load_cli_config
    from dicomnode.errors import DicomnodeError
    from dicomnode.training.runner import (
        init_config,
        load_labelled,
        model_config,
        parse_fractions,
        parse_size,
        resolve_init,
        shutdown_distributed,
        write_json,
    )
    from gmic.tune import sample_trial

    if trials < 1 or keep < 1:
        raise DicomnodeError("--trials and --keep must be at least 1")
    config = load_cli_config(ctx)
    fractions = parse_fractions(split_text)
    base = {"input_size": parse_size(input_size, "--input-size"),
            "crop_size": parse_size(crop_size, "--crop-size"), "zeta": zeta,
            "slice_chunk": slice_chunk, "local_width": local_width,
            "activation_checkpointing": activation_checkpointing}
    init = resolve_init(init, modality)
    init_cfg = init_config(init)
    model_config(modality, base, init_cfg, init=init)  # contradicting flags fail before data
    data = load_labelled(config, labels, modality, images)
    rng = random.Random(seed)
    draws = [sample_trial(modality, rng) for _ in range(trials)]  # fixed by the seed
    out.mkdir(parents=True, exist_ok=True)
    try:
        finished = _run_trials(draws, out, data, modality, base, fractions, init, init_cfg,
                               cache_dir,
                               device or config.model.device, epochs=epochs,
                               batch_size=batch_size, patience=patience,
                               augment_px=augment_px, seed=seed, precision=precision,
                               progress=not no_progress)
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 keeps and reports
        return
    ranked = sorted(finished, key=lambda r: -(r["best_auc"] if r["best_auc"] == r["best_auc"]
                                              else -1.0))
    kept = ranked[:keep]
    for rank, record in enumerate(kept, start=1):
        shutil.copyfile(out / record["folder"] / "best.pt", out / f"best_{rank}.pt")
    for record in ranked[keep:]:
        for path in (out / record["folder"]).glob("*.pt"):
            path.unlink()
    write_json(out / "tune.json", {"kept": kept, "trials": ranked})
    click.echo("best trials: " + ", ".join(
        f"{r['folder']} (AUC {r['best_auc']:.3f})" for r in kept))


def _run_trials(draws, out: Path, data, modality: str, base: dict, fractions, init, init_cfg,
                cache_dir: Path | None, device: str, *, epochs: int, batch_size: int,
                patience: int, augment_px: int, seed: int, precision: str,
                progress: bool) -> list[dict]:
    """Train each trial not finished yet; the records of all trials."""
    from dicomnode.errors import DicomnodeError
    from dicomnode.training.runner import model_config, train_run, write_json
    from gmic.train import TrainError, TrainSettings

    finished = []
    for n, trial in enumerate(draws):
        folder = out / f"trial_{n:03d}"
        done = folder / "result.json"
        if done.is_file():
            finished.append(json.loads(done.read_text()))
            continue
        changes = trial.config_changes()  # searched: may differ from the --init checkpoint's
        cfg = model_config(modality, {**base, **changes}, init_cfg, init=init,
                           free=tuple(changes))
        try:
            settings = TrainSettings(epochs=epochs, learning_rate=trial.learning_rate,
                                     batch_size=batch_size, patience=patience,
                                     augment_px=augment_px, seed=seed + n, precision=precision,
                                     progress=progress)
        except TrainError as exc:
            raise DicomnodeError(str(exc)) from None
        click.echo(f"trial {n + 1}/{len(draws)}: lr {trial.learning_rate:.2e}, "
                   f"K {trial.num_crops}, t {trial.percent_t:.3f}, beta {trial.beta:.2e}, log10 w "
                   f"{trial.saliency_init_log10_w:.2f}")
        result = train_run(data, modality, cfg, settings, folder, init=init,
                           fractions=fractions, cache_dir=cache_dir or out / "cache",
                           device_spec=device)
        record = {"trial": n, "folder": folder.name, "best_auc": result.best_auc,
                  "best_epoch": result.best_epoch, "learning_rate": trial.learning_rate,
                  **trial.config_changes()}
        if os.environ.get("RANK", "0") == "0":
            write_json(done, record)
            with open(out / "trials.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        finished.append(record)
    return finished
