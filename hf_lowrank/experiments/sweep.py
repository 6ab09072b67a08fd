"""Stability sweep: the paper's ablation (naive low-rank AdamW, orthogonalization only, renormalization only,
Spectron) plus the dense baseline, over a learning-rate grid per variant, with divergence, loss spikes and the
spectral norm of the weight update ‖ΔW‖₂ recorded for every run, and a dense-vs-factorized equal-FLOPs pair.

Every run is the package's own training path: `LowRankLlamaForCausalLM(preset_config(...))` trained by
`LowRankTrainer` with `SpectralDiagnosticsCallback`, on the built-in corpus tokenized once by `build_datasets`.
A run writes one JSON under ``<out>/runs/`` (atomically), so a stopped sweep restarts where it left off.

Order of work: the grid (seed 0 at every lr of every variant); as soon as a variant's grid is complete, its best
lr (lowest final validation loss among the runs that did not diverge) gets the further seeds and, for the
variants in ``flops_variants``, one run at the dense model's training FLOPs. ``report.py`` turns the run files
into ``results.json``, ``results.md`` and the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from ..presets import count_parameters, preset_config


# ------------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    label: str
    dense: bool
    optimizer: str  # an `OptimizerArguments.optimizer` name
    rebalance_every: int = 0


VARIANTS: dict[str, Variant] = {
    "dense-adamw": Variant("dense + AdamW", dense=True, optimizer="adamw"),
    "lowrank-adamw": Variant("low-rank + AdamW (naive)", dense=False, optimizer="adamw"),
    "lowrank-muon": Variant("low-rank + orthogonalization only", dense=False, optimizer="muon"),
    "lowrank-renorm": Variant("low-rank + renormalization only", dense=False, optimizer="renorm"),
    "lowrank-spectron": Variant("low-rank + Spectron", dense=False, optimizer="spectron"),
    "lowrank-spectron-rebalance": Variant(
        "low-rank + Spectron + re-balancing (every 10 steps)", dense=False, optimizer="spectron", rebalance_every=10
    ),
}

# AdamW's lr is a per-entry step; the Spectron family's lr is the spectral-norm bound of each step's ΔW (with
# "muon", ‖ΔA‖₂ ≈ lr per factor, so ‖ΔW‖₂ ≈ lr·(‖A‖₂ + ‖B‖₂)). Half-decade grids, at least 100× wide. The first
# full sweep ran five values per variant; the values marked "added" were run after it, because the best lr sat at
# an edge (dense 1e-3, renorm 0.03) or because no run of the variant had diverged yet (the tops of the grids).
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "dense-adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),  # added: 3e-4, 0.3, 1
    "lowrank-adamw": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),  # added: 0.3, 1
    "lowrank-muon": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),  # added: 1
    "lowrank-renorm": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),  # added: 0.003, 0.01
    "lowrank-spectron": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),  # added: 3
    "lowrank-spectron-rebalance": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),  # added: 3
}


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class SweepSettings:
    """Everything that defines a run besides its variant, lr and seed (hashed into each run's fingerprint)."""

    # h=256, 6 layers, vocab 16384, untied embeddings: 10.27M parameters factorized (13.14M dense), of which 8.4M
    # are embeddings. The input embedding costs no FLOPs, so a large vocab passes 10M parameters at the least
    # per-token cost a 2-core CPU can afford; the trunk is still 6 full LLaMA layers at rank 64.
    preset: str = "small"
    model_overrides: dict = field(
        default_factory=lambda: dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=6,
            num_attention_heads=4,
            vocab_size=16384,
            max_position_embeddings=64,
        )
    )
    # 150 steps × 512 tokens: what 2 single-thread workers afford for ~40 runs in under an hour on a shared
    # 2-core CPU (about 0.5 s per step per core).
    block_size: int = 64
    batch_size: int = 8
    max_steps: int = 150  # the fixed token budget of every run but the equal-FLOPs ones
    warmup_ratio: float = 0.05  # linear warm-up as in the paper, then cosine decay to 0
    max_grad_norm: float = 1.0
    adamw_lr: float = 3e-3  # AdamW groups (embeddings, LM head, norms) next to the Spectron family
    diagnostics_every: int = 4  # steps between ‖ΔW‖₂ measurements (each costs ~0.15 s: QRs over 42 projections)
    spike_window: int = 20
    spike_threshold: float = 4.0
    spike_min_increase: float = 0.05
    spike_warmup: int = 20
    divergence_patience: int = 20  # stop a run whose loss stays above its initial loss this many steps
    eval_blocks: int = 128  # the fixed validation subset: the first blocks of the validation split
    eval_batch_size: int = 16
    max_corpus_bytes: int = 8_000_000
    seed: int = 0  # seed of the grid runs; further seeds are seed + 1, seed + 2, ...
    # Not part of a run's identity:
    seeds: int = 2  # seeds at each variant's best lr (the grid run counts as the first)
    lr_grids: dict = field(default_factory=lambda: dict(DEFAULT_LR_GRIDS))
    flops_variants: tuple = ("lowrank-spectron", "lowrank-adamw")
    threads_per_worker: int = 1

    _NOT_IN_FINGERPRINT = ("seeds", "lr_grids", "flops_variants", "threads_per_worker")

    def fingerprint(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_IN_FINGERPRINT}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def data_fingerprint(self) -> str:
        fields = [self.max_corpus_bytes, self.block_size, self.model_overrides.get("vocab_size"), self.eval_blocks]
        return hashlib.sha256(json.dumps([self.preset, *fields]).encode()).hexdigest()[:12]

    def model_config(self, dense: bool, **special_ids):
        overrides = {**self.model_overrides, **special_ids}
        if dense:
            overrides["lowrank_modules"] = []
        return preset_config(self.preset, **overrides)


