"""Command-line arguments of `hf-lowrank pretrain`, as dataclasses for `transformers.HfArgumentParser`.

Every `TrainingArguments` flag works as in transformers' `run_clm.py`; these add the model, the optimizer and
the diagnostics. Defaults are sized for the built-in corpus on a CPU (the default main job).
"""

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from ..optim import ADAMW_DEFAULTS, DEFAULT_ADAMW_LR, OPTIMIZER_NAMES

# 8 MB of the standard library (about 2/3 of CPython 3.11's 12 MB of non-test source, ~2.5M tokens at vocab
# 4096): enough text for the CPU-sized presets, small enough that tokenizer training plus packing takes seconds.
DEFAULT_MAX_CORPUS_BYTES = 8_000_000


@dataclass
class DataArguments:
    """Which text to train on and how to turn it into blocks (rendered as CLI flags by `HfArgumentParser`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Name of a dataset on the Hugging Face Hub (needs a network), e.g. 'allenai/c4', or a local "
            "folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name, e.g. 'en'."}
    )
    train_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Local training files or globs: .txt (one document per file, see --text_sample_by), "
            ".json/.jsonl, .parquet, .csv or .arrow (one document per record or row, text in --text_column). "
            "Without --dataset_name and --train_files the Python standard library source is used."
        },
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={"help": "Local validation files or globs, same format as --train_files."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text in JSON/Hub datasets."})
    text_sample_by: Literal["document", "paragraph", "line"] = field(
        default="document",
        metadata={
            "help": "What one document is in a .txt file: the whole file, each paragraph, or each line. An eos "
            "token ends every document."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the data instead of tokenizing it all up front (for corpora larger than disk)."},
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percentage of training documents held out for validation when the data has no validation "
            "split; 0 means no validation."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence; defaults to the model's max_position_embeddings."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Pretrained tokenizer name or path; by default a byte-level BPE is trained on the data."},
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the trained tokenizer (when --tokenizer_name is unset); default: the "
            "model's vocab_size (4096 without a model config)."
        },
    )
    tokenizer_train_bytes: int | None = field(
        default=100_000_000,
        metadata={"help": "At most this many bytes of training text are used to train the tokenizer; 0 = all."},
    )
    max_corpus_bytes: int | None = field(
        default=DEFAULT_MAX_CORPUS_BYTES,
        metadata={
            "help": "Bytes of the built-in standard-library corpus to use (train + validation); 0 = all of it "
            "(about 12 MB on CPython 3.11). The default keeps a CPU run's data preparation to seconds."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenization and packing; unset = in this process."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Recompute the cached tokenized datasets and retrain the tokenizer."}
    )

    def __post_init__(self):
        if self.dataset_name is not None and self.train_files:
            raise ValueError("Give either `dataset_name` or `train_files`, not both.")
        if self.validation_files and not self.train_files:
            raise ValueError("`validation_files` needs `train_files` (the training data in the same format).")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"`validation_split_percentage` must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(
                f"`block_size` must be at least 2 (a block of one token has nothing to predict), got {self.block_size}."
            )
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers <= 0:
            raise ValueError(
                f"`preprocessing_num_workers` must be a positive integer or unset, got {self.preprocessing_num_workers}."
            )
        if self.text_sample_by not in ("document", "paragraph", "line"):
            raise ValueError(
                f"`text_sample_by` must be 'document', 'paragraph' or 'line', got {self.text_sample_by!r}."
            )


# Spectron's lr is a spectral-norm bound on each step's weight update (‖ΔW‖₂ ≤ lr), AdamW's a per-entry step:
# they live on different scales, so `--learning_rate` defaults per optimizer when it is not given.
DEFAULT_LEARNING_RATES = {"spectron": 0.02, "muon": 0.02, "renorm": 0.02, "adamw": DEFAULT_ADAMW_LR}


@dataclass
class ModelArguments:
    preset: str = field(default="small", metadata={"help": "Model shape: tiny, small, 60m, 130m, 350m, 1b."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields, e.g. 'hidden_size=384,num_hidden_layers=6' (ints/floats/bools)."},
    )
    dense: bool = field(default=False, metadata={"help": "Train the dense baseline (same code, no factorization)."})
    rank_ratio: float | None = field(default=None, metadata={"help": "Rank as a fraction of min(in, out) (0.25)."})
    rank: int | None = field(default=None, metadata={"help": "Absolute rank of every factorized projection."})
    lowrank_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated projections to factorize (default: all seven)."}
    )
    lowrank_init: str | None = field(default=None, metadata={"help": "Factor init: spectral (default) or normal."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention backend: sdpa, eager, ..."})


@dataclass
class OptimizerArguments:
    optimizer: str = field(
        default="spectron",
        metadata={
            "help": "spectron | adamw (naive low-rank / dense baseline, every parameter) | muon (Muon on every hidden "
            "matrix: dense projections whole, factor pairs per factor = orthogonalization only) | renorm "
            "(renormalization only). Embeddings, LM head and norms train with AdamW, and under spectron/renorm so "
            "do the dense projections of a partly factorized model."
        },
    )
    adamw_learning_rate: float | None = field(
        default=None,
        metadata={"help": "lr of the AdamW groups (embeddings, LM head, norms) next to Spectron; default 3e-3."},
    )
    adamw_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the AdamW matrices."})
    spectron_momentum: float = field(default=0.95, metadata={"help": "EMA momentum of Spectron (beta)."})
    ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations."})
    power_iters: int = field(default=1, metadata={"help": "Power iterations per step (warm-started)."})
    rebalance_every: int = field(
        default=0, metadata={"help": "Rescale factor pairs to equal spectral norms every N steps (0: off)."}
    )

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"--optimizer must be one of {list(OPTIMIZER_NAMES)}, got {self.optimizer!r}.")
        if self.adamw_learning_rate is not None:
            check_number("adamw_learning_rate", self.adamw_learning_rate, positive=True)
        check_number("adamw_weight_decay", self.adamw_weight_decay)
        check_number("spectron_momentum", self.spectron_momentum)

    def spectron_options(self) -> dict:
        if self.optimizer == "adamw":
            return {}
        return dict(
            momentum=self.spectron_momentum,
            ns_steps=self.ns_steps,
            power_iters=self.power_iters,
            rebalance_every=self.rebalance_every,
        )


@dataclass
class RunArguments:
    diagnostics_steps: int | None = field(
        default=None, metadata={"help": "Log spectral diagnostics every N steps (default: --logging_steps)."}
    )
    spike_window: int = field(default=50, metadata={"help": "Loss-spike detector: window of previous steps."})
    spike_threshold: float = field(default=4.0, metadata={"help": "Spike: loss above mean + threshold * std."})
    spike_min_increase: float = field(default=0.05, metadata={"help": "Spike: and at least this relative rise."})
    spike_warmup: int = field(default=50, metadata={"help": "Steps exempt from spike detection."})
    spike_action: str = field(
        default="log",
        metadata={
            "help": "On a loss spike: log (count it, apply the update), skip (drop this step's update), or rollback "
            "(drop it and reload the last complete checkpoint, then continue with the next batches)."
        },
    )
    max_rollbacks: int = field(default=3, metadata={"help": "Rollbacks allowed per run; a later spike stops it."})
    max_consecutive_nonfinite: int = field(
        default=5,
        metadata={
            "help": "Steps with a NaN/inf loss or gradient are skipped; this many in a row are tolerated, one more "
            "stops the run (0: stop at the first)."
        },
    )
    divergence_patience: int = field(
        default=0,
        metadata={
            "help": "Stop a diverged run: once the loss has stayed above the first step's loss for this many "
            "consecutive steps, the run stops with an error (0: off)."
        },
    )
    sample_prompt: str = field(default="def ", metadata={"help": "Prompt of the generated sample printed at the end."})
    sample_tokens: int = field(default=48, metadata={"help": "Length of the generated sample."})
    eval_max_batches: int | None = field(
        default=8,
        metadata={
            "help": "Cap on validation batches of the periodic evaluations during training (None: all); "
            "the final evaluation always uses the whole validation split."
        },
    )
    allow_world_change: bool = field(
        default=False,
        metadata={
            "help": "Resume even when the tokenizer or the model definition differ from the checkpoint's (the weights "
            "then mean something else: for deliberate surgery only). Without it such a resume is refused; changed "
            "data is always resumed with a warning naming the change."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an existing non-empty --output_dir that is not a run of this package (its files may "
            "be overwritten); without it such a folder is refused."
        },
    )

    def __post_init__(self):
        if self.spike_action not in ("log", "skip", "rollback"):
            raise ValueError(f"--spike_action must be one of log, skip, rollback; got {self.spike_action!r}.")
        for name in ("max_rollbacks", "max_consecutive_nonfinite", "divergence_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        # NaN compares false with everything: a NaN threshold would silently turn spike detection off.
        check_number("spike_threshold", self.spike_threshold, positive=True)
        check_number("spike_min_increase", self.spike_min_increase)
        # Checked now rather than when the sample is generated, after the whole run.
        if self.sample_tokens < 1:
            raise ValueError(f"--sample_tokens must be >= 1 (the sample printed at the end), got {self.sample_tokens}.")
        if not self.sample_prompt:
            raise ValueError("--sample_prompt is empty: generation needs at least one prompt token; give some text.")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ValueError(f"--eval_max_batches must be >= 1 (or unset for all), got {self.eval_max_batches}.")


@dataclass
class PretrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for a short CPU-sized pretraining run."""

    output_dir: str = field(default="runs/pretrain", metadata={"help": "Where the model and logs are written."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak lr; default depends on --optimizer (spectron 0.02, adamw 3e-3)."}
    )
    max_steps: int = field(default=250, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Sequences per device per step."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per device per eval step."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR decay after the warm-up."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up: a fraction (<1) or a number of steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    # One AdamW default across the package (`AdamWHyperparameters`), not TrainingArguments' β2 = 0.999.
    adam_beta1: float = field(default=ADAMW_DEFAULTS.betas[0], metadata={"help": "β1 of every AdamW group."})
    adam_beta2: float = field(default=ADAMW_DEFAULTS.betas[1], metadata={"help": "β2 of every AdamW group."})
    adam_epsilon: float = field(default=ADAMW_DEFAULTS.eps, metadata={"help": "ε of every AdamW group."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch"})
    eval_steps: float | None = field(default=100, metadata={"help": "Evaluate every N steps."})
    save_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch"})
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N checkpoints."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Keep every batch full-size."})
    seed: int = field(default=0, metadata={"help": "Seed of model init and data order."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin host memory (useful on GPUs only)."})

    def __post_init__(self):
        # Settings the stock TrainingArguments accepts but that crash mid-run or are silently ignored.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.save_strategy == "steps" and self.save_steps <= 0:
            raise ValueError(
                f"--save_steps must be > 0 with --save_strategy steps (got {self.save_steps}, which never saves); "
                "use --save_strategy no to save no checkpoints."
            )
        if self.eval_strategy == "steps" and self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(
                f"--eval_steps must be > 0 with --eval_strategy steps (got {self.eval_steps}); use --eval_strategy no."
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be >= 1, or -1 to train for --num_train_epochs; got {self.max_steps}.")
        if self.learning_rate is not None:
            check_number("learning_rate", self.learning_rate, positive=True)
        # NaN would silently turn clipping off (the Trainer clips only when max_grad_norm > 0).
        for name in ("max_grad_norm", "weight_decay", "warmup_steps"):
            check_number(name, getattr(self, name))
        if not 0 <= self.label_smoothing_factor < 1:  # 1 would train towards the uniform distribution; > 1 is no loss
            raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}.")
        super().__post_init__()
        check_optimizer_flags(self)


# `--optim` values that mean torch's AdamW, which is what `--optimizer adamw` and the AdamW groups of the Spectron
# family run (the default of `TrainingArguments.optim` is one of them).
TORCH_ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")


def check_optimizer_flags(args: TrainingArguments) -> None:
    """Refuse the `TrainingArguments` flags of Trainer's own optimizer factory, which `LowRankTrainer` replaces:
    left unchecked they would be accepted and silently ignored. Each message names this package's flag to use.
    (``--adam_beta1/2``, ``--adam_epsilon``, ``--weight_decay``, ``--learning_rate`` and ``--lr_scheduler_*`` are
    honoured: they reach every group they describe.)"""
    optim = getattr(args.optim, "value", args.optim)
    if optim not in TORCH_ADAMW_OPTIMS:
        raise ValueError(
            f"--optim {optim} is not used by this package's trainer: it builds its optimizer from --optimizer "
            f"({' | '.join(OPTIMIZER_NAMES)}; 'adamw' is torch's AdamW over every parameter). Drop --optim."
        )
    if args.optim_args:
        raise ValueError(
            f"--optim_args {args.optim_args!r} is not used: set the optimizer with --spectron_momentum, --ns_steps, "
            "--power_iters, --rebalance_every (Spectron family) and --adam_beta1, --adam_beta2, --adam_epsilon, "
            "--adamw_learning_rate, --adamw_weight_decay (AdamW groups). Drop --optim_args."
        )
    if args.optim_target_modules:
        raise ValueError(
            f"--optim_target_modules {args.optim_target_modules!r} is not used: every factor pair trains with the "
            "--optimizer's matrix rule and every other parameter with AdamW (docs/optimizer.md). Choose the "
            "factorized projections with --lowrank_modules. Drop --optim_target_modules."
        )


def check_number(name: str, value: float, positive: bool = False) -> None:
    """Refuse a NaN, infinite or negative (with ``positive``: also zero) value of ``--name``."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"--{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}.")


def resolve_learning_rate(training_args: TrainingArguments, optimizer_args: OptimizerArguments) -> None:
    """Fill in the optimizer's default lr when `--learning_rate` was not given."""
    if training_args.learning_rate is None:
        training_args.learning_rate = DEFAULT_LEARNING_RATES[optimizer_args.optimizer]
    if optimizer_args.adamw_learning_rate is None:
        optimizer_args.adamw_learning_rate = (
            training_args.learning_rate if optimizer_args.optimizer == "adamw" else DEFAULT_LEARNING_RATES["adamw"]
        )
    # Decoupled weight decay multiplies each weight by (1 - lr * decay) every step: at lr * decay >= 1 it zeroes or
    # flips every weight (seen: --weight_decay 1e6 trained to NaN and saved weights up to 1.4e12).
    decays = [("--learning_rate", training_args.learning_rate, "--weight_decay", training_args.weight_decay)]
    if optimizer_args.optimizer != "adamw":
        decays.append(
            ("--adamw_learning_rate", optimizer_args.adamw_learning_rate, "--adamw_weight_decay",
             optimizer_args.adamw_weight_decay)
        )  # fmt: skip
    for lr_flag, lr, decay_flag, decay in decays:
        if lr * decay >= 1:
            raise ValueError(
                f"{lr_flag} {lr:g} x {decay_flag} {decay:g} = {lr * decay:g} >= 1: decoupled weight decay would "
                f"multiply every weight by {1 - lr * decay:g} each step. Use {decay_flag} below {1 / lr:g} "
                "(typical: 0-0.1)."
            )
