"""VGG-16 (Simonyan & Zisserman, 2015), configuration D without batch norm, as torchvision's
``vgg16``: 138,357,544 parameters at 1000 classes.
"""

from __future__ import annotations

import torch
from torch import nn

# Five unpadded 2x2 max pools halve the side five times: 32 -> 1; 31 would reach 0.
MIN_IMAGE_SIZE = 32

# Output channels of each 3x3 convolution; "M" is a 2x2 max pool.
VGG16_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


class VGG(nn.Module):
    """Convolutions and pools from `layers`, a 7x7 adaptive pool, then three fully connected layers.

    The adaptive pool makes the classifier 25088 -> 4096 -> 4096 -> classes whatever the input
    size, so small test inputs keep the full parameter count.
    """

    def __init__(
        self, layers: tuple[int | str, ...], num_classes: int = 1000, dropout: float = 0.5
    ) -> None:
        super().__init__()
        features: list[nn.Module] = []
        in_channels = 3
        for spec in layers:
            if spec == "M":
                features.append(nn.MaxPool2d(2, stride=2))
            else:
                features += [nn.Conv2d(in_channels, int(spec), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(spec)
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG-16: thirteen 3x3 convolutions in five blocks and three fully connected layers."""
    return VGG(VGG16_LAYERS, num_classes)
