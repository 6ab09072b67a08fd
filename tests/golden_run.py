"""The golden run: short fixed-seed `tiny` runs whose per-step losses, gradient norms, learning rates, update norms
and total weight change are committed (tests/golden/tiny_runs.json). A refactor must reproduce them.

Bit-identity across machines does not exist: BLAS kernels (oneMKL on AMD vs Intel, with or without AVX-512) round
differently, and the differences grow by a few ulps per step. So the stored values are compared at a relative
tolerance (`RTOL`) about ten times the largest difference seen between two CPUs (1e-5, Intel vs AMD EPYC) and
far below what a real change of behaviour moves (one more power-iteration round per Spectron step moves the
update norms by ~4e-3; tests/test_golden_run.py checks that it is caught). Bitwise checks live where they mean something: two runs on one machine
(R3, R13).

    .venv/bin/python tests/golden_run.py            # compare: prints every value beyond tolerance, exit 1 if any
    .venv/bin/python tests/golden_run.py --write    # regenerate, printing what changed (in a commit that says why)

Each run goes through the pretraining path (`build_datasets`, `build_trainer`: LowRankTrainer, step guard,
diagnostics callback) with one optimizer of every family, so the optimizer's reference and batched paths, the
model, the data pipeline and the trainer are all covered.
"""

import argparse
import dataclasses
import json
import math
import platform
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
    "dense_muon": (True, "muon", 0.05),
}
STEPS = 6
# Per step: what the trainer logs; per run: ‖θ_end − θ_start‖ over every parameter (float64).
QUANTITIES = ("loss", "grad_norm", "learning_rate", "update_norm_max", "weight_change_norm")
RTOL = 1e-4


def golden_runs(names=None, **optimizer_overrides) -> dict:
    """``{run name: {quantity: [values]}}`` for the runs ``names`` (default all); ``optimizer_overrides`` replace
    fields of each run's `OptimizerArguments` (used to show that a real change is caught)."""
    from transformers import PrinterCallback, TrainingArguments, set_seed

    from hf_lowrank import LowRankLlamaForCausalLM, preset_config
    from hf_lowrank.training.arguments import OptimizerArguments, RunArguments
    from hf_lowrank.training.data import DataArguments, build_datasets
    from hf_lowrank.training.trainer import build_trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            config = preset_config("tiny", max_position_embeddings=64)
            _, train, _ = build_datasets(
                DataArguments(max_corpus_bytes=150_000, block_size=64), scratch, block_size=64, config=config
            )
            for name in names or RUNS:
                dense, optimizer, lr = RUNS[name]
                set_seed(0)
                overrides = {"lowrank_modules": []} if dense else {}
                model = LowRankLlamaForCausalLM(preset_config("tiny", max_position_embeddings=64, **overrides))
                start = {key: value.detach().double().clone() for key, value in model.state_dict().items()}
                args = TrainingArguments(
                    output_dir=f"{scratch}/{name}", max_steps=STEPS, per_device_train_batch_size=4, learning_rate=lr,
                    lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0, logging_steps=1,
                    save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                    dataloader_pin_memory=False,
                )  # fmt: skip
                options = OptimizerArguments(
                    optimizer=optimizer, adamw_learning_rate=None if optimizer == "adamw" else 1e-3
                )
                trainer = build_trainer(
                    model, args, dataclasses.replace(options, **optimizer_overrides), RunArguments(diagnostics_steps=1),
                    train_dataset=train,
                )  # fmt: skip
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                rows = [row for row in trainer.state.log_history if "loss" in row]
                change = sum(
                    (value.detach().double() - start[key]).pow(2).sum().item()
                    for key, value in model.state_dict().items()
                )
                results[name] = {
                    "loss": [row["loss"] for row in rows],
                    "grad_norm": [row["grad_norm"] for row in rows],
                    "learning_rate": [row["learning_rate"] for row in rows],
                    "update_norm_max": [row["diag/update_norm_max"] for row in rows],
                    "weight_change_norm": [math.sqrt(change)],
                }
    finally:
        torch.set_num_threads(threads)
    return results


def differences(expected: dict, results: dict, rtol: float = RTOL) -> list[str]:
    """One line per value of ``results`` beyond ``rtol`` of ``expected`` (or missing, or of another length)."""
    lines = []
    for name in sorted(expected.keys() | results.keys()):
        if name not in results or name not in expected:
            lines.append(f"{name}: {'missing from this run' if name not in results else 'not in the golden file'}")
            continue
        for quantity in QUANTITIES:
            stored, now = expected[name].get(quantity), results[name].get(quantity)
            if stored is None or now is None or len(stored) != len(now):
                lines.append(f"{name} {quantity}: stored {stored}, now {now}")
                continue
            for step, (old, new) in enumerate(zip(stored, now), start=1):
                if not math.isclose(new, old, rel_tol=rtol, abs_tol=0.0):
                    rel = abs(new - old) / abs(old) if old else math.inf
                    where = "" if quantity == "weight_change_norm" else f" step {step}"
                    lines.append(
                        f"{name} {quantity}{where}: stored {old!r}, now {new!r} (relative difference {rel:.1e})"
                    )
    return lines


def max_relative_difference(expected: dict, results: dict) -> float:
    worst = 0.0
    for name in expected.keys() & results.keys():
        for quantity in QUANTITIES:
            for old, new in zip(expected[name].get(quantity, ()), results[name].get(quantity, ())):
                worst = max(worst, abs(new - old) / abs(old) if old else (0.0 if new == old else math.inf))
    return worst


def machine() -> dict:
    """Where the stored values were made (information only; never compared)."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load() -> dict:
    return json.loads(GOLDEN.read_text())["runs"]


def _stored() -> dict:
    """The stored runs for a comparison before ``--write`` (empty if the file is missing or of an older layout)."""
    try:
        return load()
    except (OSError, KeyError, ValueError):
        return {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Regenerate tests/golden/tiny_runs.json.")
    args = parser.parse_args(argv)
    results = golden_runs()
    expected = _stored()
    changed = differences(expected, results)
    print(f"largest relative difference from the stored values: {max_relative_difference(expected, results):.1e}")
    print("\n".join(changed) if changed else f"golden runs unchanged (relative tolerance {RTOL:g})")
    if args.write:
        GOLDEN.write_text(json.dumps({"machine": machine(), "runs": results}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
