"""Progress lines of the command-line tools: what is being done, and how long it took."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def step(what: str) -> Iterator[None]:
    """Print ``what ...`` now and ``done in N s`` when the block ends."""
    print(f"{what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"  done in {time.perf_counter() - start:.2f} s", flush=True)
