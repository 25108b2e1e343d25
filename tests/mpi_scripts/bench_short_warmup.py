"""``python -m pipedap.tools.bench`` with its warm-up bound lowered to 3 batches (the bound's test)."""

import sys

import pipedap.tools.bench as bench_module

bench_module.MAX_WARMUP = 3
sys.exit(bench_module.main())