def smoke_settings() -> SweepSettings:
    """Seconds-long settings: the `tiny` preset, a few steps, 2 variants × 2 lrs (the tool's smoke test)."""
    return SweepSettings(
        preset="tiny",
        model_overrides=dict(max_position_embeddings=64),
        block_size=64,
        batch_size=4,
        max_steps=8,
        diagnostics_every=1,
        spike_window=3,
        spike_warmup=2,
        divergence_patience=4,
        eval_blocks=8,
        eval_batch_size=8,
        max_corpus_bytes=250_000,
        lr_grids={"dense-adamw": (1e-3, 3e-3), "lowrank-spectron": (0.02, 0.05)},
        flops_variants=("lowrank-spectron",),
    )


def training_flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token: 6 × (projection matmul parameters + LM head) + 6 × layers × seq_len × width for
    attention scores and values (Kaplan et al. 2020, forward 2N + 2·L·T·d, backward twice the forward).
    Embedding lookups, norms and the softmax are left out. A factor pair costs rank × (in + out)."""
    matmul = 0
    for name, (in_features, out_features) in config.projection_shapes().items():
        rank = config.rank_for(name)
        matmul += in_features * out_features if rank is None else rank * (in_features + out_features)
    matmul = matmul * config.num_hidden_layers + config.vocab_size * config.hidden_size
    attention = config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6 * matmul + 6 * attention


# ------------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class Job:
    variant: str
    lr: float
    seed: int
    steps: int
    role: str  # "grid" | "seed" | "flops"

    @property
    def id(self) -> str:
        return f"{self.variant}_lr{self.lr:.4g}_seed{self.seed}_steps{self.steps}"


@dataclass
class SweepPlan:
    """Which runs the sweep holds, given the settings and the variants selected."""

    settings: SweepSettings
    variants: list[str]

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; choose from {list(VARIANTS)}.")
        missing = [v for v in self.variants if not self.settings.lr_grids.get(v)]
        if missing:
            raise ValueError(f"No learning-rate grid for {missing}; pass --lrs or add them to `lr_grids`.")
        if self.settings.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.settings.seeds}.")
        s = self.settings
        self.flops_per_token = {
            kind: training_flops_per_token(s.model_config(dense=kind == "dense"), s.block_size)
            for kind in ("dense", "factorized")
        }
        self.tokens_per_step = s.batch_size * s.block_size

    def grid_jobs(self) -> list[Job]:
        s = self.settings
        return [Job(v, lr, s.seed, s.max_steps, "grid") for v in self.variants for lr in s.lr_grids[v]]

    def flops_steps(self, variant: str) -> int:
        """Steps at which `variant` spends the dense model's training FLOPs of a `max_steps` run."""
        kind = "dense" if VARIANTS[variant].dense else "factorized"
        return round(self.settings.max_steps * self.flops_per_token["dense"] / self.flops_per_token[kind])

    def followups(self, variant: str, done: dict[str, dict]) -> list[Job]:
        """Further seeds (and the equal-FLOPs run) at `variant`'s best lr, once its grid is complete."""
        s = self.settings
        grid = [done.get(job.id) for job in self.grid_jobs() if job.variant == variant]
        if any(record is None for record in grid):
            return []
        best = best_learning_rate(grid)
        if best is None:  # every lr diverged: nothing to repeat
            return []
        jobs = [Job(variant, best, s.seed + i, s.max_steps, "seed") for i in range(1, s.seeds)]
        if variant in s.flops_variants and not VARIANTS[variant].dense:
            jobs.append(Job(variant, best, s.seed, self.flops_steps(variant), "flops"))
        return jobs

    def expected_runs(self) -> int:
        flops = sum(1 for v in self.variants if v in self.settings.flops_variants and not VARIANTS[v].dense)
        return len(self.grid_jobs()) + len(self.variants) * (self.settings.seeds - 1) + flops

    def cost(self, job: Job) -> float:
        """Estimated training FLOPs of `job` (for the ETA)."""
        kind = "dense" if VARIANTS[job.variant].dense else "factorized"
        return job.steps * self.tokens_per_step * self.flops_per_token[kind]


