"""``python -m pipedap.bench`` as a script, for run_mpi (which launches files from this folder)."""

import sys

from pipedap.bench import main

sys.exit(main())
