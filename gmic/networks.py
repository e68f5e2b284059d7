"""The building blocks of GMIC: the global ResNet-22, the saliency head, the local
ResNet-18 and gated attention.

Attribute names are chosen so that state_dict keys match the published 3D-GMIC
checkpoints (ds_net.first_conv, ds_net.layer_list.{stage}.{block}.bn1, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block (norm-ReLU-conv3x3-norm-ReLU-conv3x3).

    The shortcut, when present, is a 1x1 conv applied to the pre-activated input.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: bool,
                 norm_groups: int) -> None:
        super().__init__()
        self.bn1 = nn.GroupNorm(norm_groups, in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.GroupNorm(norm_groups, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU(inplace=True)
        # Sequential so that the key is downsample.0.weight, as in the published weights.
        self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride)) if shortcut else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        residual = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class GlobalResNet22(nn.Module):
    """The low-capacity global network f_g: 1 channel in, 256 channels at 1/64 resolution."""

    def __init__(self, norm_groups: int = 8, width: int = 16,
                 strides: tuple[int, ...] = (1, 2, 2, 2, 2), blocks: int = 2) -> None:
        super().__init__()
        self.first_conv = nn.Conv2d(1, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.first_pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
        self.layer_list = nn.ModuleList()
        in_ch = width
        for stage, stride in enumerate(strides):
            out_ch = width * 2 ** stage
            stage_blocks = [PreActBlock(in_ch, out_ch, stride, True, norm_groups)]
            stage_blocks += [PreActBlock(out_ch, out_ch, 1, False, norm_groups)
                             for _ in range(blocks - 1)]
            self.layer_list.append(nn.Sequential(*stage_blocks))
            in_ch = out_ch
        self.out_channels = in_ch
        self.final_bn = nn.GroupNorm(norm_groups, in_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first_pool(self.first_conv(x))
        for stage in self.layer_list:
            h = stage(h)
        return self.relu(self.final_bn(h))


class SaliencyHead(nn.Module):
    """1x1 conv (no bias) to one map per class, then ReLU(tanh(.)) (paper V-B.4).

    Initialised to a positive constant w so that whichever channel fires on a lesion
    raises the saliency; ReLU(tanh) keeps near-zero responses at zero.
    """

    def __init__(self, in_ch: int, num_classes: int, init_w: float) -> None:
        super().__init__()
        self.gn_conv_last = nn.Conv2d(in_ch, num_classes, kernel_size=1, bias=False)
        nn.init.constant_(self.gn_conv_last.weight, init_w)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(torch.tanh(self.gn_conv_last(h)))


class BasicBlock(nn.Module):
    """Post-activation basic block of ResNet-18/34 (BatchNorm)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class ResNetTrunk(nn.Module):
    """ResNet-18/34 without its classifier (conv1, bn1, layer1..layer4)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), in_channels: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = width
        for i, n in enumerate(layers):
            out_ch = width * 2 ** i
            blocks = [BasicBlock(in_ch, out_ch, 1 if i == 0 else 2)]
            blocks += [BasicBlock(out_ch, out_ch) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.num_layers = len(layers)
        self.out_channels = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


def gated_attention(h: Tensor, attn_v: nn.Linear, attn_u: nn.Linear,
                    attn_w: nn.Linear) -> tuple[Tensor, Tensor]:
    """Gated attention MIL pooling (Ilse et al., paper eq. 4-5) over the K crops.

    h: (K, S) crop features. Returns z (S,) and the attention weights a (K,).
    """
    scores = attn_w(torch.tanh(attn_v(h)) * torch.sigmoid(attn_u(h))).squeeze(-1)
    a = torch.softmax(scores.float(), dim=0).to(h.dtype)
    return (a.unsqueeze(-1) * h).sum(dim=0), a
