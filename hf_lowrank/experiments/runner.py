"""One segment of one run of the stability study, trained by the package's own pretraining path.

Every run is built as `hf-lowrank pretrain` builds its run: the same model class, the same argument dataclasses
(`OptimizerArguments`, `RunArguments`), `build_trainer` (the `LowRankTrainer` with its `StepGuard`, loss-spike
detector, divergence stop and `SpectralDiagnosticsCallback`), and data from `build_datasets`. Divergence and
spikes are what those user-facing detectors decide; the curves are read from ``trainer.state.log_history``.
Checkpoints are the trainer's own crash-safe ones, so a run stopped at a rung (or killed) continues bitwise
exactly where it stood.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

from ..bench.flops import training_flops_per_token
from ..files import write_json_atomic, write_text_atomic
from .plan import VARIANTS, Segment, StudySettings

# Keys of the diagnostics callback kept in a run's record (max and mean over the projections).
DIAGNOSTICS = (
    "sigma_up_max", "sigma_up_mean", "sigma_down_max", "sigma_down_mean", "update_norm_max", "update_norm_mean",
    "weight_norm_max", "weight_norm_mean", "update_over_lr_max",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ data
def prepare_data(settings: StudySettings, cache_dir: Path, log=print) -> tuple[Path, dict]:
    """Train the tokenizer and pack the built-in corpus once (cached under `cache_dir`); workers memory-map it."""
    from ..training.data import DataArguments, build_datasets, unigram_cross_entropy

    data_dir = Path(cache_dir) / f"data-{settings.data_fingerprint()}"
    info_path = data_dir / "info.json"
    if info_path.is_file():
        return data_dir, json.loads(info_path.read_text())
    started = time.time()
    config = settings.model_config(dense=False)
    source = dict(settings.data) if settings.data else {"max_corpus_bytes": settings.max_corpus_bytes}
    args = DataArguments(block_size=settings.block_size, **source)
    tokenizer, train, validation = build_datasets(
        args, output_dir=str(data_dir), block_size=settings.block_size, config=config
    )
    if len(validation) < settings.eval_blocks:
        raise ValueError(
            f"The validation split has {len(validation)} blocks, fewer than eval_blocks={settings.eval_blocks}."
        )
    validation = validation.select(range(settings.eval_blocks))
    train.save_to_disk(str(data_dir / "train"))
    validation.save_to_disk(str(data_dir / "validation"))
    info = {
        "special_ids": {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "tokenizer_size": len(tokenizer),
        "train_tokens": len(train) * settings.block_size,
        "validation_tokens": len(validation) * settings.block_size,
        "unigram_loss": unigram_cross_entropy(train, validation, config.vocab_size),
    }
    write_json_atomic(info_path, info)
    log(f"tokenized the corpus in {time.time() - started:.0f} s: {info['train_tokens']:,} training tokens")
    return data_dir, info


_DATA: dict[str, tuple] = {}


def _load_data(data_dir: Path):
    from datasets import load_from_disk

    key = str(data_dir)
    if key not in _DATA:
        info = json.loads((data_dir / "info.json").read_text())
        _DATA[key] = (load_from_disk(str(data_dir / "train")), load_from_disk(str(data_dir / "validation")), info)
    return _DATA[key]


# ------------------------------------------------------------------------------------------------ one segment
def _stop_at_callback(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Ends training after optimizer step ``step`` of the (longer) schedule, with a checkpoint there."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True
                control.should_save = True
            return control

    return StopAt()


def train_segment(segment: Segment, settings: StudySettings, data_dir: Path, checkpoints: Path, previous=None):
    """Train ``segment.job`` from its newest complete checkpoint up to ``segment.stop_at``, evaluate it on the
    fixed validation subset, and return the run's record (which carries the whole curve so far)."""
    import torch
    from transformers import PrinterCallback, TrainingArguments, set_seed
    from transformers.trainer_callback import TrainerState

    from ..modeling_lowrank import LowRankLlamaForCausalLM
    from ..training.arguments import OptimizerArguments, RunArguments
    from ..training.checkpointing import checkpoint_step, latest_complete_checkpoint
    from ..training.guards import NonFiniteTrainingError, TrainingDivergedError
    from ..training.trainer import build_trainer

    started = time.time()
    job = segment.job
    train, validation, info = _load_data(data_dir)
    variant = VARIANTS[job.variant]
    config = settings.model_config(variant.dense, job.rank_ratio, **info["special_ids"])
    run_dir = Path(checkpoints) / job.id
    set_seed(job.seed)
    model = LowRankLlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=job.steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=job.lr,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=math.ceil(settings.warmup_ratio * job.steps),  # ≥ 1 step for any ratio > 0; 0: none
        bf16=settings.bf16,
        weight_decay=0.0,
        adam_beta1=settings.adamw_betas[0],
        adam_beta2=settings.adamw_betas[1],
        max_grad_norm=settings.max_grad_norm if job.clip else 0.0,  # 0 turns clipping off
        logging_steps=1,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=1,
        report_to="none",
        use_cpu=settings.device == "cpu",
        seed=job.seed,
        data_seed=job.seed,
        dataloader_pin_memory=False,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    optimizer_args = OptimizerArguments(
        optimizer=variant.optimizer,
        # AdamW ("adamw") trains every parameter at `lr`; the Spectron family keeps its AdamW groups at adamw_lr.
        adamw_learning_rate=None if variant.optimizer == "adamw" else settings.adamw_lr,
    )
    run_args = RunArguments(
        diagnostics_steps=settings.diagnostics_every,
        max_consecutive_nonfinite=0,  # in a stability study the first NaN/inf loss or gradient is a divergence
        divergence_patience=settings.divergence_patience,
    )
    trainer = build_trainer(
        model, args, optimizer_args, run_args, train_dataset=train, callbacks=(_stop_at_callback(segment.stop_at),)
    )
    trainer.remove_callback(PrinterCallback)
    guard = trainer.guard
    resume = latest_complete_checkpoint(run_dir)
    stop_reason = None
    train_started = time.time()
    if resume is not None and checkpoint_step(resume) > segment.stop_at:
        raise ValueError(
            f"{resume} is past step {segment.stop_at}, where this segment of {job.id} stops: the folder belongs to "
            "another study. Delete it, or use another --cache_dir."
        )
    if resume is not None and checkpoint_step(resume) == segment.stop_at:
        # Killed after the checkpoint at the target was written but before the record was: load, don't train.
        trainer._load_from_checkpoint(resume)
        trainer._load_extra_state(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
    else:
        try:
            trainer.train(resume_from_checkpoint=resume)
        except (NonFiniteTrainingError, TrainingDivergedError) as error:
            stop_reason = f"{type(error).__name__}: {error}"
    train_time = time.time() - train_started

    history = [row for row in trainer.state.log_history if "loss" in row]
    steps_done = history[-1]["step"] if history else 0
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    final_loss = float(trainer.evaluate(eval_dataset=validation)["eval_loss"]) if finite else float("nan")
    evals = dict((previous or {}).get("evals", {}))
    evals[str(steps_done)] = final_loss
    initial_loss = history[0]["loss"] if history else float("nan")
    diverged = stop_reason is not None or not math.isfinite(final_loss) or final_loss > initial_loss
    diag = {key: [row.get(f"diag/{key}") for row in history if "diag/update_norm_max" in row] for key in DIAGNOSTICS}
    diag["step"] = [row["step"] for row in history if "diag/update_norm_max" in row]
    finite_updates = [u for u in diag["update_norm_max"] if u is not None and math.isfinite(u)]
    tokens = steps_done * settings.tokens_per_step
    now = time.time()
    this = {"stop_at": segment.stop_at, "wall_s": round(now - started, 1), "finished_at": round(now, 1)}
    segments = [*(previous or {}).get("segments", []), this]
    trained_tokens = (steps_done - (checkpoint_step(resume) if resume else 0)) * settings.tokens_per_step
    return {
        "id": job.id,
        "fingerprint": settings.fingerprint(),
        **dataclasses.asdict(job),
        "part": segment.part,
        "label": variant.label,
        "dense": variant.dense,
        "optimizer": variant.optimizer,
        "adamw_lr": job.lr if variant.optimizer == "adamw" else settings.adamw_lr,
        "rank": config.rank_for("q_proj"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": training_flops_per_token(config, settings.block_size),
        "steps_done": steps_done,
        "tokens": tokens,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "evals": evals,
        "diverged": diverged,
        "stop_reason": stop_reason,
        "nonfinite_parameters": not finite,
        "spikes": guard.spike_detector.spikes,
        "skipped_steps": guard.skipped_steps,
        "max_update_norm": max(finite_updates, default=float("nan")),
        "nonfinite_update_norm": len(finite_updates) < len(diag["update_norm_max"]),
        "wall_time_s": round(sum(s["wall_s"] for s in segments), 1),
        "segments": segments,
        "tokens_per_s": round(max(trained_tokens, 0) / max(train_time, 1e-9), 1),
        "threads": torch.get_num_threads(),
        "device": settings.device,
        "curve": {
            "step": [row["step"] for row in history],
            "loss": [row["loss"] for row in history],
            "grad_norm": [row.get("grad_norm") for row in history],
            "lr": [row.get("learning_rate") for row in history],
        },
        "diagnostics": diag,
    }


def worker_init(threads: int) -> None:
    _end_with_parent()
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)  # per-step guard warnings: the run record has them


def _end_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the study process dies (a killed study left workers training on);
    the run's crash-safe checkpoints make that safe. A no-op elsewhere."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_segment(segment: Segment, settings: StudySettings, data_dir: Path, runs_dir: Path, checkpoints: Path) -> dict:
    """Train one segment and write its run's record atomically (the unit of progress of the study)."""
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    path = Path(runs_dir) / f"{segment.job.id}.json"
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None and previous.get("fingerprint") != settings.fingerprint():
        previous = None
    record = train_segment(segment, settings, data_dir, checkpoints, previous)
    write_text_atomic(path, record_text(record))
    return record


def record_text(record: dict) -> str:
    """A record as JSON with one top-level key per line: small diffs, curves kept on one line each."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"
