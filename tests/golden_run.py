"""The golden run: short fixed-seed `tiny` runs whose per-step losses, grad norms and final-weight digests are
committed (tests/golden/tiny_runs.json). A refactor must leave them bit-identical on CPU; a change meant to alter
numerics regenerates them in a commit of its own that says why:

    .venv/bin/python tests/golden_run.py --write

Each run goes through the pretraining path (`build_datasets`, `build_trainer`: LowRankTrainer, step guard,
diagnostics callback) with one optimizer of every family, so the optimizer's reference and batched paths, the
model, the data pipeline and the trainer are all covered.
"""

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).parent / "golden" / "tiny_runs.json"
RUNS = {  # name: (dense, optimizer, lr)
    "spectron": (False, "spectron", 0.05),
    "orthogonalize_only": (False, "muon", 0.05),
    "renormalize_only": (False, "renorm", 0.05),
    "lowrank_adamw": (False, "adamw", 3e-3),
    "dense_adamw": (True, "adamw", 3e-3),
}
STEPS = 6


def golden_runs() -> dict:
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from hf_lowrank import LowRankLlamaForCausalLM, preset_config
    from hf_lowrank.training.arguments import OptimizerArguments, RunArguments
    from hf_lowrank.training.data import DataArguments, build_datasets
    from hf_lowrank.training.trainer import build_trainer

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        config = preset_config("tiny", max_position_embeddings=64)
        _, train, _ = build_datasets(
            DataArguments(max_corpus_bytes=150_000, block_size=64), scratch, block_size=64, config=config
        )
        for name, (dense, optimizer, lr) in RUNS.items():
            set_seed(0)
            overrides = {"lowrank_modules": []} if dense else {}
            model = LowRankLlamaForCausalLM(preset_config("tiny", max_position_embeddings=64, **overrides))
            args = TrainingArguments(
                output_dir=f"{scratch}/{name}", max_steps=STEPS, per_device_train_batch_size=4, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                dataloader_pin_memory=False,
            )  # fmt: skip
            trainer = build_trainer(
                model, args, OptimizerArguments(optimizer=optimizer, adamw_learning_rate=None if optimizer == "adamw" else 1e-3),
                RunArguments(diagnostics_steps=2),
                train_dataset=train,
            )  # fmt: skip
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            rows = [row for row in trainer.state.log_history if "loss" in row]
            digest = hashlib.sha256()
            for key, tensor in sorted(model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().contiguous().numpy().tobytes())
            results[name] = {
                "loss": [row["loss"] for row in rows],
                "grad_norm": [row["grad_norm"] for row in rows],
                "update_norm_max": [row["diag/update_norm_max"] for row in rows if "diag/update_norm_max" in row],
                "weights_sha256": digest.hexdigest(),
            }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Regenerate tests/golden/tiny_runs.json.")
    args = parser.parse_args(argv)
    results = golden_runs()
    if args.write:
        GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    expected = json.loads(GOLDEN.read_text())
    bad = [name for name in expected if expected[name] != results.get(name)]
    print("golden runs unchanged" if not bad else f"golden runs changed: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
