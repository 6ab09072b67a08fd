#!/usr/bin/env python
"""Thin entry point: `python scripts/bench.py [args]` == `hf-lowrank bench [args]` (see docs/benchmarks.md), e.g.
`--out docs/results/bench/bench_cpu.json`, or `--traffic_report` for Spectron's FSDP2 bytes per step
(docs/distributed.md).

It also sets OMP_WAIT_POLICY=PASSIVE unless it is set, which must happen before torch loads its OpenMP runtime
(so before `hf_lowrank` is imported): spin-waiting threads on a shared CPU distort the comparison
(hf_lowrank/bench/__init__.py).
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hf_lowrank.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
