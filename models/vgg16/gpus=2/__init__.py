"""vgg16 in 2 stage(s) on 2 rank(s), written by the partitioner:

    python -m pipedap.tools.partition --model vgg16 -b 16 --image-size 112 --workers 2 --bandwidth 125mbit --parallelism pipeline --out models/vgg16/gpus=2

stage 0: modules 0-8 (features.0 .. features.14), 1 rank(s), 3.397 s per minibatch (compute 3.397 s)
  boundary 0 -> 1: 12.8 MB each way, 1.644 s per minibatch
stage 1: modules 9-24 (features.16 .. classifier.6), 1 rank(s), 2.889 s per minibatch (compute 2.889 s)
pipeline: 3.397 s per minibatch, bound by the slowest stage or boundary
1F1B: the transfers outlast what PipeDream's count of minibatches in flight covers; run main_with_runtime.py with --extra-in-flight 1 to hide them (one more update of staleness each)

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
        "features.14"
    ],
    [
        "features.16",
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
