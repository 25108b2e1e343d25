"""The models that are a chain of modules, as that chain: what the pipeline partitioner cuts into stages.

``chain(name)`` returns ``[(label, module), ...]`` such that applying the modules in
order computes what ``models.get(name)`` computes, sharing its modules (and weights).
Blocks are the chain's entries (ResNet's bottlenecks, VGG's layers, DenseNet's dense
blocks and transitions, Inception's mixed blocks), so a stage boundary can fall between
any two of them. An in-place activation is kept with the module before it: a stage must
not start by overwriting the tensor it received (autograd forbids it on a leaf).

Language models are not chains here, and :func:`chain` says why (:data:`NOT_CHAINS`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import models

Chain = list[tuple[str, nn.Module]]

NOT_CHAINS = {
    "bert_base": "its output heads share the word embedding's weight (tied) and it returns two outputs for two "
                 "targets; a stage owns its parameters and passes one tensor on",
    "bert_large": "its output heads share the word embedding's weight (tied) and it returns two outputs for two "
                  "targets; a stage owns its parameters and passes one tensor on",
    "gpt2": "its language-model head shares the token embedding's weight (tied), so its first and last modules "
            "would have to be on one stage; a stage owns its parameters",
}


class NotAChainError(ValueError):
    """A model that cannot be cut into pipeline stages by this module."""


def _resnet(net: nn.Module) -> Chain:
    out: Chain = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu), ("maxpool", net.maxpool)]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        out += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(net, stage))]
    return out + [("avgpool", net.avgpool), ("flatten", nn.Flatten(1)), ("fc", net.fc)]


def _vgg(net: nn.Module) -> Chain:
    return ([(f"features.{i}", m) for i, m in enumerate(net.features)] + [("avgpool", net.avgpool),
            ("flatten", nn.Flatten(1))] + [(f"classifier.{i}", m) for i, m in enumerate(net.classifier)])


def _densenet(net: nn.Module) -> Chain:
    return ([(f"features.{name}", m) for name, m in net.features.named_children()]
            + [("relu", nn.ReLU()), ("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
               ("classifier", net.classifier)])


def _inception(net: nn.Module) -> Chain:
    return ([(f"features.{i}", m) for i, m in enumerate(net.features)]
            + [("avgpool", net.avgpool), ("flatten", nn.Flatten(1)), ("last_linear", net.last_linear)])


CHAINS: dict[str, Callable[[nn.Module], Chain]] = {
    "resnet50": _resnet, "vgg16": _vgg, "densenet201": _densenet, "inceptionv4": _inception,
}


def names() -> list[str]:
    """The models :func:`chain` can cut."""
    return sorted(CHAINS)


def chain(name: str, model: nn.Module | None = None, **kwargs) -> Chain:
    """``model`` (default: ``models.get(name, **kwargs)``) as a chain of labelled modules."""
    if name not in CHAINS:
        why = NOT_CHAINS.get(name)
        if why is None:
            raise NotAChainError(f"unknown model {name!r}; the chains are {', '.join(names())}")
        raise NotAChainError(f"{name} is not a chain of modules: {why}. The chains are {', '.join(names())}")
    return _keep_in_place_with_previous(CHAINS[name](model if model is not None else models.get(name, **kwargs)))


def _keep_in_place_with_previous(entries: Chain) -> Chain:
    """Each in-place module (``inplace=True``) joined to the entry before it, as one ``nn.Sequential``."""
    out: Chain = []
    for label, module in entries:
        if getattr(module, "inplace", False) and out:
            previous_label, previous = out[-1]
            body = list(previous) if isinstance(previous, _Joined) else [previous]
            out[-1] = (previous_label, _Joined(*body, module))
        else:
            out.append((label, module))
    return out


class _Joined(nn.Sequential):
    """A chain entry made of a module and the in-place activation after it."""


def stage_modules(name: str, stages: list[list[str]], criterion: nn.Module, **kwargs) -> list[tuple]:
    """PipeDream's stage list for ``name`` cut into ``stages`` (each a list of chain labels, in order).

    Returns ``[(stage_module, input_names, output_names), ..., (criterion, [last output], ["loss"])]``,
    the ``model(criterion)`` of PipeDream's generated packages; ``kwargs`` go to ``models.get``.
    """
    entries = chain(name, **kwargs)
    labels = [label for label, _ in entries]
    wanted = [label for stage in stages for label in stage]
    if wanted != labels:
        raise NotAChainError(f"the stages name the modules {_span(wanted)} but {name}'s chain is {_span(labels)}: "
                             "the model changed since the package was generated; regenerate it with "
                             "python -m pipedap.tools.partition")
    modules = iter(entries)
    out: list[tuple] = []
    for s, stage in enumerate(stages):
        body = nn.Sequential()
        for _ in stage:
            label, module = next(modules)
            body.add_module(label.replace(".", "_"), module)
        out.append((body, ["input0" if s == 0 else f"out{s - 1}"], [f"out{s}"]))
    return out + [(criterion, [f"out{len(stages) - 1}"], ["loss"])]


def _span(labels: list[str]) -> str:
    return f"{len(labels)} modules ({labels[0]} .. {labels[-1]})" if labels else "no modules"
