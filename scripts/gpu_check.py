#!/usr/bin/env python
"""Thin entry point: `python scripts/gpu_check.py --out gpu_check.json` on one GPU (under 5 minutes), or
`--cpu-smoke` anywhere to check the script at toy sizes. See hf_lowrank/bench/gpu.py and docs/benchmarks.md."""

import sys

from hf_lowrank.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main())
