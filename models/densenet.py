"""DenseNet-201 (Huang et al., 2017), with torchvision's layout: 20,013,928 parameters at
1000 classes (growth rate 32, blocks of 6, 12, 48 and 32 layers, 4x bottleneck, compression 0.5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The stem's strided convolution and pool are padded, but the three transitions' unpadded 2x2
# average pools need a side of at least 8 after the stem, which takes an input side of 29.
MIN_IMAGE_SIZE = 29


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to `bn_size * growth` channels, BN-ReLU-3x3 conv to `growth` new channels."""

    def __init__(self, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleList):
    """`num_layers` dense layers, each fed the concatenation of the block input and all earlier outputs."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bn_size: int) -> None:
        super().__init__(
            DenseLayer(in_channels + i * growth, growth, bn_size) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv that halves the channels, then a 2x2 average pool that halves the side."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """Stem, dense blocks joined by transitions, final batch norm, global pool, classifier."""

    def __init__(
        self,
        block_config: tuple[int, ...],
        growth: int = 32,
        init_channels: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(3, init_channels, 7, stride=2, padding=3, bias=False)
        )
        self.features.add_module("norm0", nn.BatchNorm2d(init_channels))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        channels = init_channels
        for i, num_layers in enumerate(block_config):
            self.features.add_module(
                f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth, bn_size)
            )
            channels += num_layers * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def densenet201(num_classes: int = 1000) -> DenseNet:
    """DenseNet-201: dense blocks of 6, 12, 48 and 32 layers."""
    return DenseNet((6, 12, 48, 32), num_classes=num_classes)
