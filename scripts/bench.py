#!/usr/bin/env python
"""Thin entry point: `python scripts/bench.py [--out docs/results/bench/bench_cpu.json]` (see docs/benchmarks.md);
`python scripts/bench.py --traffic-report` prints Spectron's FSDP2 bytes per step (docs/distributed.md).

OMP_WAIT_POLICY must be set before torch loads its OpenMP runtime: spin-waiting threads on a shared CPU distort
the comparison (hf_lowrank/bench/__init__.py).
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hf_lowrank.bench.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