def best_learning_rate(grid_records: list[dict]) -> float | None:
    finished = [r for r in grid_records if not r["diverged"]]
    return min(finished, key=lambda r: r["final_loss"])["lr"] if finished else None


def is_diverged(final_loss: float, initial_loss: float, stop_reason: str | None = None) -> bool:
    """A run diverged if its final loss is non-finite or above its initial loss, or it was stopped for either."""
    return stop_reason is not None or not math.isfinite(final_loss) or final_loss > initial_loss


# ------------------------------------------------------------------------------------------------ data
def prepare_data(settings: SweepSettings, cache_dir: Path, log=print) -> tuple[Path, dict]:
    """Tokenize the built-in corpus once (cached under `cache_dir`); every worker memory-maps the result."""
    from ..training.data import DataArguments, build_datasets
    from ..training.pretrain import unigram_cross_entropy

    data_dir = Path(cache_dir) / f"data-{settings.data_fingerprint()}"
    info_path = data_dir / "info.json"
    if info_path.is_file():
        return data_dir, json.loads(info_path.read_text())
    started = time.time()
    config = settings.model_config(dense=False)
    args = DataArguments(max_corpus_bytes=settings.max_corpus_bytes, block_size=settings.block_size)
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
    _write_json_atomic(info_path, info)
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


