"""Off-the-shelf baselines of paper Table I, for the computational benchmark only.

ResNet-18/34 (He et al.) applied to every slice, and 3D ResNet-18/34 (Hara et al.) applied
to the whole volume. Each maps one volume (D, H, W) to two probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gmic.networks import ResNetTrunk

RESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class SliceResNet(nn.Module):
    """A 2D ResNet on every slice (3 channels: the slice repeated, as ImageNet ResNets
    take), average-pooled per slice, max over slices, then a linear classifier."""

    def __init__(self, depth: int = 18, num_classes: int = 2) -> None:
        super().__init__()
        self.trunk = ResNetTrunk(RESNET_LAYERS[depth], in_channels=3)
        self.fc = nn.Linear(self.trunk.out_channels, num_classes)

    def forward(self, volume: Tensor) -> Tensor:
        x = volume.unsqueeze(1).expand(-1, 3, -1, -1)
        features = self.trunk(x).mean(dim=(2, 3)).amax(dim=0)
        return torch.sigmoid(self.fc(features))


class BasicBlock3d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:  # shortcut type B: projection
            self.downsample = nn.Sequential(nn.Conv3d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm3d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


class ResNet3d(nn.Module):
    """3D ResNet of Hara et al.: 7x7x7 conv with stride (1, 2, 2), 3x3x3 max-pool stride 2,
    four stages of 3D basic blocks; one input channel (the volume)."""

    def __init__(self, depth: int = 18, num_classes: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, kernel_size=7, stride=(1, 2, 2), padding=3,
                               bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        stages, in_ch = [], 64
        for i, n in enumerate(RESNET_LAYERS[depth]):
            out_ch = 64 * 2 ** i
            blocks = [BasicBlock3d(in_ch, out_ch, 1 if i == 0 else 2)]
            blocks += [BasicBlock3d(out_ch, out_ch) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, volume: Tensor) -> Tensor:
        x = volume[None, None]  # (1, 1, D, H, W)
        x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))[0]))


BASELINES = {
    "ResNet-18": lambda: SliceResNet(18),
    "ResNet-34": lambda: SliceResNet(34),
    "3D ResNet-18": lambda: ResNet3d(18),
    "3D ResNet-34": lambda: ResNet3d(34),
}


def build_baseline(name: str) -> nn.Module:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return BASELINES[name]()
