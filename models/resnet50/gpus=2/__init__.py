"""ResNet-50 as PipeDream's stage modules: four pieces and the loss, for the configs beside this file.

    package = importlib.import_module("models.resnet50.gpus=2")
    modules = package.model(nn.CrossEntropyLoss())   # stem + layer1, layer2, layer3, layer4 + head, loss

``mp_conf.json`` puts pieces 0-1 on rank 0 and pieces 2-3 with the loss on rank 1
(the boundary carries layer2's 512 x 28 x 28 output at 224 x 224); ``dp_conf.json``
runs everything on ranks 0 and 1; ``hybrid_conf.json`` replicates stage 0 on
ranks 0 and 1 before stage 1 on rank 2. The pieces share the modules (and
weights) of one ``models.get("resnet50")``, so they compute what it computes.
"""

from __future__ import annotations

from torch import nn

import models


def arch() -> str:
    return "resnet50"


def model(criterion: nn.Module, **kwargs) -> list[nn.Module]:
    """The stage modules, then ``criterion``; ``kwargs`` go to ``models.get`` (e.g. num_classes)."""
    net = models.get("resnet50", **kwargs)
    return [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1), net.layer2, net.layer3,
            nn.Sequential(net.layer4, net.avgpool, nn.Flatten(1), net.fc), criterion]
