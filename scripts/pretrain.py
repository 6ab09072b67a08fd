#!/usr/bin/env python
"""Thin entry point: `python scripts/pretrain.py [args]` == `hf-lowrank pretrain [args]`
(also under `torchrun` / `accelerate launch`)."""

import sys

from hf_lowrank.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
