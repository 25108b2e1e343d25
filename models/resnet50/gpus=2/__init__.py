"""resnet50 in 2 stage(s) on 2 rank(s), written by the partitioner:

    python -m pipedap.tools.partition --model resnet50 -b 8 --image-size 224 --workers 2 --bandwidth 250mbit --parallelism pipeline --costs models/resnet50/gpus=2/partition.json --out models/resnet50/gpus=2

stage 0: modules 0-9 (conv1 .. layer2.3), 1 rank(s), 2.058 s per minibatch (compute 2.058 s)
  boundary 0 -> 1: 12.8 MB each way, 0.822 s per minibatch
stage 1: modules 10-21 (layer3.0 .. fc), 1 rank(s), 1.996 s per minibatch (compute 1.996 s)
pipeline: 2.058 s per minibatch, bound by the slowest stage or boundary
1F1B: the transfers outlast what PipeDream's count of minibatches in flight covers; run main_with_runtime.py with --extra-in-flight 1 to hide them (one more update of staleness each)

Regenerate rather than edit. ``model(criterion)`` returns PipeDream's stage list:
[(stage module, input names, output names), ..., (criterion, [last output], ["loss"])].
"""

from models.sequential import stage_modules

MODEL = 'resnet50'
STAGES = [
    [
        "conv1",
        "bn1",
        "maxpool",
        "layer1.0",
        "layer1.1",
        "layer1.2",
        "layer2.0",
        "layer2.1",
        "layer2.2",
        "layer2.3"
    ],
    [
        "layer3.0",
        "layer3.1",
        "layer3.2",
        "layer3.3",
        "layer3.4",
        "layer3.5",
        "layer4.0",
        "layer4.1",
        "layer4.2",
        "avgpool",
        "flatten",
        "fc"
    ]
]


def arch() -> str:
    return MODEL


def model(criterion, **kwargs):
    """The stage modules, then ``criterion``; ``kwargs`` go to ``models.get`` (e.g. num_classes)."""
    return stage_modules(MODEL, STAGES, criterion, **kwargs)
