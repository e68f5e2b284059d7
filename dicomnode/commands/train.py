"""`dicomnode train`: train 3D-GMIC (DBT) or GMIC (FFDM, synthetic 2D) on labelled images of
the archive (or a folder), per paper V-D. Multi-GPU: `torchrun --nproc_per_node N -m
dicomnode.cli train ...`. Rerunning the same command resumes where it stopped."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dicomnode.commands.usage import OneLineCommand

MODALITY = click.Choice(["dbt", "ffdm", "s2d"])


def model_options(f):
    """Options shared by train and tune: data, model shape, training recipe."""
    options = [
        click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), required=True,
                     help="CSV: sop_instance_uid (or study_uid+laterality), benign, malignant "
                          "[, patient_id, study_date, split]."),
        click.option("--modality", type=MODALITY, required=True),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Output folder: checkpoints, metrics.jsonl, state to resume from."),
        click.option("--images", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Read images from this folder (e.g. a synth output) "
                                        "instead of the node's archive."),
        click.option("--init", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Start from this checkpoint's weights; 'builtin': the weights "
                          "shipped for --modality. A checkpoint of the same modality brings "
                          "its whole model (input size, crops, K, t, zeta, widths: leave "
                          "those flags out); one of another modality (transfer learning) "
                          "brings its network."),
        click.option("--epochs", type=int, default=40, show_default=True),
        click.option("--batch-size", type=int, default=4, show_default=True,
                     help="Images per optimizer step, over all processes."),
        click.option("--patience", type=int, default=15, show_default=True,
                     help="Stop after this many epochs without a better validation AUC."),
        click.option("--augment-px", type=int, default=100, show_default=True,
                     help="Random shift/resize of the input window, pixels (0: off)."),
        click.option("--split", "split_text", default="0.8,0.1,0.1", show_default=True,
                     help="Patient fractions TRAIN,VAL,TEST (a split column overrides)."),
        click.option("--input-size", default=None,
                     help="Model input HxW (default: the modality's, e.g. 2116x1339, or the "
                          "--init checkpoint's)."),
        click.option("--crop-size", default=None, help="Local patch HxW (default 256x256)."),
        click.option("--zeta", type=int, default=None),
        click.option("--slice-chunk", type=int, default=None,
                     help="Slices per global-network pass (memory vs speed)."),
        click.option("--local-width", type=int, default=None,
                     help="Base width of the local ResNet-18 (default 64, the paper's)."),
        click.option("--activation-checkpointing/--no-activation-checkpointing", default=None,
                     help="Recompute the global network in backward (less memory, slower; "
                          "default on)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default=None, help="auto, cpu, cuda, cuda:N (default: "
                                                    "[model] device)."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     default="auto", show_default=True),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="Preprocessed-volume cache (default OUT/cache)."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command(cls=OneLineCommand)
@model_options
@click.option("--lr", type=float, default=10 ** -5.0, show_default=True,
              help="Adam learning rate.")
@click.option("--num-crops", type=int, default=None, help="K (default per modality).")
@click.option("--percent-t", type=float, default=None, help="Top-t pooling fraction of one "
              "slice's saliency area.")
@click.option("--beta", type=float, default=None, help="L1 weight of the saliency maps.")
@click.option("--log10-w", type=float, default=None, help="Saliency head init log10(w).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Also save the resumable state every N optimizer steps.")
@click.option("--mask-weight", type=float, default=0.0, show_default=True,
              help="Also supervise the saliency maps with ground-truth SEG masks at this "
                   "weight (0: image labels only, as the paper).")
@click.option("--crop-weight", type=float, default=0.0, show_default=True,
              help="Also supervise the local network on each crop with ground-truth SEG "
                   "masks at this weight (0: image labels only, as the paper).")
@click.option("--lesion-crops", is_flag=True,
              help="Train only the local network, on crops centred on the ground-truth SEG "
                   "lesions (on the slice each is centred on) and on lesion-free crops; the "
                   "global network stays as --init has it.")
@click.option("--augment-intensity", type=float, default=0.0, show_default=True,
              help="Strength (0-1) of random intensity changes per training image: tone "
                   "curve, contrast, blur, noise, as other machines would show it (0: off, as "
                   "the paper; 0.3 for models that must read other generators or vendors).")
@click.option("--whole-breast/--windowed", default=False, show_default=True,
              help="Read each training and validation image whole, as the node does ([model] "
                   "whole_breast): where the breast is larger than the input size the input "
                   "grows to it, so full-size breasts train as the node will read them. "
                   "Default: a fixed-size window at the chest wall.")
@click.option("--normal-slices", type=int, default=0, show_default=True,
              help="An image with no finding (benign and malignant 0) and more slices than "
                   "this trains on a random run of this many consecutive slices (0: all). "
                   "Any slab of a normal breast is normal: with --whole-breast, whole "
                   "full-size normal breasts can be trained on at a fraction of the cost.")
@click.option("--max-minutes", type=float, default=0.0, show_default=True,
              help="Stop after this many minutes, checkpointing the weights so far (0: no limit); "
                   "rerun to resume.")
@click.pass_context
def train(ctx: click.Context, labels: Path, modality: str, out: Path, images: Path | None,
          init: Path | None, epochs: int, batch_size: int, patience: int, augment_px: int,
          split_text: str, input_size: str | None, crop_size: str | None, zeta: int | None,
          slice_chunk: int | None, local_width: int | None,
          activation_checkpointing: bool | None, seed: int, device: str | None,
          precision: str, cache_dir: Path | None, no_progress: bool, lr: float,
          num_crops: int | None, percent_t: float | None, beta: float | None,
          log10_w: float | None,
          checkpoint_every: int, mask_weight: float, crop_weight: float,
          lesion_crops: bool, augment_intensity: float, whole_breast: bool,
          normal_slices: int, max_minutes: float) -> None:
    """Train a model on labelled images; rerun the same command to resume."""
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
        train_run,
    )
    from gmic.train import TrainError, TrainSettings

    config = load_cli_config(ctx)
    fractions = parse_fractions(split_text)
    init = resolve_init(init, modality)
    cfg = model_config(modality, {
        "input_size": parse_size(input_size, "--input-size"),
        "crop_size": parse_size(crop_size, "--crop-size"), "zeta": zeta,
        "slice_chunk": slice_chunk, "num_crops": num_crops, "percent_t": percent_t,
        "beta": beta, "saliency_init_log10_w": log10_w, "local_width": local_width,
        "activation_checkpointing": activation_checkpointing}, init_config(init), init=init)
    try:
        settings = TrainSettings(epochs=epochs, learning_rate=lr, batch_size=batch_size,
                                 patience=patience, augment_px=augment_px, seed=seed,
                                 precision=precision, checkpoint_every_steps=checkpoint_every,
                                 progress=not no_progress, max_seconds=60 * max_minutes,
                                 mask_weight=mask_weight, crop_weight=crop_weight,
                                 lesion_crops=lesion_crops,
                                 augment_intensity=augment_intensity,
                                 normal_slices=normal_slices)
    except TrainError as exc:
        raise DicomnodeError(str(exc)) from None
    data = load_labelled(config, labels, modality, images)
    try:
        result = train_run(data, modality, cfg, settings, out, init=init, fractions=fractions,
                           cache_dir=cache_dir or out / "cache",
                           device_spec=device or config.model.device,
                           whole_breast=whole_breast)
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    click.echo(f"best epoch {result.best_epoch}: validation malignant AUC "
               f"{result.best_auc:.3f}; checkpoint {out / 'best.pt'}"
               + (" (stopped early)" if result.stopped_early else "")
               + ("; time budget reached, rerun the command to go on" if result.interrupted
                  else ""))
