#!/usr/bin/env python
"""Thin entry point: `python scripts/evaluate.py MODEL_DIR [args]` == `hf-lowrank evaluate MODEL_DIR [args]`."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
