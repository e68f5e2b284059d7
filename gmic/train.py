"""Training of 3D-GMIC / GMIC (paper V-D): loss eq. 7, Adam, random shift/resize augmentation,
crop slices sampled within +/-zeta (the model's training mode), mixed precision on GPU,
early stopping on the validation malignant AUC, a checkpoint every epoch, exact resume, and
DistributedDataParallel under torchrun (gloo on CPU, nccl on GPU; SyncBatchNorm in the local
network on GPU, as the paper did).

Optionally (not in the paper) the ground-truth masks supervise the saliency maps and the
crops, or the local network trains alone on crops centred on the lesions (lesion_crops).

The data is abstract: any sequence of (volume (D, H, W) float32 array, label (2,) array of
0/1 in benign, malignant order), optionally with masks and depths. No DICOM here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gmic.augment import intensity_jitter, shift_resize_with_masks, uniform_int
from gmic.checkpoint import save_checkpoint
from gmic.classes import BENIGN, MALIGNANT
from gmic.lesion_crops import find_lesions, sample_lesion_crops
from gmic.loss import crop_mask_loss, gmic_loss_terms, saliency_mask_loss
from gmic.metrics import MetricError, roc_auc
from gmic.model import GMIC

log = logging.getLogger("gmic.train")

STATE_FORMAT = "dicomnode-gmic-train"
STATE_FORMAT_VERSION = 1
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


class TrainError(ValueError):
    """Training cannot start or go on; the message says why and what to change."""


class LabelledVolumes(Protocol):
    """What the trainer reads: item i is (volume (D, H, W) float32, labels (2,)), optionally
    followed by ground-truth masks (2, H, W) on the model input (mask_weight, crop_weight)
    and the slice each mask pixel's lesion is centred on, (2, H, W) (lesion_crops)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class TrainSettings:
    """How to train (the model's own hyperparameters live in GMICConfig)."""

    epochs: int = 40  # paper: at most 40 epochs
    learning_rate: float = 10 ** -5.0  # paper: log10(lr) ~ U(-5.5, -4.5)
    batch_size: int = 4  # images per optimizer step over all processes (paper: 4)
    patience: int = 15  # epochs without a better validation malignant AUC before stopping
    augment_px: int = 100  # random shift/resize of the window, pixels (paper V-D.3)
    # strength of random intensity changes (tone curve, contrast, blur, noise; 0 = none, as
    # the paper): for models that must read other machines' images than they trained on
    augment_intensity: float = 0.0
    seed: int = 0
    precision: str = "auto"  # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    checkpoint_every_steps: int = 0  # also save the resumable state every N optimizer steps
    progress: bool = True  # a progress bar on stderr (rank 0)
    max_steps: int = 0  # stop after this many optimizer steps in this run (0 = no limit)
    # stop once this run has lasted this many seconds (0 = no limit): mid-epoch, the weights
    # so far are validated and checkpointed; the state is saved, so the command resumes
    max_seconds: float = 0.0
    # weight of saliency_mask_loss where items carry masks (0 = the paper: image labels only)
    mask_weight: float = 0.0
    # weight of crop_mask_loss (the local network on each crop) where items carry masks
    crop_weight: float = 0.0
    # train the local network alone, on crops centred on the items' ground-truth lesions
    # (gmic.lesion_crops); items then carry masks and depths, the global network is kept
    lesion_crops: bool = False
    # an item with no finding (labels all 0) and more slices than this trains on a random run
    # of this many consecutive slices (0: all): any slab of a normal breast is normal, so
    # whole full-size breasts can teach what is not a finding at a fraction of the cost
    normal_slices: int = 0

    @property
    def uses_masks(self) -> bool:
        return bool(self.mask_weight or self.crop_weight or self.lesion_crops)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patience < 1:
            problems.append(f"patience must be >= 1, got {self.patience}")
        if self.augment_px < 0:
            problems.append(f"augment_px must be >= 0, got {self.augment_px}")
        if not 0 <= self.augment_intensity <= 1:
            problems.append(f"augment_intensity must be in [0, 1], got {self.augment_intensity}")
        if self.mask_weight < 0:
            problems.append(f"mask_weight must be >= 0, got {self.mask_weight}")
        if self.crop_weight < 0:
            problems.append(f"crop_weight must be >= 0, got {self.crop_weight}")
        if self.lesion_crops and (self.mask_weight or self.crop_weight):
            problems.append("lesion_crops trains the local network alone: mask_weight and "
                            "crop_weight do not apply to it; set them to 0")
        if self.normal_slices < 0:
            problems.append(f"normal_slices must be >= 0, got {self.normal_slices}")
        if self.max_seconds < 0:
            problems.append(f"max_seconds must be >= 0, got {self.max_seconds}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if problems:
            raise TrainError("invalid training settings: " + "; ".join(problems))


@dataclass
class TrainResult:
    best_epoch: int  # 1-based; 0 when no epoch finished
    best_auc: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False  # max_steps reached before the end


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def validation_scores(model: GMIC, data: LabelledVolumes, device: torch.device,
                      dtype: str = "fp32", indices: Sequence[int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, 2), predictions y (N, 2)) in eval mode, no augmentation."""
    from gmic.model import predict

    labels, scores = [], []
    for i in (range(len(data)) if indices is None else indices):
        volume, label = data[i][:2]
        out = predict(model, torch.from_numpy(np.asarray(volume, dtype=np.float32)), dtype=dtype)
        scores.append(out.y.float().cpu().numpy())
        labels.append(np.asarray(label, dtype=np.float32))
    if not labels:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    return np.stack(labels), np.stack(scores)


def _safe_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    try:
        return roc_auc(labels, scores)
    except MetricError:
        return None


class ProgressBar:
    """One line on stderr, redrawn at most twice a second: step, loss, images/s."""

    def __init__(self, total: int, title: str, enabled: bool) -> None:
        self.total, self.title, self.enabled = total, title, enabled
        self.started = time.monotonic()
        self.last_draw = 0.0

    def update(self, done: int, loss: float, images: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last_draw < 0.5):
            return
        self.last_draw = now
        width = 24
        filled = int(width * done / max(self.total, 1))
        rate = images / max(now - self.started, 1e-9)
        sys.stderr.write(f"\r{self.title} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{done}/{self.total} loss {loss:.4f} {rate:.2f} img/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


class Trainer:
    """Trains one model; everything it needs to resume lives in out_dir/train_state.pt.

    grad_hook, when given, is called with the (unwrapped) model after the gradients of an
    optimizer step are complete (all-reduced under DDP), before the step: for tests.
    """

    def __init__(self, model: GMIC, train_set: LabelledVolumes, val_set: LabelledVolumes,
                 settings: TrainSettings, out_dir: str | Path, *,
                 device: str | torch.device = "cpu", dist_info: DistInfo | None = None,
                 meta: dict[str, Any] | None = None,
                 grad_hook: Callable[[GMIC], None] | None = None) -> None:
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.dist = dist_info or DistInfo()
        self.device = torch.device(device)
        self.meta = dict(meta or {})
        self.grad_hook = grad_hook
        if len(train_set) == 0:
            raise TrainError("the training split is empty")
        if len(val_set) == 0:
            raise TrainError("the validation split is empty")
        self.train_set, self.val_set = train_set, val_set
        self.model = model.to(self.device)
        self.cfg = model.cfg
        self.world = self.dist.world_size
        if settings.batch_size % self.world:
            raise TrainError(f"batch size {settings.batch_size} is not a multiple of the "
                             f"{self.world} processes; use a multiple")
        self.accum = settings.batch_size // self.world
        self.net: nn.Module = self.model
        if self.dist.active:
            if self.device.type == "cuda":
                # the paper's synchronised batch norm for the local network; SyncBatchNorm
                # has no CPU kernel, so on gloo/CPU each process keeps its own statistics
                self.model.dn_resnet = nn.SyncBatchNorm.convert_sync_batchnorm(
                    self.model.dn_resnet)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if settings.lesion_crops and self.dist.active:
            raise TrainError("lesion-crop training runs in one process (it trains the small "
                             "local network only); run it without torchrun")
        trained = (self.model.local_parameters() if settings.lesion_crops
                   else self.model.parameters())
        self.optimizer = torch.optim.Adam(trained, lr=settings.learning_rate)
        self.lesion_batch: list[tuple[Tensor, Tensor]] = []  # crops of this step's items
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # all training randomness (order aside) flows from this generator: augmentation and
        # the crops' slice sampling; its state is saved for exact resume
        self.generator = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        self.epoch = 0  # epochs finished
        self.step_in_epoch = 0  # items of this rank's shard consumed in the current epoch
        self.global_step = 0
        self.best_auc = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.epoch_loss_sum = 0.0
        self.epoch_items = 0

    # -- set-up -----------------------------------------------------------------------------
    def _amp_dtype(self) -> torch.dtype | None:
        p = self.settings.precision
        if p == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if p == "fp32":
            return None
        if p == "fp16" and self.device.type != "cuda":
            raise TrainError("fp16 mixed precision needs a CUDA device; use bf16 or fp32")
        return torch.bfloat16 if p == "bf16" else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _order(self, epoch: int) -> list[int]:
        """This rank's items of an epoch: one permutation per epoch from the seed, padded
        so that every rank takes the same number of steps, then dealt out round-robin."""
        g = torch.Generator().manual_seed(self.settings.seed * 7919 + epoch)
        order = torch.randperm(len(self.train_set), generator=g).tolist()
        per_step = self.settings.batch_size
        total = math.ceil(len(order) / per_step) * per_step
        order += order[:total - len(order)]
        return order[self.dist.rank::self.world]

    # -- state ------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def _gather_generators(self) -> list[torch.Tensor]:
        state = self.generator.get_state()
        if not self.dist.active:
            return [state]
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, state)
        return states

    def save_state(self) -> None:
        generators = self._gather_generators()  # collective: every rank calls it
        if not self.dist.is_main:
            return
        payload = {
            "format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION,
            "config": self.cfg.to_dict(), "settings": dataclasses.asdict(self.settings),
            "world_size": self.world,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "generators": generators, "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_auc": self.best_auc,
            "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
            "history": self.history, "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_items": self.epoch_items,
        }
        tmp = self.state_path.with_name(STATE_FILE + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.state_path)

    def load_state(self) -> bool:
        """Restore from out_dir/train_state.pt when present; False when starting fresh."""
        path = self.state_path
        if not path.is_file():
            return False
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise TrainError(f"{path}: cannot read the training state ({exc}); delete it to "
                             "start over") from exc
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise TrainError(f"{path}: not a dicomnode training state; delete it or choose "
                             "another output folder")
        if data.get("format_version") != STATE_FORMAT_VERSION:
            raise TrainError(f"{path}: training state format_version "
                             f"{data.get('format_version')!r} is not {STATE_FORMAT_VERSION}")
        if data["config"] != self.cfg.to_dict():
            raise TrainError(f"{path}: was written for another model configuration; use a "
                             "new output folder or the same options")
        if data["world_size"] != self.world:
            raise TrainError(f"{path}: written by {data['world_size']} processes, resumed with "
                             f"{self.world}; resume with the same number")
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scaler.load_state_dict(data["scaler"])
        self.generator.set_state(data["generators"][self.dist.rank])
        torch.set_rng_state(data["torch_rng"])
        for key in ("epoch", "step_in_epoch", "global_step", "best_auc", "best_epoch",
                    "bad_epochs", "history", "epoch_loss_sum", "epoch_items"):
            setattr(self, key, data[key])
        log.info("event=train_resume epoch=%d step=%d", self.epoch, self.step_in_epoch)
        return True

    # -- the loop ---------------------------------------------------------------------------
    def _micro_step(self, index: int, sync: bool) -> float:
        if self.settings.lesion_crops:
            return self._lesion_micro_step(index, sync)
        item = self.train_set[index]
        volume, label = self._slab_of_normal(item[0], item[1]), item[1]
        masks = None
        if self.settings.uses_masks and len(item) > 2 and item[2] is not None:
            masks = torch.from_numpy(np.asarray(item[2], dtype=np.float32)).to(self.device)
        x = torch.from_numpy(np.asarray(volume, dtype=np.float32)).to(self.device)
        x, masks = shift_resize_with_masks(x, masks, self.settings.augment_px, self.generator)
        x = intensity_jitter(x, self.settings.augment_intensity, self.generator)
        target = torch.as_tensor(np.asarray(label, dtype=np.float32), device=self.device)
        # self.net is DistributedDataParallel when dist.active (typed as its Module)
        context = (self.net.no_sync()  # type: ignore[operator]
                   if self.dist.active and not sync
                   else contextlib.nullcontext())
        with context:
            with self._autocast():
                out = self.net(x, generator=self.generator)
            total = gmic_loss_terms(out, target, self.cfg.beta).total
            if masks is not None and self.settings.mask_weight:
                total = total + self.settings.mask_weight * saliency_mask_loss(out.saliency,
                                                                               masks)
            if masks is not None and self.settings.crop_weight:
                total = total + self.settings.crop_weight * crop_mask_loss(
                    out.crop_logits, out.crop_positions, masks, self.cfg.crop_size)
            self.scaler.scale(total / self.accum).backward()
        return float(total.detach())

    def _slab_of_normal(self, volume: np.ndarray, label: np.ndarray) -> np.ndarray:
        n = self.settings.normal_slices
        depth = np.shape(volume)[0]
        if not n or depth <= n or np.asarray(label).any():
            return volume
        start = uniform_int(0, depth - n, self.generator)
        return volume[start:start + n]

    def _lesion_micro_step(self, index: int, sync: bool) -> float:
        """Collect this item's lesion and lesion-free crops; on the step's last item, train
        the local classifier on all of them at once (its batch norm sees the whole batch).
        Returns the batch loss times its items on that call, 0 before it."""
        item = self.train_set[index]
        if len(item) < 4:
            raise TrainError("lesion-crop training needs items with masks and depths")
        volume = torch.from_numpy(np.asarray(item[0], dtype=np.float32)).to(self.device)
        masks = np.asarray(item[2], dtype=np.float32)
        lesions = find_lesions(masks, np.asarray(item[3], dtype=np.float32),
                               merge_px=max(1, min(self.cfg.crop_size) // 8))
        crops, targets = sample_lesion_crops(volume, torch.from_numpy(masks).to(self.device),
                                             lesions, self.cfg.crop_size, self.cfg.zeta,
                                             self.generator)
        self.lesion_batch.append((crops, targets))
        if not sync:
            return 0.0
        items = len(self.lesion_batch)
        crops = torch.cat([c for c, _ in self.lesion_batch])
        targets = torch.cat([t for _, t in self.lesion_batch])
        self.lesion_batch = []
        if crops.shape[0] < 2:  # batch norm needs two crops; nothing to learn from here
            return 0.0
        with self._autocast():
            _, _, logits = self.model.local_prediction(crops)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets,
                                                  reduction="none").mean(dim=0).sum()
        self.scaler.scale(loss).backward()
        return float(loss.detach()) * items

    def _optimizer_step(self) -> None:
        if self.settings.lesion_crops and all(p.grad is None
                                              for p in self.model.local_parameters()):
            self.global_step += 1  # a step without crops to learn from (no lesion, no breast)
            return
        if self.grad_hook is not None:
            self.scaler.unscale_(self.optimizer)
            self.grad_hook(self.model)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _validate(self) -> dict[str, float | None]:
        """Every process scores its share of the validation set; all get the AUCs."""
        names: dict[torch.dtype | None, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        dtype = names.get(self.amp_dtype, "fp32")
        share = range(self.dist.rank, len(self.val_set), self.world)
        labels, scores = validation_scores(self.model, self.val_set, self.device, dtype, share)
        if self.dist.active:
            parts: list[Any] = [None] * self.world
            dist.all_gather_object(parts, (labels, scores))
            labels = np.concatenate([p[0] for p in parts])
            scores = np.concatenate([p[1] for p in parts])
        return {"val_auc_malignant": _safe_auc(labels[:, MALIGNANT], scores[:, MALIGNANT]),
                "val_auc_benign": _safe_auc(labels[:, BENIGN], scores[:, BENIGN])}

    def _broadcast(self, value: Any) -> Any:
        if not self.dist.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _epoch_checkpoint(self, record: dict[str, Any], improved: bool) -> None:
        meta = {**self.meta, "epoch": record["epoch"],
                "val_auc_malignant": record["val_auc_malignant"],
                "val_auc_benign": record["val_auc_benign"]}
        save_checkpoint(self.out_dir / f"epoch_{record['epoch']:03d}.pt", self.model, meta)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", self.model, meta)
        with open(self.out_dir / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def _out_of_time(self, run_started: float) -> bool:
        """max_seconds of this run have passed (rank 0's clock decides for all)."""
        if not self.settings.max_seconds:
            return False
        over = self._broadcast(time.monotonic() - run_started > self.settings.max_seconds)
        if over:
            log.info("event=train_time_budget seconds=%.0f epoch=%d step=%d",
                     self.settings.max_seconds, self.epoch + 1, self.step_in_epoch)
        return over

    def _checkpoint_partial(self, fraction: float) -> None:
        """The time ran out mid-epoch: validate and checkpoint the weights so far (best.pt
        too if better), so a time-boxed run always leaves its best model. The epoch itself
        stays open: the resumable state goes on from this step."""
        record = {"epoch": self.epoch + 1, "partial": round(fraction, 4), "step": self.global_step,
                  "train_loss": self.epoch_loss_sum / max(self.epoch_items, 1),
                  "learning_rate": self.settings.learning_rate, **self._validate()}
        record = self._broadcast(record)
        auc = record["val_auc_malignant"]
        improved = auc is not None and auc > self.best_auc
        if improved:
            self.best_auc, self.best_epoch = auc, record["epoch"]
        record["best_epoch"] = self.best_epoch
        if self.dist.is_main:
            self._epoch_checkpoint(record, improved)
            log.info("event=train_partial_epoch %s",
                     " ".join(f"{k}={v}" for k, v in record.items()))
        self.model.train()

    def run(self) -> TrainResult:
        s = self.settings
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.load_state()
        steps_this_run = 0
        run_started = time.monotonic()
        stopped_early = self.bad_epochs >= s.patience
        while self.epoch < s.epochs and not stopped_early:
            order = self._order(self.epoch)
            self.model.train()
            bar = ProgressBar(len(order), f"epoch {self.epoch + 1}/{s.epochs}",
                              s.progress and self.dist.is_main)
            started = time.monotonic()
            images_before = self.epoch_items
            pos = self.step_in_epoch
            while pos < len(order):
                chunk = order[pos:pos + self.accum]
                for j, index in enumerate(chunk):
                    loss = self._micro_step(index, sync=j == len(chunk) - 1)
                    self.epoch_loss_sum += loss
                    self.epoch_items += 1
                self._optimizer_step()
                pos += len(chunk)
                self.step_in_epoch = pos
                steps_this_run += 1
                bar.update(pos, self.epoch_loss_sum / max(self.epoch_items, 1),
                           (self.epoch_items - images_before) * self.world)
                if s.checkpoint_every_steps and self.global_step % s.checkpoint_every_steps == 0:
                    self.save_state()
                if s.max_steps and steps_this_run >= s.max_steps and pos < len(order):
                    bar.close()
                    self.save_state()
                    return self._result(stopped_early, interrupted=True)
                if pos < len(order) and self._out_of_time(run_started):
                    bar.close()
                    self._checkpoint_partial(pos / len(order))
                    self.save_state()
                    return self._result(stopped_early, interrupted=True)
            bar.update(len(order), self.epoch_loss_sum / max(self.epoch_items, 1),
                       (self.epoch_items - images_before) * self.world, force=True)
            bar.close()
            seconds = time.monotonic() - started
            record = {"epoch": self.epoch + 1, "step": self.global_step,
                      "train_loss": self.epoch_loss_sum / max(self.epoch_items, 1),
                      "train_seconds": round(seconds, 3),
                      "images_per_second": round((self.epoch_items - images_before)
                                                 * self.world / max(seconds, 1e-9), 3),
                      "learning_rate": s.learning_rate, **self._validate()}
            record = self._broadcast(record)  # rank 0's loss and timings for everyone
            auc = record["val_auc_malignant"]
            improved = auc is not None and auc > self.best_auc
            if improved:
                self.best_auc, self.best_epoch, self.bad_epochs = auc, record["epoch"], 0
            else:
                self.bad_epochs += 1
            record["best_epoch"] = self.best_epoch
            self.history.append(record)
            if self.dist.is_main:
                self._epoch_checkpoint(record, improved)
                log.info("event=train_epoch %s", " ".join(f"{k}={v}" for k, v in record.items()))
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_loss_sum, self.epoch_items = 0.0, 0
            stopped_early = self.bad_epochs >= s.patience
            self.save_state()
            if s.max_steps and steps_this_run >= s.max_steps and self.epoch < s.epochs:
                return self._result(stopped_early, interrupted=True)
            if self.epoch < s.epochs and not stopped_early and self._out_of_time(run_started):
                return self._result(stopped_early, interrupted=True)
        return self._result(stopped_early)

    def _result(self, stopped_early: bool, interrupted: bool = False) -> TrainResult:
        return TrainResult(best_epoch=self.best_epoch,
                           best_auc=self.best_auc if self.best_epoch else float("nan"),
                           epochs_run=self.epoch, stopped_early=stopped_early,
                           history=list(self.history), interrupted=interrupted)


__all__ = ["DistInfo", "LabelledVolumes", "TrainError", "TrainResult", "TrainSettings",
           "Trainer", "init_distributed", "validation_scores"]
