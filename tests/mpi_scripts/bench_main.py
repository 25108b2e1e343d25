"""``python -m pipedap.tools.bench`` as a script, for run_mpi (which launches files from this folder)."""

import sys

from pipedap.tools.bench import main

sys.exit(main())
