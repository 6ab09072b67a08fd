#!/usr/bin/env python
"""Thin entry point: `python scripts/gpu_check.py [args]` == `hf-lowrank gpu-check [args]`: `--out gpu_check.json`
on one GPU (under 5 minutes), or `--cpu_smoke` anywhere to check the script at toy sizes. See
hf_lowrank/bench/gpu.py and docs/benchmarks.md."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["gpu-check", *sys.argv[1:]]))
