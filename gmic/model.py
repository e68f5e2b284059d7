"""3D-GMIC (paper V-A) and 2D GMIC (V-D.2, the same model on one slice)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gmic.augment import shift_resize
from gmic.model_config import GMICConfig
from gmic.networks import GlobalResNet22, ResNetTrunk, SaliencyHead, gated_attention
from gmic.roi import (
    crop_window_on_map,
    extract_crops,
    map_to_image_positions,
    retrieve_roi_from_3d_image,
    top_t_aggregate,
)


@dataclass
class GMICOutput:
    """Everything later steps (loss, reports, SR/SEG/PM) use from one forward pass.

    Shapes are for one volume; a batched call adds a leading batch dimension to each.
    crop_positions are top-left (slice, row, col) in model-input pixels; crop_source_slices
    is the slice each crop's window was found on before training-time sampling.
    """

    y: Tensor  # (C,) final prediction, (y_global + y_local) / 2
    y_global: Tensor  # (C,)
    y_local: Tensor  # (C,)
    saliency: Tensor  # (D, C, h, w), values in [0, 1]
    crop_positions: Tensor  # (K, 3) long
    crop_source_slices: Tensor  # (K,) long
    attention: Tensor  # (K,)
    crop_logits: Tensor  # (K, C) the local classifier on each crop alone (for crop_mask_loss)

    @staticmethod
    def stack(outputs: list[GMICOutput]) -> GMICOutput:
        return GMICOutput(**{f.name: torch.stack([getattr(o, f.name) for o in outputs])
                             for f in fields(GMICOutput)})


class GMIC(nn.Module):
    """3D-GMIC. Call on one volume (D, H, W) or a batch (B, D, H, W); a 2D image is D = 1.

    The global network runs over slices in chunks of cfg.slice_chunk, so inference memory
    does not grow with D beyond the saliency maps; in training each chunk is recomputed in
    backward (activation checkpointing) when cfg.activation_checkpointing is set.
    """

    def __init__(self, cfg: GMICConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GMICConfig.dbt()
        self.ds_net = GlobalResNet22(norm_groups=cfg.norm_groups)
        self.left_postprocess_net = SaliencyHead(self.ds_net.out_channels, cfg.num_classes,
                                                 cfg.saliency_init_w)
        self.dn_resnet = ResNetTrunk((2, 2, 2, 2), in_channels=3, width=cfg.local_width)
        self.mil_attn_V = nn.Linear(cfg.local_features, cfg.attention_dim, bias=False)
        self.mil_attn_U = nn.Linear(cfg.local_features, cfg.attention_dim, bias=False)
        self.mil_attn_w = nn.Linear(cfg.attention_dim, 1, bias=False)
        self.classifier_linear = nn.Linear(cfg.local_features, cfg.num_classes, bias=False)
        self.slice_chunk = cfg.slice_chunk  # may be changed at run time (benchmarks)

    # -- global module ----------------------------------------------------------------
    def _saliency_of(self, slices: Tensor) -> Tensor:
        return self.left_postprocess_net(self.ds_net(slices))

    def saliency_maps(self, volume: Tensor, slice_chunk: int | None = None) -> Tensor:
        """(D, H, W) -> saliency (D, C, h, w), computed slice_chunk slices at a time."""
        chunk = self.slice_chunk if slice_chunk is None else slice_chunk
        x = volume.unsqueeze(1)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if chunk <= 0 or chunk >= x.shape[0]:
            chunks = [x]
        else:
            chunks = list(x.split(chunk))
        recompute = (self.training and torch.is_grad_enabled()
                     and self.cfg.activation_checkpointing)
        maps = [checkpoint(self._saliency_of, c, use_reentrant=False) if recompute
                else self._saliency_of(c) for c in chunks]
        return maps[0] if len(maps) == 1 else torch.cat(maps)

    # -- local module -----------------------------------------------------------------
    def local_prediction(self, crops: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(K, 1, ch, cw) crops -> y_local (C,), attention (K,) and the classifier's logits
        on each crop alone (K, C): y_local classifies the attention-weighted mean feature."""
        x = crops.expand(-1, 3, -1, -1)  # the local ResNet-18 takes 3 channels
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.dn_resnet(x).mean(dim=(2, 3))  # global average pool -> (K, S)
        z, attention = gated_attention(h, self.mil_attn_V, self.mil_attn_U, self.mil_attn_w)
        return torch.sigmoid(self.classifier_linear(z)), attention, self.classifier_linear(h)

    def local_parameters(self) -> list[nn.Parameter]:
        """The local module's weights: the ResNet-18 on crops, attention and classifier."""
        return [p for m in (self.dn_resnet, self.mil_attn_V, self.mil_attn_U, self.mil_attn_w,
                            self.classifier_linear) for p in m.parameters()]

    # -- whole model ------------------------------------------------------------------
    def forward(self, x: Tensor, slice_chunk: int | None = None,
                generator: torch.Generator | None = None) -> GMICOutput:
        if x.dim() == 4:
            return GMICOutput.stack([self._forward_one(v, slice_chunk, generator) for v in x])
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"GMIC expects (D, H, W) or (B, D, H, W), got shape {tuple(x.shape)}")
        return self._forward_one(x, slice_chunk, generator)

    def _forward_one(self, volume: Tensor, slice_chunk: int | None,
                     generator: torch.Generator | None) -> GMICOutput:
        cfg = self.cfg
        saliency = self.saliency_maps(volume, slice_chunk).float()
        image_size = (int(volume.shape[-2]), int(volume.shape[-1]))
        # t is relative to the trained input's area: an input larger than cfg.input_size (the
        # whole breast of a larger image) pools the same number of voxels (paper eq. 3 at a
        # fixed input size).
        area = image_size[0] * image_size[1]
        trained = cfg.input_size[0] * cfg.input_size[1]
        y_global = top_t_aggregate(saliency, cfg.percent_t, min(1.0, trained / area))

        map_size = (int(saliency.shape[-2]), int(saliency.shape[-1]))
        window = crop_window_on_map(cfg.crop_size, image_size, map_size)
        selection = retrieve_roi_from_3d_image(saliency, cfg.num_crops, window, cfg.zeta,
                                               sample_slices=self.training,
                                               generator=generator)
        positions = map_to_image_positions(selection, image_size, map_size, cfg.crop_size)
        crops = extract_crops(volume.detach(), positions, cfg.crop_size)
        y_local, attention, crop_logits = self.local_prediction(crops)
        y_local = y_local.float()
        return GMICOutput(
            y=(y_global + y_local) / 2, y_global=y_global, y_local=y_local,
            saliency=saliency, crop_positions=positions.to(volume.device),
            crop_source_slices=selection.source_slices.to(volume.device),
            attention=attention.float(), crop_logits=crop_logits.float())

    # -- performance switches ------------------------------------------------------------
    _channels_last = False

    def use_channels_last(self, enabled: bool = True) -> GMIC:
        """Channels-last convolutions (faster with cuDNN under mixed precision)."""
        self._channels_last = enabled
        # torch's stubs for Module.to lack memory_format, which it takes (and documents)
        self.to(memory_format=torch.channels_last if enabled  # type: ignore[call-overload]
                else torch.contiguous_format)
        return self


