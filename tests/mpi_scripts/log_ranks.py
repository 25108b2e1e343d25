"""Log from every rank after pipedap.init() (run under mpirun).

Each rank logs "info from R" and "warning from R" to the "pipedap" logger, R
being the rank the engine gave it; the application's basicConfig prints them.
"""

import logging

import pipedap as hvd

logging.basicConfig(level=logging.INFO)
hvd.init()
log = logging.getLogger("pipedap")
log.info("info from %d", hvd.rank())
log.warning("warning from %d", hvd.rank())
hvd.shutdown()
