"""The experiment harness around the library: ``python -m pipedap.tools.<tool> --help``.

bench (training throughput of one system), compare (every system against the bound on
the emulated cluster), testbed (that cluster), timeline (a run's trace as a Gantt chart)
and bench_comm (the core's collectives against mpi4py's). They use the runtime in
:mod:`pipedap`; the runtime never imports them.
"""
