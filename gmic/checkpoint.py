"""Saving and loading model weights.

Two formats load:
- the project's own: {"format": "dicomnode-gmic", "format_version": 1, "config": {...},
  "state_dict": {...}, "meta": {...}}, which rebuilds the model it was saved from;
- a published 3D-GMIC / GMIC state dict (keys ds_net..., dn_resnet..., mil_attn_...,
  optionally under "model" and/or prefixed "module."), loaded into a model built from a
  configuration the caller gives.

The published weights are under NYU's non-commercial, no-redistribution licence: users
bring their own copy; the project never bundles them.

Files are read with torch.load(weights_only=True): tensors and plain containers only, so
a crafted file cannot run code. Keys must match exactly (strict loading).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gmic.model import GMIC
from gmic.model_config import GMICConfig, GMICConfigError

FORMAT = "dicomnode-gmic"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | Path, model: GMIC, meta: Mapping[str, Any] | None = None,
                    *, half: bool = False) -> None:
    """Write model weights with its configuration (atomically: temp file, then rename).

    half stores floating-point tensors as float16 (half the size, for weights shipped in
    the package); they are loaded back into the float32 model.
    """
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw contents, loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - junk files raise anything (KeyError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a loadable weights-only torch checkpoint ({first}); "
            "only files holding tensors and plain containers are accepted") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(data).__name__}")
    return data


def load_checkpoint(path: str | Path, config: GMICConfig | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[GMIC, dict[str, Any]]:
    """Build a model from a checkpoint file; returns (model in eval mode, meta).

    For the project's format the stored configuration is used (config, if given, must
    describe the same architecture). A published state dict needs `config` (default:
    GMICConfig.dbt()).
    """
    path = Path(path)
    data = read_checkpoint(path)
    meta: dict[str, Any] = {}
    stored = _stored_config(data, path)
    if stored is not None:
        cfg = stored if config is None else config
        state = data.get("state_dict")
        meta = dict(data.get("meta") or {})
    else:
        cfg = config or GMICConfig.dbt()
        state = data.get("model", data)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: no state dict found")
    model = GMIC(cfg)
    load_state_dict_strict(model, state, path)
    return model.to(map_location).eval(), meta


def checkpoint_config(path: str | Path) -> GMICConfig | None:
    """The configuration a project checkpoint was saved with; None for a published state
    dict, which carries none (its architecture is whatever the caller says)."""
    return _stored_config(read_checkpoint(path), Path(path))


def _stored_config(data: Mapping[str, Any], path: Path) -> GMICConfig | None:
    if "format" not in data:
        return None
    if data["format"] != FORMAT:
        raise CheckpointError(f"{path}: format {data['format']!r} is not {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported "
                              f"(this version reads {FORMAT_VERSION})")
    try:
        return GMICConfig.from_dict(dict(data["config"]))
    except (KeyError, TypeError, GMICConfigError) as exc:
        raise CheckpointError(f"{path}: bad configuration in checkpoint: {exc}") from exc


def load_state_dict_strict(model: GMIC, state: Mapping[str, Tensor], source: str | Path) -> None:
    """Load with exact key and shape matching; `module.` prefixes (DataParallel) dropped."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - _optional_keys(expected))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected)
                   if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} keys with wrong shapes (first: {k} is "
                        f"{tuple(state[k].shape)}, model has {tuple(expected[k].shape)})")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the GMIC architecture: "
                              + "; ".join(problems))
    # float16-stored weights go back to the model's own dtype
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _optional_keys(expected: Mapping[str, Tensor]) -> set[str]:
    # Checkpoints written before PyTorch 0.4.1 lack BatchNorm's step counter;
    # load_state_dict fills it in, so its absence is not an error.
    return {k for k in expected if k.endswith("num_batches_tracked")}
