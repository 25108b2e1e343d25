"""VGG-16 as PipeDream's stage modules: four pieces and the loss, for the configs beside this file.

    package = importlib.import_module("models.vgg16.gpus=2")
    modules = package.model(nn.CrossEntropyLoss())   # blocks 1-2, block 3, block 4, block 5 + classifier, loss

``mp_conf.json`` puts blocks 1-3 on rank 0 (about 60% of the convolutions'
work) and the rest with the loss on rank 1 (the boundary carries block 3's
256 x 28 x 28 output at 224 x 224); ``dp_conf.json`` runs everything on ranks 0
and 1; ``hybrid_conf.json`` replicates stage 0 on ranks 0 and 1 before stage 1
on rank 2. The pieces share the modules (and weights) of one
``models.get("vgg16")``, so they compute what it computes.
"""

from __future__ import annotations

from torch import nn

import models

CUTS = (10, 17, 24)  # VGG.features indices just after the 2nd, 3rd and 4th max pool


def arch() -> str:
    return "vgg16"


def model(criterion: nn.Module, **kwargs) -> list[nn.Module]:
    """The stage modules, then ``criterion``; ``kwargs`` go to ``models.get`` (e.g. num_classes)."""
    net = models.get("vgg16", **kwargs)
    f, (a, b, c) = net.features, CUTS
    return [f[:a], f[a:b], f[b:c], nn.Sequential(f[c:], net.avgpool, nn.Flatten(1), net.classifier), criterion]
