#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install hf-lowrank with its dev extra, under the constraints of one
# tested stack: HF_LOWRANK_VENV (default .venv) and HF_LOWRANK_CONSTRAINTS (default .ci/constraints.txt, the pinned
# newest; .ci/constraints-lowest.txt is the lowest versions pyproject.toml allows, which .ci/run also tests).
# Idempotent: reinstalls only when pyproject.toml or the constraints change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HF_LOWRANK_VENV:-$root/.venv}"
constraints="${HF_LOWRANK_CONSTRAINTS:-$root/.ci/constraints.txt}"
stamp="$venv/.hf_lowrank_stamp"
want="$(cat "$root/pyproject.toml" "$constraints" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing hf-lowrank into $venv (constraints: $constraints)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # torch first and pinned: an unpinned resolve of accelerate/peft would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q -c "$constraints" torch 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install -q -c "$constraints" -e "$root[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # fail loudly if the install did not take, or took other versions than the constraints pin
  "$venv/bin/python" - "$constraints" <<'PY'
import sys
from importlib.metadata import version

import datasets, hf_lowrank, torch, transformers  # noqa: F401,E401

pins = [line.split("#")[0].strip() for line in open(sys.argv[1])]
wrong = [f"{name} {version(name)} (pinned {want})" for name, want in (p.split("==") for p in pins if "==" in p)
         if version(name).split("+")[0] != want]
if wrong:
    sys.exit(f"[bootstrap] installed versions differ from {sys.argv[1]}: {', '.join(wrong)}")
PY
  echo "$want" > "$stamp"
fi
