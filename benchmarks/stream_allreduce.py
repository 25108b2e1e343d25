"""Keep the link busy with 16 MB all-reduces through the comm core, for a profiler to watch (issue 16, item 2).

    python -m pipedap.tools.testbed run --hosts 2 --rate 500mbit -- python benchmarks/stream_allreduce.py &
    sleep 8; perf record -a -g -o perf.data -- sleep 8
    perf report -i perf.data --no-children --sort comm,dso -g none

Runs 60 all-reduces of 4 M float32 (about 17 s at 500 Mbit/s) and prints the rate of
buffer bytes. benchmarks/results/comm_cpu_cost/perf_stream_500mbit.txt is one profile.
"""

import time

import torch

import pipedap as hvd

COUNT = 60

hvd.init()
x = torch.ones(4 << 20)
hvd.allreduce(x, name="warm")
start = time.perf_counter()
for _ in range(COUNT):
    hvd.allreduce(x, name="stream", op=hvd.Sum)
seconds = time.perf_counter() - start
if hvd.rank() == 0:
    print(f"{COUNT} x 16 MB all-reduce: {seconds:.1f} s, {COUNT * x.numel() * 4 * 8 / seconds / 1e6:.0f} Mbit/s "
          "of buffer", flush=True)
hvd.shutdown()
