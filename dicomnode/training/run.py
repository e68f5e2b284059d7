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
        from dicomnode.store import open_store, storage_errors

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


def model_config(modality: str, changes: dict[str, Any]):
    from gmic.config import GMICConfig, GMICConfigError

    try:
        return GMICConfig.for_modality(modality, **{k: v for k, v in changes.items()
                                                    if v is not None})
    except GMICConfigError as exc:
        raise DicomnodeError(str(exc)) from None


def initial_model(cfg, init: str | Path | None):
    """A fresh model, or one whose weights come from `init` (any modality: the paper's
    transfer learning), with cfg's hyperparameters."""
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
              device_spec: str) -> Any:
    """Split, check, and train one model into out_dir; returns gmic.train.TrainResult."""
    import torch

    from dicomnode.models import resolve_device
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
    train_set = CachedVolumes(splits["train"], cfg.input_size, cache_dir, masks)
    val_set = CachedVolumes(splits["val"], cfg.input_size, cache_dir)
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
