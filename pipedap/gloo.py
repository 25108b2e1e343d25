"""torch.distributed's gloo process group, started so that destroy_process_group really ends it.

Used by the pipeline's gloo transport and the DDP baseline. torch._dynamo, which
the first optimizer imports lazily, keeps references to the default group when
it is imported after the group exists (10 in torch 2.13): the group then
outlives ``destroy_process_group`` and its gloo threads run into the
interpreter's exit, which can abort it ("terminate called without an active
exception": 8 of 30 loaded three-rank exits with the group never destroyed, and
a CI run with it outliving the destroy). Importing it first avoids that.
"""

from __future__ import annotations

import datetime


def init_gloo(init_method: str, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    """``dist.init_process_group("gloo", ...)`` with torch._dynamo imported before it."""
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
