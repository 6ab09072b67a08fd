#!/usr/bin/env python
"""Thin entry point: `python scripts/stability_sweep.py [args]` == `hf-lowrank stability-study [args]`: the
paper's ablation over learning rates (see docs/stability.md), e.g.

    python scripts/stability_sweep.py --out docs/results/stability
"""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["stability-study", *sys.argv[1:]]))
