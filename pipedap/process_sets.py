"""Process sets: subsets of the ranks that run collectives among themselves (Horovod's API).

    from pipedap.process_sets import add_process_set, remove_process_set, global_process_set

    evens = add_process_set([0, 2])   # every rank calls it, with the same ranks, in the same order
    if evens.included():
        core.submit(ops, process_set=evens.process_set_id)  # counts and roots relative to the set
    remove_process_set(evens)         # every rank again, after its last use

Sets are created and removed by the engine thread, in order, after every rank
agreed on the call (docs/architecture.md, "Process sets"): ids are the same on
every rank (0 is the world, then 1, 2, ... in creation order, never reused).
As in Horovod, the ranks are sorted and a set equal to an existing one is
refused. Unlike Horovod, a refusal is a ``CommError`` raised on every rank (the
engine's error type) rather than a ``ValueError``, and process sets can always
be added after ``init()`` (no ``HOROVOD_DYNAMIC_PROCESS_SETS``). A rank whose
submissions on overlapping sets form a cycle with the other ranks' order waits
forever; the stall report names the cycle.

This module needs neither torch nor, until a set is used, the compiled core.
"""

from __future__ import annotations

from collections.abc import Iterable


def _core():
    from pipedap import _comm_core

    return _comm_core


class ProcessSet:
    """A set of world ranks; ``process_set_id`` is set once it is registered with
    :func:`add_process_set` (None before, and after :func:`remove_process_set`)."""

    process_set_id: int | None = None

    def __init__(self, ranks: Iterable[int]):
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
            raise TypeError(f"ProcessSet takes a list of ranks, got {ranks!r}")
        ranks = sorted(ranks)
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise TypeError(f"ProcessSet takes integer ranks, got {ranks!r}")
        self.ranks: list[int] = ranks

    def size(self) -> int | None:
        """Number of ranks in the set, or None if it is not registered."""
        return None if self.process_set_id is None else _core().process_set_size(self.process_set_id)

    def rank(self) -> int | None:
        """This process's rank within the set (the one counts and roots are relative to), or None
        if the set is not registered; ValueError if this process is not a member."""
        if self.process_set_id is None:
            return None
        rank = _core().process_set_rank(self.process_set_id)
        if rank < 0:
            raise ValueError(f"rank {_core().rank()} is not a member of {self}; check included() first")
        return rank

    def included(self) -> bool:
        """Whether this process is a member."""
        return _core().rank() in self.ranks

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


class _GlobalProcessSet(ProcessSet):
    """Process set 0, every rank; its ranks are known once the engine started."""

    process_set_id = 0

    def __init__(self):  # no ranks of its own: they follow the world
        pass

    @property
    def ranks(self) -> list[int]:
        core = _core()
        return list(range(core.size())) if core.is_initialized() else []


global_process_set: ProcessSet = _GlobalProcessSet()


def add_process_set(process_set: ProcessSet | Iterable[int]) -> ProcessSet:
    """Register a set of ranks on every rank and return it, registered.

    Collective over the whole world: every rank calls it with the same ranks, in
    the same order relative to its other add/remove calls and submissions.
    CommError on every rank if the ranks differ between ranks, one is out of
    range, or a set of these ranks exists already.
    """
    if not isinstance(process_set, ProcessSet):
        process_set = ProcessSet(process_set)
    process_set.process_set_id = _core().add_process_set(process_set.ranks)
    return process_set


def remove_process_set(process_set: ProcessSet) -> bool:
    """Remove a registered set on every rank, after everything submitted on it, and unregister
    ``process_set``. Collective over the world, like :func:`add_process_set`.

    Returns False, as Horovod, for the global set or an unregistered one (no
    collective then); the engine's refusal of an unknown id is a CommError.
    """
    if process_set.process_set_id in (None, 0):
        return False
    _core().remove_process_set(process_set.process_set_id)
    process_set.process_set_id = None
    return True
