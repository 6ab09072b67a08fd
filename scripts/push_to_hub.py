"""Publish a saved hf-lowrank model to the Hugging Face Hub; same as `hf-lowrank push` (see docs/publishing.md)."""

import sys

from hf_lowrank.hub import main

if __name__ == "__main__":
    sys.exit(main())
