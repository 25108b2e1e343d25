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

Records go through :mod:`logging`, so an application's own configuration
(handlers, formats, levels) decides where they go. Only when the application
has configured none by ``pipedap.init()`` does pipedap add a handler that
writes INFO and above to stderr; once the application configures logging
(a handler on the root or the ``pipedap`` logger), that handler and its
level are removed again, and the application's configuration alone decides.
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
    """Called by ``pipedap.init()``: records carry ``rank`` from now on; if the application has
    configured no logging, pipedap's INFO messages go to stderr until it does."""
    global _engine_rank
    _engine_rank = rank
    install()
    if _configured() or any(isinstance(f, _UntilConfigured) for f in LOGGER.filters):
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    LOGGER.addHandler(handler)
    LOGGER.addFilter(_UntilConfigured(handler, set_level=LOGGER.level == logging.NOTSET))
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)


def _configured(ours: logging.Handler | None = None) -> bool:
    """Whether the application has a handler on the root or the ``pipedap`` logger."""
    return bool(logging.getLogger().handlers) or any(h is not ours for h in LOGGER.handlers)


class _UntilConfigured(logging.Filter):
    """Removes pipedap's own handler (and the level it set) as soon as the application configures
    logging, and judges that record by the application's level, as if pipedap had set nothing.
    It stays on the logger, inert (removing it while the logger iterates its filters would skip the next)."""

    def __init__(self, handler: logging.Handler, set_level: bool):
        super().__init__()
        self.handler: logging.Handler | None = handler
        self.set_level = set_level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.handler is None or not _configured(self.handler):
            return True
        LOGGER.removeHandler(self.handler)
        self.handler = None
        if self.set_level:
            LOGGER.setLevel(logging.NOTSET)
        return record.levelno >= LOGGER.getEffectiveLevel()


install()
