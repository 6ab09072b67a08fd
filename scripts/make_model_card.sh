#!/usr/bin/env bash
# Regenerate model_cards/main.md: the model card `hf-lowrank push` would upload for the README's main job
# (`bash scripts/run_main.sh`, which writes runs/main). Nothing is uploaded: the push runs as a dry run.
#   bash scripts/make_model_card.sh [RUN_DIR (runs/main)] [REPO_ID (ORG/lowrank-llama-small-spectron)]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
run_dir="${1:-$root/runs/main}"
repo_id="${2:-ORG/lowrank-llama-small-spectron}"
if [ ! -f "$run_dir/training_summary.json" ]; then
  echo "make_model_card: $run_dir holds no finished run; train it first with: bash scripts/run_main.sh" >&2
  exit 2
fi
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
"${HF_LOWRANK_VENV:-$root/.venv}/bin/hf-lowrank" push "$run_dir" --repo_id "$repo_id" --dry_run "$staging/upload"
cp "$staging/upload/README.md" "$root/model_cards/main.md"
echo "wrote $root/model_cards/main.md"
