"""PipeDAP: decoupled all-reduce scheduling for data-parallel PyTorch training.

The communication API (``init``, ``allreduce``, ...) lives in :mod:`pipedap.comm`
and needs the compiled ``comm_core``; it is loaded on first use so that the
pure-Python parts (``pipedap.planner``) import on any machine.
"""

__version__ = "0.1.0"
