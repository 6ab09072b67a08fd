#!/usr/bin/env bash
# The main job of the README: installs what it needs into .venv, then pretrains the `small` factorized model
# with Spectron on the built-in corpus (Python's standard library), evaluates it and saves it to runs/main
# (or the folder given as the first argument). Extra arguments go to `hf-lowrank pretrain`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
out="${1:-$root/runs/main}"
shift || true
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec "${HF_LOWRANK_VENV:-$root/.venv}/bin/hf-lowrank" pretrain --output_dir "$out" "$@"
