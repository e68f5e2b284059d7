"""What `dicomnode train` and `dicomnode tune` share: labelled data from the archive or a
folder, the model configuration, and one training run into an output folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dicomnode.errors import DicomnodeError
from dicomnode.training.data import (
    CachedVolumes,
    Example,
    ImageIndex,
    check_split,
    index_archive,
    index_folder,
    log_split,
    match_labels,
    split_by_patient,
)
from dicomnode.training.labels import read_labels

log = logging.getLogger("dicomnode.training")


class CheckpointUnusable(DicomnodeError):
    """A checkpoint given on the command line cannot be used."""


@dataclass
class LabelledData:
    examples: list[Example]
    index: ImageIndex
    labels_path: Path


def load_labelled(config, labels: str | Path, modality: str | None,
                  images: str | Path | None) -> LabelledData:
    """Labels matched to images: from the folder `images` when given, else the archive of
    the configured node."""
    labels_path = Path(labels)
    rows = read_labels(labels_path)
    if images is not None:
        index = index_folder(images)
    else:
        from dicomnode.wiring import open_store, storage_errors

        with storage_errors(), ExitStack() as stack:
            store = stack.enter_context(open_store(config))
            index = index_archive(store, rows, labels_path)
    return LabelledData(match_labels(rows, index, modality, labels_path), index, labels_path)


def parse_size(text: str | None, what: str) -> tuple[int, int] | None:
    """'448x320' -> (448, 320)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DicomnodeError(f"{what} must be HEIGHTxWIDTH in pixels, e.g. 2116x1339; got "
                             f"{text!r}") from None
    if h < 1 or w < 1:
        raise DicomnodeError(f"{what} must be positive, got {text!r}")
    return h, w


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DicomnodeError(f"--split must be three fractions TRAIN,VAL,TEST such as "
                             f"0.8,0.1,0.1; got {text!r}")
    return values  # type: ignore[return-value]


# The command-line flag of each configuration field the train and tune commands set.
FLAGS = {"input_size": "--input-size", "crop_size": "--crop-size", "num_crops": "--num-crops",
         "percent_t": "--percent-t", "zeta": "--zeta", "local_width": "--local-width",
         "beta": "--beta", "saliency_init_log10_w": "--log10-w",
         "slice_chunk": "--slice-chunk", "activation_checkpointing": "--activation-checkpointing"}
# What a checkpoint's model is, whatever modality it goes on to learn: its weights' shapes
# and its normalisation...
NETWORK_FIELDS = ("num_classes", "local_width", "attention_dim", "norm_groups")
# ...and, for the same modality, how it reads an image: the field of view it learnt at, its
# crops, its top-t pooling and its slice suppression.
READING_FIELDS = ("input_size", "crop_size", "num_crops", "percent_t", "zeta")
# The fields GMICConfig.for_modality sets per modality: a checkpoint of another modality
# (transfer learning) leaves them at the new modality's defaults unless flags say otherwise.
MODALITY_FIELDS = ("input_size", "num_crops", "percent_t", "beta", "zeta")


def resolve_init(init: str | Path | None, modality: str) -> Path | None:
    """The file `--init` names; `builtin` is the weights shipped for the modality."""
    if init is None:
        return None
    if str(init) == "builtin":
        from dicomnode.pipeline.weights import ModelUnavailable, checkpoint_path

        try:
            return checkpoint_path(modality, "builtin")
        except ModelUnavailable as exc:
            raise CheckpointUnusable(f"--init builtin: {exc}") from None
    return Path(init)


def init_config(init: Path | None):
    """The configuration stored in the --init checkpoint; None without --init or for a
    published state dict (which carries none: the flags describe its architecture)."""
    from gmic.checkpoint import CheckpointError, checkpoint_config

    if init is None:
        return None
    try:
        return checkpoint_config(init)
    except CheckpointError as exc:
        raise CheckpointUnusable(f"--init: {exc}") from None


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def model_config(modality: str, changes: dict[str, Any], init_cfg=None, *,
                 init: Path | None = None, free: tuple[str, ...] = ()):
    """The model to train. Without a starting checkpoint (init_cfg None): the modality's
    defaults with `changes` (None: not given). From a checkpoint of the same modality: the
    checkpoint's configuration, flags contradicting what the model is refused; of another
    modality: its network with the new modality's defaults for how images are read.
    `free` names fields that may differ from the checkpoint's (tune's searched values);
    run-time settings (slice chunk, activation checkpointing, loss weight) always may."""
    from gmic.model_config import GMICConfig, GMICConfigError

    given = {k: v for k, v in changes.items() if v is not None}
    try:
        if init_cfg is None:
            return GMICConfig.for_modality(modality, **given)
        kept = NETWORK_FIELDS + (READING_FIELDS if init_cfg.modality == modality else ())
        contradictions = [
            f"{FLAGS.get(name, name)} {_flag_value(given[name])} contradicts the "
            f"checkpoint's {_flag_value(getattr(init_cfg, name))}"
            for name in kept
            if name in given and name not in free and given[name] != getattr(init_cfg, name)]
        if contradictions:
            raise CheckpointUnusable(
                "; ".join(contradictions) + (f" (--init {init})" if init else "")
                + (": leave it out to use the checkpoint's" if len(contradictions) == 1
                   else ": leave them out to use the checkpoint's"))
        values = init_cfg.to_dict()
        if init_cfg.modality != modality:
            defaults = GMICConfig.for_modality(modality)
            values.update({f: getattr(defaults, f) for f in MODALITY_FIELDS}, modality=modality)
        return GMICConfig.from_dict({**values, **given})
    except GMICConfigError as exc:
        raise DicomnodeError(str(exc)) from None


