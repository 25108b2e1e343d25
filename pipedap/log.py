"""Rank-tagged logging: every record of the ``pipedap`` logger says which rank logged it.

Every module of the package logs to ``logging.getLogger("pipedap")``. ``import
pipedap`` adds a :class:`RankFilter` to that logger, which

* starts each message with ``[rank R] `` and sets ``record.rank`` (for a
  ``%(rank)s`` in an application's format). R is the engine's rank once
  ``pipedap.init()`` has run, the MPI launcher's before
  (:func:`pipedap.settings.launch_rank`);
* drops INFO and DEBUG records on ranks not in ``PIPEDAP_LOG_RANKS`` (default
  ``0``; ``all``, or ranks like ``0,3``), so that N ranks do not print the
  same progress N times, as with Horovod and DDP. WARNING and above are logged
  on every rank: a problem may be one rank's alone.

Records go through :mod:`logging` and pipedap adds no handler (a library
should not): the application's configuration decides where they go, and
without one Python prints WARNING and above to stderr. To see pipedap's INFO
messages (plans, switches), configure logging, e.g.
``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

LOGGER = logging.getLogger("pipedap")

_engine_rank: int | None = None  # set by pipedap.init()


def current_rank() -> int | None:
    """The engine's rank after ``pipedap.init()``, else the launcher's (None: its variable is bad)."""
    if _engine_rank is not None:
        return _engine_rank
    from pipedap import settings  # imported here: `import pipedap` stays light

    try:
        return settings.launch_rank()
    except settings.SettingsError:
        return None


def logged_ranks(environ: Mapping[str, str] | None = None) -> frozenset[int] | None:
    """The ranks of ``PIPEDAP_LOG_RANKS`` (None: every rank)."""
    from pipedap import settings

    try:
        return settings.get("PIPEDAP_LOG_RANKS", environ)
    except settings.SettingsError:
        return None  # log everything rather than fail in a log call; pipedap.init() reports the bad value


class RankFilter(logging.Filter):
    """Tags a record with its rank; drops it when it is below WARNING and its rank is not logged.

    ``rank`` and ``environ`` are for tests: by default the current rank and ``os.environ``.
    """

    def __init__(self, rank: int | None = None, environ: Mapping[str, str] | None = None):
        super().__init__()
        self.rank = rank
        self.environ = environ

    def filter(self, record: logging.LogRecord) -> bool:
        rank = self.rank if self.rank is not None else current_rank()
        record.rank = "?" if rank is None else rank
        record.msg = f"[rank {record.rank}] {record.msg}"
        if record.levelno >= logging.WARNING:
            return True
        ranks = logged_ranks(self.environ)
        return ranks is None or rank in ranks


def install() -> None:
    """Add the RankFilter to the ``pipedap`` logger (once)."""
    if not any(isinstance(f, RankFilter) for f in LOGGER.filters):
        LOGGER.addFilter(RankFilter())


def start(rank: int) -> None:
    """Called by ``pipedap.init()``: records carry the engine's ``rank`` from now on."""
    global _engine_rank
    _engine_rank = rank
    install()


install()