GMIC3D = GMIC  # the 2D GMIC of paper V-D.2 is the same class applied to one slice


@contextlib.contextmanager
def precision(device: torch.device | str, dtype: str = "fp32") -> Iterator[None]:
    """Autocast for "bf16" or "fp16" (fp16 only on CUDA); "fp32" runs as is."""
    device = torch.device(device)
    if dtype == "fp32":
        yield
        return
    table = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {dtype!r}")
    if dtype == "fp16" and device.type != "cuda":
        raise ValueError("fp16 autocast needs a CUDA device; use bf16 on CPU")
    with torch.autocast(device_type=device.type, dtype=table[dtype]):
        yield


@torch.no_grad()
def predict(model: GMIC, volume: Tensor, dtype: str = "fp32",
            slice_chunk: int | None = None) -> GMICOutput:
    """Inference on one volume on the model's device, in eval mode, without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with precision(device, dtype):
            return model(volume.to(device, torch.float32), slice_chunk=slice_chunk)
    finally:
        model.train(was_training)


def predict_augmented(model: GMIC, volume: Tensor, copies: int, max_px: int, *,
                      seed: int = 0, dtype: str = "fp32") -> Tensor:
    """Mean prediction y (2,) over `copies` copies of the volume, each shifted and resized
    at random by up to max_px pixels (paper V-D.3: 10 copies at test time). The copies are
    drawn from `seed`, so an image always gets the same answer."""
    generator = torch.Generator().manual_seed(seed)
    ys = [predict(model, shift_resize(volume, max_px, generator), dtype).y.float().cpu()
          for _ in range(copies)]
    return torch.stack(ys).mean(dim=0)