def initial_model(cfg, init: str | Path | None):
    """A fresh model, or one whose weights come from `init` (any modality: the paper's
    transfer learning), with cfg's hyperparameters (see model_config)."""
    from gmic.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict
    from gmic.model import GMIC

    model = GMIC(cfg)
    if init is None:
        return model
    try:
        source, _ = load_checkpoint(init)
        load_state_dict_strict(model, source.state_dict(), init)
    except CheckpointError as exc:
        raise CheckpointUnusable(f"--init: {exc}") from None
    return model


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def train_run(data: LabelledData, modality: str, cfg, settings, out_dir: Path, *,
              init: str | Path | None, fractions: Sequence[float], cache_dir: Path | None,
              device_spec: str, whole_breast: bool = False) -> Any:
    """Split, check, and train one model into out_dir; returns gmic.train.TrainResult."""
    import torch

    from dicomnode.pipeline.weights import resolve_device
    from gmic.train import Trainer, TrainError, init_distributed

    splits = split_by_patient(data.examples, tuple(fractions))  # type: ignore[arg-type]
    check_split("train", splits["train"], data.labels_path)
    check_split("val", splits["val"], data.labels_path)
    log_split(splits)
    device = resolve_device(device_spec)
    dist_info = init_distributed(device.type)
    if device.type == "cuda" and dist_info.active:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dist_info.is_main:
        write_json(out_dir / "run.json", {
            "modality": modality, "config": cfg.to_dict(), "settings": asdict(settings),
            "labels": str(data.labels_path), "source": data.index.source,
            "init": str(init) if init else None, "world_size": dist_info.world_size,
            "whole_breast": whole_breast,
            "splits": {k: {"images": len(v), "malignant": sum(e.malignant for e in v),
                           "benign": sum(e.benign for e in v)} for k, v in splits.items()}})
        # image UIDs per split, and study UIDs so that `evaluate --split-file` can select
        # the same patients' images of other modalities
        write_json(out_dir / "split.json", {
            **{k: [e.uid for e in v] for k, v in splits.items()},
            "studies": {k: sorted({e.header.study_uid for e in v}) for k, v in splits.items()}})
    torch.manual_seed(settings.seed)  # identical initial weights on every process
    model = initial_model(cfg, init)
    masks = None
    if settings.uses_masks:
        from dicomnode.training.data import seg_masks

        masks = seg_masks(data.index.seg_paths)
        if not masks:
            raise DicomnodeError(f"--mask-weight, --crop-weight and --lesion-crops need "
                                 f"ground-truth SEG masks, but {data.index.source} has none; "
                                 "drop them or add the SEG files")
        log.info("event=train_masks images_with_masks=%d", len(masks))
    train_set = CachedVolumes(splits["train"], cfg.input_size, cache_dir, masks,
                              whole_breast=whole_breast)
    val_set = CachedVolumes(splits["val"], cfg.input_size, cache_dir, whole_breast=whole_breast)
    meta = {"modality": modality, "labels": data.labels_path.name,
            "description": "trained with dicomnode train"}
    try:
        trainer = Trainer(model, train_set, val_set, settings, out_dir, device=device,
                          dist_info=dist_info, meta=meta)
        return trainer.run()
    except TrainError as exc:
        raise DicomnodeError(str(exc)) from None



def shutdown_distributed() -> None:
    """Leave the torchrun process group (once, at the end of a command)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def read_split_studies(path: Path, subset: str) -> list[str]:
    """The study UIDs of one split in a training run's split.json."""
    try:
        return list(json.loads(Path(path).read_text())["studies"][subset])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DicomnodeError(f"{path}: not a split.json written by dicomnode train "
                             f"({type(exc).__name__}: {exc}); pass OUT/split.json of a run"
                             ) from None
