"""Grouping parameters by the module that registers them: one helper for the buckets and the profiler."""

from __future__ import annotations

import torch
from torch import nn

from pipedap.buckets import build_bucket, default_groups, group_by_module
from pipedap.profiler import layers_of


def test_group_by_module_keeps_first_seen_order():
    named = [("b.weight", 1), ("a.0.weight", 2), ("b.bias", 3), ("scale", 4), ("a.0.bias", 5)]
    assert group_by_module(named) == {
        "b": [("b.weight", 1), ("b.bias", 3)],
        "a.0": [("a.0.weight", 2), ("a.0.bias", 5)],
        "": [("scale", 4)],
    }
    assert list(group_by_module(named)) == ["b", "a.0", ""]
    assert group_by_module([]) == {}


def test_profiler_layers_and_default_groups_share_the_grouping():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    layers = layers_of(model)
    assert {k: [n for n, _ in v] for k, v in layers.items()} == {"0": ["0.weight", "0.bias"], "2": ["2.weight"]}
    named = list(model.named_parameters())
    assert default_groups(named, 0) == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]  # a module never splits
    assert default_groups(named, 1 << 20) == [[n for n, _ in named]]
    assert all(isinstance(p, torch.nn.Parameter) for members in layers.values() for _, p in members)


def test_mark_used_flags_the_gradients_that_came_and_only_those():
    """[Note: used flags]: the reducer flags a bucket's gradients at once when it submits it."""
    named = [(f"p{i}", nn.Parameter(torch.ones(3))) for i in range(3)]
    bucket = build_bucket(0, named, world=2, rank=0)
    assert bucket.flags.tolist() == [0, 0, 0]
    bucket.mark_used({0, 2})  # one gradient never came (a bucket flushed incomplete)
    assert bucket.flags.tolist() == [1, 0, 1]
    assert [id(p) for p in bucket.used_params()] == [id(named[0][1]), id(named[2][1])]
    bucket.buffer.zero_()
    bucket.mark_used(range(3))
    assert bucket.flags.tolist() == [1, 1, 1] and bucket.buffer[: bucket.grad_numel].eq(0).all()