# ------------------------------------------------------------------------------------------------ one run
def _recorder_classes():
    """The two hooks a run needs, built lazily so that importing this module does not import transformers:

    * ``LossRecorder``, a `StepGuard` that sees every optimizer step's loss before the update: it keeps the loss
      curve, raises on the first non-finite loss or gradient (``max_consecutive_nonfinite=0``: in a stability
      sweep that is a divergence, not a step to skip), and flags a loss stuck above its initial value;
    * ``UpdateRecorder``, a `SpectralDiagnosticsCallback` that keeps every measured ‖ΔW‖₂ and stops the run
      once the guard has flagged it.
    """
    from ..training.diagnostics import SpectralDiagnosticsCallback
    from ..training.guards import StepGuard

    class LossRecorder(StepGuard):
        def __init__(self, spike_detector, patience: int):
            super().__init__(max_consecutive_nonfinite=0, spike_detector=spike_detector, spike_action="log")
            self.patience = patience
            self.losses: list[float] = []
            self.stop_reason: str | None = None
            self._steps_above = 0

        def decide(self, loss, grads_finite, step, device=None):
            self.losses.append(loss)
            if math.isfinite(loss) and len(self.losses) > 1 and loss > self.losses[0]:
                self._steps_above += 1
                if self._steps_above >= self.patience and self.stop_reason is None:
                    self.stop_reason = f"loss above the initial loss for {self.patience} steps (step {step})"
            else:
                self._steps_above = 0
            return super().decide(loss, grads_finite, step, device)

    class UpdateRecorder(SpectralDiagnosticsCallback):
        def __init__(self, every, spike_detector, guard: LossRecorder):
            super().__init__(every=every, spike_detector=spike_detector)
            self.guard = guard
            self.update_norms: list[tuple[int, float]] = []  # (step, max over projections of ‖ΔW‖₂)
            self.sigmas: list[tuple[int, float, float]] = []  # (step, max σ(up), max σ(down))

        def on_optimizer_step(self, args, state, control, **kwargs):
            measured = self._snapshot is not None
            super().on_optimizer_step(args, state, control, **kwargs)
            if measured:
                step = state.global_step + 1  # the step being taken (global_step counts finished ones)
                self.update_norms.append((step, self._pending["diag/update_norm_max"]))
                if "diag/sigma_up_max" in self._pending:
                    self.sigmas.append((step, self._pending["diag/sigma_up_max"], self._pending["diag/sigma_down_max"]))

        def on_step_end(self, args, state, control, **kwargs):
            if self.guard.stop_reason is not None:
                control.should_training_stop = True

    return LossRecorder, UpdateRecorder


def train_run(job: Job, settings: SweepSettings, data_dir: Path) -> dict:
    """Train one run with the package's Trainer and return its record (final loss, curves, diagnostics)."""
    import torch
    from transformers import PrinterCallback, TrainingArguments, default_data_collator, set_seed

    from ..modeling_lowrank import LowRankLlamaForCausalLM
    from ..training.arguments import OptimizerArguments
    from ..training.diagnostics import LossSpikeDetector
    from ..training.guards import NonFiniteTrainingError
    from ..training.trainer import LowRankTrainer

    started = time.time()
    train, validation, info = _load_data(data_dir)
    variant = VARIANTS[job.variant]
    config = settings.model_config(dense=variant.dense, **info["special_ids"])
    set_seed(job.seed)
    model = LowRankLlamaForCausalLM(config)
    loss_recorder_class, update_recorder_class = _recorder_classes()
    detector = LossSpikeDetector(
        window=settings.spike_window,
        threshold=settings.spike_threshold,
        min_increase=settings.spike_min_increase,
        warmup=settings.spike_warmup,
    )
    guard = loss_recorder_class(detector, patience=settings.divergence_patience)
    recorder = update_recorder_class(settings.diagnostics_every, detector, guard)
    optimizer_args = OptimizerArguments(
        optimizer=variant.optimizer,
        # AdamW ("adamw") trains every parameter at `lr`; the Spectron family keeps its AdamW groups fixed.
        adamw_learning_rate=None if variant.optimizer == "adamw" else settings.adamw_lr,
        rebalance_every=variant.rebalance_every,
    )
    with tempfile.TemporaryDirectory(prefix="stability-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=job.steps,
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.eval_batch_size,
            learning_rate=job.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, math.ceil(settings.warmup_ratio * job.steps)),
            weight_decay=0.0,
            max_grad_norm=settings.max_grad_norm,
            logging_steps=settings.diagnostics_every,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=job.seed,
            data_seed=job.seed,
            dataloader_pin_memory=False,
            dataloader_drop_last=True,
            disable_tqdm=True,
        )
        trainer = LowRankTrainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=default_data_collator,
            callbacks=[recorder],
            optimizer_args=optimizer_args,
            guard=guard,
        )
        trainer.remove_callback(PrinterCallback)
        train_started = time.time()
        try:
            trainer.train()
        except NonFiniteTrainingError:  # the guard stopped at the first NaN/inf loss or gradient
            guard.stop_reason = f"non-finite loss or gradient at step {len(guard.losses)}"
        train_time = time.time() - train_started
        final_loss = float(trainer.evaluate(eval_dataset=validation)["eval_loss"])
    losses = guard.losses
    initial_loss = losses[0]
    finite_updates = [u for _, u in recorder.update_norms if math.isfinite(u)]
    steps_done = len(losses)
    tokens = steps_done * settings.batch_size * settings.block_size
    return {
        "id": job.id,
        "fingerprint": settings.fingerprint(),
        **dataclasses.asdict(job),
        "label": variant.label,
        "dense": variant.dense,
        "optimizer": variant.optimizer,
        "rebalance_every": variant.rebalance_every,
        "adamw_lr": job.lr if variant.optimizer == "adamw" else settings.adamw_lr,
        "parameters": count_parameters(config).total,
        "flops_per_token": training_flops_per_token(config, settings.block_size),
        "steps_done": steps_done,
        "tokens": tokens,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "diverged": is_diverged(final_loss, initial_loss, guard.stop_reason),
        "stop_reason": guard.stop_reason,
        "nonfinite_parameters": not all(torch.isfinite(p).all() for p in model.parameters()),
        "spikes": detector.spikes,
        "max_update_norm": max(finite_updates, default=float("nan")),
        "nonfinite_update_norm": len(finite_updates) < len(recorder.update_norms),
        "wall_time_s": round(time.time() - started, 2),
        "train_time_s": round(train_time, 2),
        "tokens_per_s": round(tokens / train_time, 1),
        "threads": torch.get_num_threads(),
        "losses": losses,
        "update_norms": recorder.update_norms,
        "sigmas": recorder.sigmas,
    }


