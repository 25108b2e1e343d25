"""Tensors between one sender and one receiver: ``send_tensor`` / ``receive_tensor`` (PipeDream's names).

Both return at once with a handle; the transport (:mod:`pipedap.pipeline.transport`:
the comm core's engine thread, or gloo's) moves the data while this thread
computes, so activations and gradients travel behind compute. Messages are
matched by (peer, tag) in posting order (pipedap.engine's point-to-point rule,
and gloo's), not by the global order of collectives. The pipeline
derives tags from the unit (minibatch or micro-batch) index and the direction
with :func:`tag`, so a receive never takes another unit's tensor even when
several are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipedap.pipeline.transport import connect

ACTIVATION, TARGET, GRADIENT = 0, 1, 2  # what a message carries (forward: activation and target; backward: gradient)
KINDS = 3
TAG_UNITS = 4096  # tags repeat after this many units; matching is FIFO per (peer, tag), so wrapping is safe


def tag(unit: int, kind: int) -> int:
    """The tag of ``unit``'s message of ``kind`` (below 32768, the smallest tag bound MPI guarantees)."""
    if kind not in (ACTIVATION, TARGET, GRADIENT):
        raise ValueError(f"unknown message kind {kind}")
    return (unit % TAG_UNITS) * KINDS + kind


@dataclass(frozen=True)
class TensorSpec:
    """The shape and dtype of a tensor that crosses a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}"


class Received:
    """A receive in flight: ``wait()`` returns the filled tensor."""

    def __init__(self, work, tensor: torch.Tensor):
        self._work, self.tensor = work, tensor

    def done(self) -> bool:
        return self._work.done()

    def wait(self) -> torch.Tensor:
        self._work.wait()
        return self.tensor


def send_tensor(tensor: torch.Tensor, peer: int, tag: int, name: str | None = None, transport=None):
    """Send ``tensor`` to global rank ``peer``; the returned work (``done()``, ``wait()``) keeps it alive until sent.

    Do not modify ``tensor`` before the work is done. ``transport``: this process's
    (:func:`~pipedap.pipeline.transport.connect`) unless given.
    """
    tensor = tensor.detach().contiguous()
    return (transport or connect()).send(tensor, peer, tag, name=name)


def receive_tensor(spec: TensorSpec, peer: int, tag: int, name: str | None = None,
                   device: torch.device | str = "cpu", transport=None) -> Received:
    """Receive a tensor of ``spec`` from global rank ``peer`` into a new buffer."""
    tensor = spec.empty(device)
    return Received((transport or connect()).recv(tensor, peer, tag, name=name), tensor)
