"""Stability sweep of the paper's ablation (dense, naive low-rank AdamW, orthogonalization only, renormalization
only, Spectron, Spectron + re-balancing) over learning rates; see docs/stability.md.

    python scripts/stability_sweep.py --out docs/results/stability
"""

import sys

from hf_lowrank.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
