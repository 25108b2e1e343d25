"""Emulated cluster on one machine: N hosts as network namespaces with rate-limited links.

``python -m pipedap.tools.testbed --help`` for the CLI (up, down, run, calibrate);
:class:`Testbed` for the Python API. Needs root and iproute2. See
``docs/testbed.md`` for the recipe and what was measured.

The names below are loaded on first use, so that ``python -m pipedap.tools.testbed.agent``
and ``pipedap.tools.testbed.pin`` (run once per rank) import nothing they do not need.
"""

from __future__ import annotations

import importlib

_LAZY = {"Shaping": "pipedap.tools.testbed.network", "TestbedError": "pipedap.tools.testbed.network",
         "Testbed": "pipedap.tools.testbed.testbed", "teardown": "pipedap.tools.testbed.testbed"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pipedap.tools.testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
