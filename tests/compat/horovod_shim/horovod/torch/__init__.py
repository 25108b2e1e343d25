"""``import horovod.torch as hvd`` served by pipedap, as a Horovod user's script would use it.

Deliberately thin: whatever Horovod's tests need beyond these lines belongs in pipedap itself,
so that ``import pipedap as hvd`` works the same way.
"""

import pipedap
from pipedap import *  # noqa: F403

HorovodInternalError = pipedap.CommError
