"""Broadcasting model and optimizer state from one rank (Horovod's functions, same names)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from pipedap import comm, engine


def broadcast_parameters(params: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], root_rank: int = 0) -> None:
    """Overwrite every tensor with root_rank's, in place.

    ``params`` is ``model.state_dict()`` (parameters *and* buffers such as BatchNorm
    statistics) or ``model.named_parameters()``. Every rank must pass the same names in
    the same order.
    """
    items = sorted(params.items()) if isinstance(params, Mapping) else list(params)
    handles = []
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"broadcast_parameters: '{name}' is a {type(tensor).__name__}, not a tensor")
        target = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        if target.is_contiguous():
            handles.append((None, None, comm.broadcast_async_(target, root_rank, name=f"bcast.{name}")))
        else:  # broadcast a contiguous copy, write it back
            copy = target.contiguous()
            handles.append((target, copy, comm.broadcast_async_(copy, root_rank, name=f"bcast.{name}")))
    for target, copy, handle in handles:
        comm.synchronize(handle)
        if target is not None:
            target.copy_(copy)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Give every rank root_rank's optimizer state and hyperparameters (per param group).

    Works before the first step (empty state: the hyperparameters are still made equal).
    With ``shard_update`` every rank gathers the whole state first (state_dict() is collective).
    """
    sharded = getattr(getattr(optimizer, "_pipedap", None), "shard_pieces", None) is not None
    state = comm.broadcast_object(optimizer.state_dict() if sharded or engine.rank() == root_rank else None,
                                  root_rank, name="optimizer_state")
    if engine.rank() != root_rank:
        optimizer.load_state_dict(state)