def _worker_init(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_lowrank").setLevel(logging.ERROR)  # per-step guard warnings: the run record has them


def _worker_run(job: Job, settings: SweepSettings, data_dir: Path, runs_dir: Path) -> dict:
    record = train_run(job, settings, data_dir)
    _write_json_atomic(runs_dir / f"{job.id}.json", record)
    return record


class _InlineExecutor(Executor):
    """Runs each job at submission, in this process (``--workers 0``: tests and debugging)."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # handed to the caller by future.result(), as a process pool does
            future.set_exception(error)
        return future


# ------------------------------------------------------------------------------------------------ the sweep
def load_finished(runs_dir: Path, fingerprint: str, log=print) -> dict[str, dict]:
    """Finished runs of these settings, by id; runs of other settings are ignored (and will be retrained)."""
    done = {}
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("fingerprint") == fingerprint:
            done[record["id"]] = record
        else:
            log(f"ignoring {path.name}: trained with other settings (fingerprint {record.get('fingerprint')})")
    return done


def run_sweep(
    settings: SweepSettings,
    out_dir: str | os.PathLike,
    *,
    variants: list[str] | None = None,
    workers: int = 2,
    cache_dir: str | os.PathLike = "runs/stability-cache",
    log=print,
) -> dict:
    """Train every run of the sweep not already under ``out_dir/runs``, then write the report.

    Returns ``{"trained": [ids trained by this call], "summary": the results.json payload}``.
    """
    from .report import write_report

    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = SweepPlan(settings, list(variants or settings.lr_grids))
    data_dir, data_info = prepare_data(settings, Path(cache_dir), log=log)
    done = load_finished(runs_dir, settings.fingerprint(), log=log)

    pending = [job for job in plan.grid_jobs() if job.id not in done]
    queued = {job.id for job in plan.grid_jobs()}

    def queue_followups() -> None:
        for variant in plan.variants:
            for job in plan.followups(variant, done):
                if job.id not in queued:
                    queued.add(job.id)
                    if job.id not in done:
                        pending.insert(0, job)  # first: they are the longest jobs, and the grid can fill gaps

    queue_followups()
    total = plan.expected_runs()
    log(
        f"{sum(i in done for i in queued)} of {total} runs already finished; training the rest on {max(workers, 1)} worker(s) "
        f"with {settings.threads_per_worker} thread(s) each"
    )
    trained: list[str] = []
    started, trained_cost = time.time(), 0.0
    executor = (
        _InlineExecutor()
        if workers == 0
        else ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(settings.threads_per_worker,),
        )
    )
    running: dict[Future, Job] = {}
    with executor:
        while pending or running:
            while pending and len(running) < max(workers, 1):
                job = pending.pop(0)
                running[executor.submit(_worker_run, job, settings, data_dir, runs_dir)] = job
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                record = future.result()
                done[job.id] = record
                trained.append(job.id)
                trained_cost += plan.cost(job)
                queue_followups()
                elapsed = time.time() - started
                remaining = sum(plan.cost(j) for j in pending) + sum(plan.cost(j) for j in running.values()) / 2
                remaining += _unqueued_cost(plan, done, queued)
                eta = remaining * elapsed / trained_cost
                log(
                    f"[{sum(i in done for i in queued)}/{total}] {job.id}: final loss {record['final_loss']:.3f}"
                    f"{' DIVERGED' if record['diverged'] else ''}, {record['spikes']} spikes, "
                    f"max ‖ΔW‖₂ {record['max_update_norm']:.3g}, {record['wall_time_s']:.0f} s | "
                    f"elapsed {_clock(elapsed)}, ETA {_clock(eta)}"
                )
    summary = write_report(out_dir, plan, done, data_info)
    log(f"wrote {out_dir}/results.json, results.md and plots ({len(trained)} runs trained by this call)")
    return {"trained": trained, "summary": summary}


def _unqueued_cost(plan: SweepPlan, done: dict, queued: set) -> float:
    """Estimated cost of the follow-ups of grids still in progress (their lr is not known yet)."""
    s, cost = plan.settings, 0.0
    for variant in plan.variants:
        if any(job.id not in queued for job in plan.followups(variant, done)):
            continue
        grid_done = all(job.id in done for job in plan.grid_jobs() if job.variant == variant)
        if not grid_done:
            probe = Job(variant, 0.0, s.seed, s.max_steps, "seed")
            cost += (s.seeds - 1) * plan.cost(probe)
            if variant in s.flops_variants and not VARIANTS[variant].dense:
                cost += plan.cost(dataclasses.replace(probe, steps=plan.flops_steps(variant)))
    return cost


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _write_json_atomic(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stability_sweep", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="Results folder: runs/*.json, results.json/.md, plots.")
    parser.add_argument("--smoke", action="store_true", help="Seconds-long tiny settings (checks the tool).")
    parser.add_argument("--workers", type=int, default=2, help="Training processes (0: in this process).")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per worker.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="Default: every variant.")
    parser.add_argument("--lrs", nargs="+", type=float, help="One lr grid for every selected variant.")
    parser.add_argument("--seeds", type=int, help="Seeds at each variant's best lr (default 2).")
    parser.add_argument("--max-steps", type=int, help="Steps of the fixed token budget (default 200).")
    parser.add_argument("--cache-dir", default="runs/stability-cache", help="Where the tokenized corpus is kept.")
    args = parser.parse_args(argv)
    settings = smoke_settings() if args.smoke else SweepSettings()
    settings.threads_per_worker = args.threads
    if args.seeds is not None:
        settings.seeds = args.seeds
    if args.max_steps is not None:
        settings.max_steps = args.max_steps
    variants = args.variants or list(settings.lr_grids)
    if args.lrs:
        settings.lr_grids = {v: tuple(args.lrs) for v in variants}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    run_sweep(settings, args.out, variants=variants, workers=args.workers, cache_dir=args.cache_dir)
    return 0
