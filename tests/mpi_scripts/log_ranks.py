"""Log from every rank after pipedap.init(), with logging left unconfigured (run under mpirun).

Each rank logs "info from R" and "warning from R" to the "pipedap" logger, R
being the rank the engine gave it; pipedap's own handler writes them to stderr.
"""

import logging

import pipedap as hvd

hvd.init()
log = logging.getLogger("pipedap")
log.info("info from %d", hvd.rank())
log.warning("warning from %d", hvd.rank())
hvd.shutdown()
