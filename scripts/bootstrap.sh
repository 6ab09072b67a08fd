#!/usr/bin/env bash
# Create (or reuse) the project virtualenv in .venv and install hf-lowrank with its dev extra.
# Idempotent: reinstalls only when pyproject.toml or the constraints change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HF_LOWRANK_VENV:-$root/.venv}"
stamp="$venv/.hf_lowrank_stamp"
want="$(cat "$root/pyproject.toml" "$root/.ci/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing hf-lowrank into $venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # torch first and pinned: an unpinned resolve of accelerate/peft would pull a multi-GB CUDA build.
  "$venv/bin/python" -m pip install -q -c "$root/.ci/constraints.txt" torch 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install -q -c "$root/.ci/constraints.txt" -e "$root[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c "import hf_lowrank, torch, transformers, datasets" # fail loudly if the install did not take
  echo "$want" > "$stamp"
fi
