#!/usr/bin/env python
"""Thin entry point: `python scripts/push_to_hub.py MODEL_DIR [args]` == `hf-lowrank push MODEL_DIR [args]`
(see docs/publishing.md)."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
