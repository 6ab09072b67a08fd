"""What a finished pretraining run reports: its final metrics, a greedy sample, and the JSON files it writes beside
the model (``metrics.json``, ``eval_results.json``, ``training_summary.json``), which `hf-lowrank push` turns into
the model card."""

import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import transformers
from datasets import IterableDataset

from ..files import EVAL_RESULTS_NAME, TRAINING_SUMMARY_NAME, write_json_atomic

METRICS_NAME = "metrics.json"


def hardware() -> str:
    """The accelerators (or the CPU, its cores and torch's threads) this process trains on, for the summary."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


@torch.no_grad()
def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """A greedy continuation of ``prompt``: deterministic, so two runs of the same weights print the same text."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def scored_eval_tokens(eval_dataset, block_size: int, training_args) -> int:
    """Tokens the final evaluation scored: every block but its first token (nothing in the block predicts it),
    over the blocks the Trainer's evaluation loader yields (``dataloader_drop_last`` drops a last partial batch
    per process). A streamed split is counted by reading it once more."""
    blocks = len(eval_dataset) if not isinstance(eval_dataset, IterableDataset) else sum(1 for _ in eval_dataset)
    if training_args.dataloader_drop_last:
        per_step = training_args.per_device_eval_batch_size * training_args.world_size
        blocks -= blocks % per_step
    return blocks * (block_size - 1)


def final_metrics(trainer, train_result, eval_loss: float, guard, counts, **extra) -> dict:
    """``metrics.json``: the losses, the step guard's counters, the largest update/lr ratio the diagnostics logged,
    and the parameter counts; ``extra`` adds the data-dependent entries (unigram baseline, scored tokens)."""
    return {
        "train_loss": train_result.training_loss,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss < 50 else float("inf"),
        **extra,
        "loss_spikes": guard.spike_detector.spikes,
        "skipped_steps": guard.skipped_steps,
        "rollbacks": guard.rollbacks,
        "max_update_over_lr": max(
            (row["diag/update_over_lr_max"] for row in trainer.state.log_history if "diag/update_over_lr_max" in row),
            default=None,
        ),
        "parameters": counts.total,
        "dense_parameters": counts.dense_total,
    }


def training_summary(trainer, train_result, *, started: float, train_seconds: float, **fields) -> dict:
    """``training_summary.json``: what was trained, on what, for how long; ``fields`` are the run's settings
    (preset, optimizer, dataset, ...), which the caller knows and this module does not."""
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    block_size = fields["block_size"]
    return {
        **fields,
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(args.lr_scheduler_type),
        "max_steps": trainer.state.global_step,
        "global_batch_size": global_batch,
        "train_tokens": trainer.state.global_step * global_batch * block_size,
        "wall_time_s": round(time.time() - started, 1),
        "train_time_s": round(train_seconds, 1),
        "hardware": hardware(),
        "world_size": args.world_size,
        "seed": args.seed,
        "final_train_loss": train_result.training_loss,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def write_run_files(output_dir: Path, metrics: dict, eval_results: dict, summary: dict) -> None:
    """The three JSON files of a finished run (main process only)."""
    for name, payload in ((METRICS_NAME, metrics), (EVAL_RESULTS_NAME, eval_results), (TRAINING_SUMMARY_NAME, summary)):
        write_json_atomic(output_dir / name, payload, sort_keys=False)  # keys in the order they were written


def completed_metrics(output_dir: Path, completed: dict) -> dict:
    """What a re-run of a finished run returns, changing nothing: the metrics it saved, plus its completion record
    under ``already_complete`` (R19)."""
    metrics = json.loads((output_dir / METRICS_NAME).read_text())
    return {**metrics, "already_complete": completed}
