"""Checkpoints: our own format round trip, published key names, refusals."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from gmic.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gmic.model import GMIC
from gmic.model_config import GMICConfig


def _norm(prefix: str, channels: int, batchnorm: bool) -> dict[str, tuple[int, ...]]:
    keys = {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}
    if batchnorm:
        keys |= {f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
                 f"{prefix}.num_batches_tracked": ()}
    return keys


def published_keys() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a published 3D-GMIC checkpoint, written from the architecture facts
    (ResNet-22 with GroupNorm, 1x1 saliency conv, ResNet-18 local net, gated attention)."""
    keys: dict[str, tuple[int, ...]] = {"ds_net.first_conv.weight": (16, 1, 7, 7)}
    in_ch = 16
    for stage in range(5):
        out = 16 * 2 ** stage
        for block in range(2):
            cin = in_ch if block == 0 else out
            p = f"ds_net.layer_list.{stage}.{block}"
            keys |= _norm(f"{p}.bn1", cin, False)
            keys[f"{p}.conv1.weight"] = (out, cin, 3, 3)
            keys |= _norm(f"{p}.bn2", out, False)
            keys[f"{p}.conv2.weight"] = (out, out, 3, 3)
            if block == 0:
                keys[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
        in_ch = out
    keys |= _norm("ds_net.final_bn", 256, False)
    keys["left_postprocess_net.gn_conv_last.weight"] = (2, 256, 1, 1)
    keys["dn_resnet.conv1.weight"] = (64, 3, 7, 7)
    keys |= _norm("dn_resnet.bn1", 64, True)
    in_ch = 64
    for layer in range(4):
        out = 64 * 2 ** layer
        for block in range(2):
            cin = in_ch if block == 0 else out
            p = f"dn_resnet.layer{layer + 1}.{block}"
            keys[f"{p}.conv1.weight"] = (out, cin, 3, 3)
            keys |= _norm(f"{p}.bn1", out, True)
            keys[f"{p}.conv2.weight"] = (out, out, 3, 3)
            keys |= _norm(f"{p}.bn2", out, True)
            if block == 0 and layer > 0:
                keys[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                keys |= _norm(f"{p}.downsample.1", out, True)
        in_ch = out
    keys |= {"mil_attn_V.weight": (128, 512), "mil_attn_U.weight": (128, 512),
             "mil_attn_w.weight": (1, 128), "classifier_linear.weight": (2, 512)}
    return keys


PUBLISHED = published_keys()


def _published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.tensor(5) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=gen)) for k, shape in PUBLISHED.items()}


def test_model_keys_are_the_published_keys() -> None:
    state = GMIC(GMICConfig.dbt()).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == PUBLISHED


@pytest.mark.parametrize("wrap", ["raw", "model", "module"])
def test_published_state_dict_loads_strictly(tmp_path: Path, wrap: str) -> None:
    state = _published_state()
    if wrap == "module":  # saved from DataParallel
        payload: dict = {f"module.{k}": v for k, v in state.items()}
    elif wrap == "model":
        payload = {"model": state}
    else:
        payload = state
    path = tmp_path / "published.p"
    torch.save(payload, path)
    model, meta = load_checkpoint(path, GMICConfig.dbt())
    assert meta == {}
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_published_state_without_batchnorm_counters_loads(tmp_path: Path) -> None:
    state = {k: v for k, v in _published_state().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.p")
    load_checkpoint(tmp_path / "old.p")


def test_round_trip_keeps_weights_config_and_meta(tmp_path: Path) -> None:
    cfg = GMICConfig.dbt(input_size=(256, 192), crop_size=(64, 64), num_crops=3, zeta=5)
    torch.manual_seed(1)
    model = GMIC(cfg).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, meta={"epoch": 3, "auc": 0.81})
    loaded, meta = load_checkpoint(path)
    assert loaded.cfg == cfg and meta == {"epoch": 3, "auc": 0.81}
    x = torch.randn(3, 256, 192)
    with torch.no_grad():
        assert torch.equal(model(x).y, loaded(x).y)
    assert not (tmp_path / "m.pt.tmp").exists()


def test_narrow_model_stored_half_loads_as_float32(tmp_path: Path) -> None:
    cfg = GMICConfig.s2d(input_size=(256, 192), crop_size=(64, 64), num_crops=3, local_width=16)
    torch.manual_seed(2)
    model = GMIC(cfg).eval()
    assert model.classifier_linear.in_features == 128  # S = 8 x local_width
    full, half = tmp_path / "full.pt", tmp_path / "half.pt"
    save_checkpoint(full, model)
    save_checkpoint(half, model, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert loaded.cfg.local_width == 16
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randn(1, 256, 192)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    # float16 keeps about 3 significant digits of each weight
    assert torch.allclose(a.y, b.y, atol=2e-2)
    assert not torch.equal(model.dn_resnet.conv1.weight, loaded.dn_resnet.conv1.weight)


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state = _published_state()
    del state["mil_attn_w.weight"]
    state["fusion_dnn.weight"] = torch.zeros(2, 2)
    state["classifier_linear.weight"] = torch.zeros(3, 512)
    torch.save(state, tmp_path / "bad.p")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.p")
    msg = str(err.value)
    assert "bad.p" in msg and "mil_attn_w.weight" in msg and "fusion_dnn.weight" in msg
    assert "classifier_linear.weight is (3, 512)" in msg


def test_wrong_format_and_version(tmp_path: Path) -> None:
    model = GMIC(GMICConfig.dbt())
    save_checkpoint(tmp_path / "m.pt", model)
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**data, "format_version": 99}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="v99.pt: format_version 99"):
        load_checkpoint(tmp_path / "v99.pt")
    torch.save({**data, "format": "other"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format 'other'"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt: not a loadable weights-only"):
        load_checkpoint(path)
