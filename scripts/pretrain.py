#!/usr/bin/env python
"""Thin entry point: `python scripts/pretrain.py [args]` == `hf-lowrank pretrain [args]`
(also under `torchrun` / `accelerate launch`)."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
