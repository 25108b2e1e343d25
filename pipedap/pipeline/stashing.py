"""Weight stashing (PipeDream): a unit's backward uses the weights its forward used.

Under 1F1B a stage updates its weights while earlier units are still waiting
for their backward. Autograd computes a backward only from the tensors the
forward saved, so stashing the *saved* weights is enough: while a unit's forward
runs, every tensor autograd saves that lives in a parameter's storage (the
weight itself, or a view of it such as ``weight.t()``) is replaced by a
snapshot taken then, after any pending update was applied. Its backward then
unpacks those snapshots (the restore), while the optimizer keeps updating the
latest weights in place, and the gradient lands in ``p.grad`` as usual (so
``DistributedOptimizer``'s hooks see it). A snapshot lives as long as the
unit's graph: the memory of one weight version per unit in flight, as in
PipeDream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """The stashed version of a saved weight: a copy of its value now."""
    return tensor.detach().clone()


class _Stashed:
    """A packed weight snapshot (distinguishes it from tensors saved as they are)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


@contextlib.contextmanager
def stash_weights(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Run a forward inside this block to stash the weights its backward will use."""
    storages = {p.untyped_storage().data_ptr() for p in params if p.numel()}

    def pack(tensor: torch.Tensor):
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            return _Stashed(snapshot(tensor))
        return tensor

    def unpack(packed):
        return packed.tensor if isinstance(packed, _Stashed) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
