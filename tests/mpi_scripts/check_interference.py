"""pipedap.interference under mpirun, every rank pinned to core 0 (so the engines must take compute's time).

Writes {"sigma": [per rank], "measured": [per rank, by measure.cost_model], "cached": its copy read back,
"off": with PIPEDAP_INTERFERENCE=off}.
"""

import json
import os
import sys

os.sched_setaffinity(0, {0})  # before init: the engine thread inherits it

import pipedap as hvd  # noqa: E402
from pipedap import interference, measure  # noqa: E402

hvd.init()
sigma = interference.measure()
sizes = (16 << 10, 1 << 20)
os.environ["PIPEDAP_INTERFERENCE"] = "off"
off, _ = measure.measure_cost_model(sizes)
os.environ["PIPEDAP_INTERFERENCE"] = "measure"
measured = measure.cost_model(sizes=sizes)  # measures (interference too) and caches
cached = measure.cost_model(measure_if_missing=False)
result = {"sigma": hvd.allgather_object(sigma), "measured": hvd.allgather_object(measured.interference),
          "cached": cached.interference, "off": off.interference}
if hvd.rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
    print(result)
hvd.shutdown()
