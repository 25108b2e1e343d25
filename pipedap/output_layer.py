"""A plain ``nn.Linear`` output layer tied to a word embedding, run so that its weight gradient comes in pieces.

The tied split (pipedap/tied_split.py, [Note: the dense part in pieces]) sends the output layer's
part of the tied gradient in ``DENSE_PIECES`` reduce-scatters as the layer's backward makes them;
the planner needs to know when they are ready ([Note: ties in a profile] in
pipedap.planner.profile). This module has what both the runtime and the offline profiler use and
nothing that communicates: the autograd function that hands the weight gradient to its owner,
the gradient computed block by block, and the profiler's timer of the blocks.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DENSE_PIECES = 8  # reduce-scatters an output layer's part is sent in ([Note: the dense part in pieces])


def plain_linear(module: torch.nn.Module, weight: torch.nn.Parameter) -> bool:
    """An ``nn.Linear`` (its own forward) whose weight is ``weight``: it can compute its gradient in pieces."""
    return (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward
            and module.weight is weight)


def autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def weight_gradient_in_pieces(grad2d: torch.Tensor, x2d: torch.Tensor,
                              now: Callable[[], float] = time.monotonic) -> tuple[torch.Tensor, list[float]]:
    """An output layer's weight gradient ``grad2d.T @ x2d`` computed in ``DENSE_PIECES`` blocks of rows, and
    when each block was done (``now()``)."""
    rows = grad2d.shape[1]
    grad, times = grad2d.new_empty(rows, x2d.shape[1]), []
    for k in range(DENSE_PIECES):
        lo, hi = k * rows // DENSE_PIECES, (k + 1) * rows // DENSE_PIECES
        torch.mm(grad2d[:, lo:hi].t(), x2d, out=grad[lo:hi])
        times.append(now())
    return grad, times


class PieceTimer:
    """A plain ``nn.Linear`` output layer run as the runtime runs one it does not split (the weight gradient
    computed in pieces, handed to autograd whole), recording when its first and last pieces were done in each
    backward: the offline profiler's measure of a tie ([Note: ties in a profile] in pipedap.planner.profile).
    :meth:`remove` gives the layer its own forward back."""

    product = staticmethod(F.linear)

    def __init__(self, module: torch.nn.Linear, now: Callable[[], float]):
        self.module, self.now = module, now
        self.runs: list[tuple[float, float]] = []  # (first, last) per backward
        module.forward = self._forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if not (torch.is_grad_enabled() and m.weight.requires_grad) or autocasting(x.device.type):
            return F.linear(x, m.weight, m.bias)
        return PiecewiseLinear.apply(x, m.weight, m.bias, self, False)

    def output_layer_backward(self, grad2d: torch.Tensor, x2d: torch.Tensor, take: bool) -> torch.Tensor:
        grad, times = weight_gradient_in_pieces(grad2d, x2d, self.now)
        self.runs.append((times[0], times[-1]))
        return grad

    def remove(self) -> None:
        del self.module.forward


class PiecewiseLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient ``split`` computes (``split.output_layer_backward``: a TiedSplit's in
    pieces, [Note: the dense part in pieces] in pipedap/tied_split.py; or a :class:`PieceTimer`'s), and whose
    product is ``split.product`` (which may update the weight: it is saved after)."""

    @staticmethod
    def forward(ctx, x, weight, bias, split, take):
        output = split.product(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.split, ctx.take, ctx.has_bias = split, take, bias is not None
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad2d, x2d = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_weight = ctx.split.output_layer_backward(grad2d, x2d, ctx.take) if ctx.needs_input_grad[1] else None
        grad_x = (grad2d @ weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        grad_bias = grad2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None
