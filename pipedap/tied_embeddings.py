"""Which parameters are word embeddings tied to an output layer, and what the planner's profile says of them.

The runtime reduces such a parameter in two parts ([Note: tied embeddings] in
:mod:`pipedap.tied_split`); this module finds them in a model and measures what the planner
needs ([Note: ties in a profile] in :mod:`pipedap.planner.profile`). It does not communicate:
the profiler uses it on machines without MPI.
"""

from __future__ import annotations

import functools

import torch

from pipedap import settings
from pipedap.buckets import Bucket
from pipedap.planner.profile import Tie

INDEX_BYTES = 8  # each all-gathered row travels with its int64 index


def split_enabled(*, compressed: bool, sharded: bool, passes: int) -> bool:
    """Whether a job with these options splits its tied embeddings (the reducer and the planner ask alike)."""
    return bool(settings.get("PIPEDAP_TIED_SPLIT")) and not compressed and not sharded and passes == 1


def tied_embeddings(model: torch.nn.Module) -> dict[torch.nn.Parameter, tuple[torch.nn.Embedding, list]]:
    """2-D parameters registered by one ``nn.Embedding`` and by other modules: ``{parameter: (embedding,
    [the other modules])}``."""
    owners: dict[torch.nn.Parameter, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(p, []).append(module)
    found = {}
    for p, modules in owners.items():
        lookups = [m for m in modules if isinstance(m, torch.nn.Embedding)]
        users = [m for m in modules if not isinstance(m, torch.nn.Embedding)]
        if p.dim() == 2 and len(lookups) == 1 and users:
            found[p] = (lookups[0], users)
    return found


def lookup_ties(model: torch.nn.Module, buckets: list[Bucket]) -> dict[int, tuple[torch.nn.Embedding, list]]:
    """The buckets whose only parameter is a tied embedding: ``{bucket index: (embedding, [other modules])}``."""
    tied = tied_embeddings(model)
    return {b.index: tied[b.params[0]] for b in buckets if len(b.params) == 1 and b.params[0] in tied}


def user_param(users: list[torch.nn.Module], tied: torch.nn.Parameter, name_of: dict) -> str:
    """A parameter of the output layers (its group's readiness is the dense part's), "" if they have none
    ([Note: ties in a profile])."""
    return next((name_of[p] for m in users for p in m.parameters(recurse=False) if p is not tied and p in name_of), "")


def lookup_refusal(embedding: torch.nn.Module, param: torch.nn.Parameter, elementwise: bool) -> str:
    """Why the lookup of ``embedding`` cannot be served from the shards ("" if it can: [Note: the lookup served
    from the shards] in pipedap/tied_lookup.py); ``elementwise``: whether the optimizer's rule is."""
    if not elementwise:
        return "the optimizer's rule is not element-wise"
    if type(embedding).forward is not torch.nn.Embedding.forward:
        return f"{type(embedding).__name__} has its own forward"
    if embedding.max_norm is not None or embedding.sparse:
        return "the embedding renormalises rows (max_norm) or makes sparse gradients"
    if param.device.type != "cpu":
        return "the fetch is built on the engine thread, for host tensors only"
    return ""


def rows_bytes(rows: int, param: torch.nn.Parameter) -> int:
    """What a rank all-gathers for ``rows`` rows of ``param``'s gradient."""
    return rows * (param.shape[1] * param.element_size() + INDEX_BYTES)


class RowCounter:
    """Forward hooks on a model's tied embeddings that record the most rows one batch looked up, for the
    profile's ties (the profiler's, and the reducer's while the online planner measures)."""

    def __init__(self, model: torch.nn.Module):
        self.tied = tied_embeddings(model)
        self.rows = dict.fromkeys(self.tied, 0)
        self.name_of = {p: n for n, p in model.named_parameters()}
        self.handles = [embedding.register_forward_hook(functools.partial(self._count, p))
                        for p, (embedding, _) in self.tied.items()]

    def _count(self, param: torch.nn.Parameter, module, args, output) -> None:
        self.rows[param] = max(self.rows[param], int(torch.unique(args[0]).numel()))

    def ties(self) -> tuple[Tie, ...]:
        return tuple(self.tie(p) for p in self.tied if p in self.name_of)

    def tie(self, param: torch.nn.Parameter) -> Tie:
        """The tie of ``param`` (a named tied parameter), with the most rows seen so far."""
        users = self.tied[param][1]
        return Tie(self.name_of[param], user_param(users, param, self.name_of), rows_bytes(self.rows[param], param))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
