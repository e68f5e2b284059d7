"""Which model weights the node runs per modality, loaded once and kept."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode import __version__
from dicomnode.errors import DicomnodeError
from dicomnode.ops.logs import kv
from dicomnode.pipeline.analysis import AlgorithmIdentity

if TYPE_CHECKING:
    import torch

    from dicomnode.config import ModelConfig
    from gmic.model import GMIC

log = logging.getLogger("dicomnode.models")

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "weights"
BUILTIN_DESCRIPTION = "trained on synthetic phantoms; not for clinical use"
DISABLED = ("", "none", "off")


class ModelUnavailable(DicomnodeError):
    """No usable weights for a modality; the message says which setting to change."""


@dataclass
class LoadedModel:
    model: GMIC
    identity: AlgorithmIdentity
    device: torch.device


def resolve_device(spec: str) -> torch.device:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelUnavailable(f"[model] device = {spec!r} is not a device; use auto, cpu, "
                               "cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"[model] device = {spec!r} but no CUDA GPU is available; use "
                               "auto or cpu")
    return device


def checkpoint_path(modality: str, spec: str) -> Path | None:
    """The file configured for a modality, or None when the modality is switched off."""
    if spec.strip().lower() in DISABLED:
        return None
    if spec == "builtin":
        path = BUILTIN_DIR / f"{modality}.pt"
        if not path.is_file():
            raise ModelUnavailable(
                f"no built-in {modality} weights are installed in this version of dicomnode; "
                f"set [model] {modality} = \"/path/to/checkpoint.pt\" (or \"none\" to skip "
                f"{modality} images)")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"[model] {modality} = {spec!r}: no such checkpoint file; fix "
                               "the path")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def algorithm_identity(modality: str, path: Path, meta: dict, *, builtin: bool = False,
                       test_time_augmentations: int = 0, augment_px: int = 0,
                       whole_breast: bool = True) -> AlgorithmIdentity:
    """Which model a checkpoint file is, as written into every result object."""
    return AlgorithmIdentity(
        name="3D-GMIC" if modality == "dbt" else "GMIC",
        version=__version__,
        checkpoint_name=f"builtin:{modality}" if builtin else path.name,
        checkpoint_sha256=_sha256(path),
        description=str(meta.get("description") or (BUILTIN_DESCRIPTION if builtin else "")),
        test_time_augmentations=test_time_augmentations,
        augment_px=augment_px if test_time_augmentations else 0,
        whole_breast=whole_breast,
    )


class ModelRegistry:
    """Loads each modality's model on first use (thread-safe) and keeps it."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._loaded: dict[str, LoadedModel | None] = {}
        self._lock = threading.Lock()
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = resolve_device(self.config.device)
        return self._device

    def loaded_devices(self) -> dict[str, str]:
        """{modality: device} of the models loaded so far. A copy taken without the lock
        (which is held while a model loads), so status reporting never waits on a load."""
        return {m: str(lm.device) for m, lm in dict(self._loaded).items() if lm is not None}

    @property
    def resolved_device(self) -> str | None:
        """The device once a model has needed it, else None (nothing probed yet)."""
        return None if self._device is None else str(self._device)

    def spec(self, modality: str) -> str:
        return str(getattr(self.config, modality))

    def get(self, modality: str) -> LoadedModel | None:
        """The model for a modality, None when configured off; raises ModelUnavailable."""
        with self._lock:
            if modality not in self._loaded:
                self._loaded[modality] = self._load(modality)
            return self._loaded[modality]

    def _load(self, modality: str) -> LoadedModel | None:
        from gmic.checkpoint import CheckpointError, load_checkpoint

        path = checkpoint_path(modality, self.spec(modality))
        if path is None:
            return None
        try:
            model, meta = load_checkpoint(path, map_location=self.device)
        except CheckpointError as exc:
            raise ModelUnavailable(f"[model] {modality}: {exc}") from None
        if model.cfg.modality != modality:
            raise ModelUnavailable(
                f"[model] {modality} = {path}: the checkpoint is a {model.cfg.modality} model; "
                f"name a {modality} checkpoint")
        builtin = self.spec(modality) == "builtin"
        identity = algorithm_identity(
            modality, path, meta, builtin=builtin,
            test_time_augmentations=self.config.test_time_augmentations,
            augment_px=self.config.augment_px, whole_breast=self.config.whole_breast)
        log.info("event=model_loaded %s", kv(modality=modality, checkpoint=identity.checkpoint_name,
                                             sha256=identity.checkpoint_sha256[:12],
                                             device=str(self.device)))
        return LoadedModel(model.eval(), identity, self.device)
