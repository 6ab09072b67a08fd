#!/usr/bin/env python
"""Thin entry point: `python scripts/finetune_lora.py [args]` == `hf-lowrank finetune [args]`."""

import sys

from hf_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
