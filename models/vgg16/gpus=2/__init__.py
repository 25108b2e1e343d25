"""vgg16 in 2 stage(s) on 2 rank(s), written by the partitioner:

    python -m pipedap.tools.partition --model vgg16 -b 16 --image-size 112 --workers 2 --bandwidth 125mbit --interference 25% --parallelism pipeline --iterations 5 --out models/vgg16/gpus=2

stage 0: modules 0-9 (features.0 .. features.16), 1 rank(s), 3.222 s per minibatch (compute 3.119 s)
  boundary 0 -> 1: 3.2 MB each way, 0.411 s per minibatch
stage 1: modules 10-24 (features.17 .. classifier.6), 1 rank(s), 2.691 s per minibatch (compute 2.588 s)
pipeline: 3.222 s per minibatch, bound by the slowest stage or boundary
1F1B: PipeDream's count of minibatches in flight covers the transfers

Regenerate rather than edit. ``model(criterion)`` returns PipeDream's stage list:
[(stage module, input names, output names), ..., (criterion, [last output], ["loss"])].
"""

from models.sequential import stage_modules

MODEL = 'vgg16'
STAGES = [
    [
        "features.0",
        "features.2",
        "features.4",
        "features.5",
        "features.7",
        "features.9",
        "features.10",
        "features.12",
        "features.14",
        "features.16"
    ],
    [
        "features.17",
        "features.19",
        "features.21",
        "features.23",
        "features.24",
        "features.26",
        "features.28",
        "features.30",
        "avgpool",
        "flatten",
        "classifier.0",
        "classifier.2",
        "classifier.3",
        "classifier.5",
        "classifier.6"
    ]
]


def arch() -> str:
    return MODEL


def model(criterion, **kwargs):
    """The stage modules, then ``criterion``; ``kwargs`` go to ``models.get`` (e.g. num_classes)."""
    return stage_modules(MODEL, STAGES, criterion, **kwargs)
