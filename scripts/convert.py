#!/usr/bin/env python
"""Thin entry point: `python scripts/convert.py [args]` == `hf-lowrank convert [args]`."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
