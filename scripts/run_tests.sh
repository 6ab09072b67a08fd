#!/usr/bin/env bash
# The test command of the README: installs what it needs into .venv, then runs the whole suite on CPU, offline.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${HF_LOWRANK_VENV:-$root/.venv}/bin/python" -m pytest "$@"
