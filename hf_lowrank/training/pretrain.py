"""`hf-lowrank pretrain`: pretrain a natively factorized model through the HF Trainer, then evaluate and save.

Arguments are parsed with `HfArgumentParser` as in transformers' `run_clm.py`: every `TrainingArguments`
flag works, plus the model, data, optimizer and diagnostics options in `arguments.py` and `data.py`.
With no arguments but an output folder it trains the `small` preset with Spectron on the built-in corpus
(the Python standard library's source), which takes a few minutes on a laptop CPU.
"""

import logging
import sys
import time
from pathlib import Path

import transformers
from datasets import IterableDataset
from transformers import set_seed

from ..cli_support import HfCommandParser
from ..modeling_lowrank import LowRankLlamaForCausalLM
from ..presets import PRESETS, count_parameters, preset_config
from .arguments import ModelArguments, OptimizerArguments, PretrainingArguments, RunArguments, resolve_learning_rate
from .checkpointing import latest_complete_checkpoint, resolve_resume_checkpoint
from .data import (
    BUILTIN_DATASET,
    LOCAL_FILES_DATASET,
    DataArguments,
    build_datasets,
    resolve_block_size,
    unigram_cross_entropy,
)
from .distributed import check_launch
from .plots import plot_training_curves
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, TrainingPreempted, preemption_message
from .run_dir import already_complete_message, mark_complete, on_main_process, open_run_dir
from .summary import (
    completed_metrics,
    final_metrics,
    generate_sample,
    scored_eval_tokens,
    training_summary,
    write_run_files,
)
from .tokenizer import check_vocab
from .trainer import build_step_guard, build_trainer
from .validation import check_config_keys, check_inputs
from .world import data_world

logger = logging.getLogger("hf_lowrank.pretrain")

ARGUMENT_CLASSES = (ModelArguments, DataArguments, OptimizerArguments, RunArguments, PretrainingArguments)


def parse_args(argv: list[str] | None = None):
    parser = HfCommandParser(ARGUMENT_CLASSES, prog="hf-lowrank pretrain")
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        parse = parser.parse_json_file if path.suffix == ".json" else parser.parse_yaml_file
        return parse(str(path))
    return parser.parse_args_into_dataclasses(args=argv)


def _parse_overrides(text: str | None) -> dict:
    """'hidden_size=384,tie_word_embeddings=true' -> {'hidden_size': 384, 'tie_word_embeddings': True}."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"--config_overrides expects key=value pairs separated by commas, got {item!r}.")
        key, value = (s.strip() for s in item.split("=", 1))
        lowered = value.lower()
        if lowered in ("true", "false"):
            overrides[key] = lowered == "true"
        else:
            try:
                overrides[key] = int(value)
            except ValueError:
                try:
                    overrides[key] = float(value)
                except ValueError:
                    overrides[key] = value
    return overrides


def build_config(model_args: ModelArguments, vocab_size: int | None = None):
    """The model config from the preset and the command-line overrides (validated by the config itself)."""
    if model_args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {model_args.preset!r}.")
    overrides = _parse_overrides(model_args.config_overrides)
    check_config_keys(overrides)
    for name in ("rank_ratio", "rank", "lowrank_init"):
        if getattr(model_args, name) is not None:
            overrides[name] = getattr(model_args, name)
    if model_args.lowrank_modules is not None:
        overrides["lowrank_modules"] = [m.strip() for m in model_args.lowrank_modules.split(",") if m.strip()]
    if model_args.dense:
        overrides["lowrank_modules"] = []
        overrides.pop("rank_overrides", None)
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    return preset_config(model_args.preset, **overrides)


def run(model_args, data_args, optimizer_args, run_args, training_args) -> dict:
    """The whole job; returns the final metrics. Separate from `main` so tests can call it in-process."""
    started = time.time()
    check_launch(training_args)  # refuse ranks that would train alone or drift apart (R18)
    resolve_learning_rate(training_args, optimizer_args)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder; choose another --output_dir.")
    tokenizer_path = data_args.tokenizer_name
    if tokenizer_path and tokenizer_path.startswith((".", "/", "~")) and not Path(tokenizer_path).expanduser().exists():
        raise FileNotFoundError(
            f"--tokenizer_name {tokenizer_path}: no such folder. Pass a saved tokenizer's folder or a Hub id, or leave "
            "it unset to train a tokenizer on the data."
        )

    # Resume from an explicit checkpoint (checked now, before any work), else from the newest complete and
    # verified checkpoint in output_dir (picked once the folder is locked), else start fresh.
    resume = None
    if training_args.resume_from_checkpoint is not None:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint)

    # Build (and so validate) the model config and the step guard before any data work: a typo fails in a
    # second, not after tokenization. A named tokenizer sets the vocabulary unless --config_overrides fixes it.
    config = build_config(model_args)
    guard = build_step_guard(run_args)
    check_inputs(config, data_args, training_args)  # size (R26) and vocabulary, before anything is written
    # One run per folder, never a foreign folder, and a finished run is not trained again (R19-R21).
    with open_run_dir(training_args.output_dir, training_args, overwrite=run_args.overwrite_output_dir) as completed:
        if completed is not None:
            logger.info("The run in %s is complete (step %d): nothing to do.", output_dir, completed["global_step"])
            return completed_metrics(output_dir, completed)
        return _train_and_save(
            model_args, data_args, optimizer_args, run_args, training_args, config, guard, resume, started
        )


def _train_and_save(model_args, data_args, optimizer_args, run_args, training_args, config, guard, resume, started):
    """`run` once the output folder is checked and locked: prepare the data, train (from ``resume``, else the newest
    complete checkpoint), save, evaluate, and mark the run complete."""
    output_dir = Path(training_args.output_dir)
    if resume is None:  # incomplete or torn checkpoints are skipped with a warning
        resume = latest_complete_checkpoint(output_dir)
        if resume:
            logger.info("Resuming from the newest complete checkpoint %s", resume)
    output_dir.mkdir(parents=True, exist_ok=True)
    config, tokenizer, train_dataset, eval_dataset, block_size = _prepare_data(
        model_args, data_args, training_args, config
    )
    streaming = isinstance(train_dataset, IterableDataset)

    set_seed(training_args.seed)
    model = LowRankLlamaForCausalLM(config)
    model.set_attn_implementation(model_args.attn_implementation)
    counts = count_parameters(config)
    logger.info(
        "Model: %s, %.2fM parameters (dense counterpart %.2fM, ratio %.3f), optimizer %s, lr %g",
        model_args.preset,
        counts.total / 1e6,
        counts.dense_total / 1e6,
        counts.compression,
        optimizer_args.optimizer,
        training_args.learning_rate,
    )

    use_cache = model.config.use_cache  # before the Trainer overwrites it
    preemption = PreemptionCallback()
    periodic_eval = periodic_eval_split(eval_dataset, run_args.eval_max_batches, training_args)
    trainer = build_trainer(
        model,
        training_args,
        optimizer_args,
        run_args,
        train_dataset=train_dataset,
        eval_dataset=periodic_eval,
        processing_class=tokenizer,
        guard=guard,
        callbacks=(preemption,),
    )
    # The data this run trains on, recorded in every checkpoint and compared at resume with the tokenizer and model
    # (R29); hashing samples files larger than 16 MiB, so this costs well under a second on a multi-GB corpus.
    trainer.data_world = data_world(data_args, block_size, training_args.data_seed)
    train_result = trainer.train(resume_from_checkpoint=resume)
    if preemption.stop_requested(training_args):  # SIGTERM: checkpoint saved at the step it stopped (R24)
        step, explicit = trainer.state.global_step, training_args.resume_from_checkpoint is not None
        # Names only a checkpoint that verifies (R28); checked once, by the main process, and told to every rank.
        message = on_main_process(lambda: preemption_message(output_dir, step, explicit))
        raise TrainingPreempted(output_dir, step, message)
    train_seconds = time.time() - started
    model.config.use_cache = use_cache  # the Trainer set it to TrainingArguments.use_cache (False)
    trainer.save_model(str(output_dir))  # model (safetensors) + tokenizer + self-contained code

    eval_loss = trainer.evaluate(eval_dataset=eval_dataset)["eval_loss"]
    metrics = final_metrics(
        trainer,
        train_result,
        eval_loss,
        guard,
        counts,
        # A stream cannot be read twice cheaply (the unigram baseline reads the whole training split): None.
        unigram_loss=None if streaming else unigram_cross_entropy(train_dataset, eval_dataset, config.vocab_size),
        eval_tokens=scored_eval_tokens(eval_dataset, block_size, training_args),
    )
    # Every rank generates: under FSDP a forward pass is a collective, so rank 0 alone would hang (R17).
    metrics["sample"] = generate_sample(model, tokenizer, run_args.sample_prompt, run_args.sample_tokens)
    metrics["wall_time_s"] = round(time.time() - started, 1)
    if trainer.is_world_process_zero():
        trainer.save_state()
        eval_results = {
            "perplexity": metrics["perplexity"],
            "loss": eval_loss,
            "tokens": metrics["eval_tokens"],  # scored tokens, as `hf-lowrank evaluate` counts them
            "dataset": _dataset_name(data_args),
            "split": "validation",
            "max_length": block_size,  # each block is one window; its first token is not scored
            "stride": block_size,
        }
        summary = training_summary(
            trainer,
            train_result,
            started=started,
            train_seconds=train_seconds,
            preset=model_args.preset,
            dense=config.is_dense,
            optimizer=optimizer_args.optimizer,
            adamw_learning_rate=optimizer_args.adamw_learning_rate,
            block_size=block_size,
            dataset=_dataset_name(data_args),
            streaming=streaming,
        )
        write_run_files(output_dir, metrics, eval_results, summary)
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        mark_complete(output_dir, trainer.state.global_step, training_args)  # last: every output file is written
    return metrics


def periodic_eval_split(eval_dataset, max_batches: int | None, training_args):
    """The validation blocks the periodic evaluations score: ``max_batches`` batches on *every* process (so
    ``max_batches × per_device_eval_batch_size × world_size`` blocks), or all of them when ``max_batches`` is None.
    Taking only ``max_batches × per_device_eval_batch_size`` left each of several processes a fraction of one batch,
    which the data check refused with advice that could not be followed."""
    if max_batches is None:
        return eval_dataset
    n = max_batches * training_args.per_device_eval_batch_size * training_args.world_size
    if isinstance(eval_dataset, IterableDataset):
        return eval_dataset.take(n)
    return eval_dataset.select(range(min(len(eval_dataset), n)))


def _prepare_data(model_args, data_args, training_args, config):
    """The tokenizer and the packed splits (prepared once, on the main process first), and the config completed
    by them: a named tokenizer sets the vocabulary, and the special tokens and context length come from it."""
    block_size = resolve_block_size(data_args, config)
    with training_args.main_process_first(desc="tokenizer and dataset preparation"):
        tokenizer, train_dataset, eval_dataset = build_datasets(
            data_args,
            output_dir=training_args.output_dir,
            block_size=block_size,
            config=config if data_args.tokenizer_name is None else None,
        )
    if data_args.tokenizer_name is not None:
        config = build_config(model_args, vocab_size=len(tokenizer))
        check_vocab(tokenizer, config)
    if eval_dataset is None:
        raise ValueError(
            "Pretraining needs a validation split: set --validation_split_percentage > 0 or pass --validation_files."
        )
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # saved beside the model; a trained BPE says 1e30
    if isinstance(train_dataset, IterableDataset):
        logger.info("Streaming: the unigram baseline (which reads the whole training split) is not computed.")
    return config, tokenizer, train_dataset, eval_dataset, block_size


def _dataset_name(data_args) -> str:
    """How the run's records, and so its model card, name the training data."""
    if getattr(data_args, "dataset_name", None):
        return data_args.dataset_name
    if getattr(data_args, "train_files", None):
        return LOCAL_FILES_DATASET
    return BUILTIN_DATASET


def main(argv: list[str] | None = None) -> int:
    """`hf-lowrank pretrain`: 0 once the run is complete, `PREEMPTED_EXIT_CODE` after a SIGTERM; a bad argument or
    input raises `ValueError` and a failed run this package's own error (both reported by `hf_lowrank.cli.main`)."""
    transformers.utils.logging.set_verbosity_warning()
    args = parse_args(argv)
    try:
        metrics = run(*args)
    except TrainingPreempted as stop:
        logger.warning("%s", stop)
        return PREEMPTED_EXIT_CODE
    training_args = args[-1]
    if metrics.get("already_complete"):
        if training_args.process_index == 0:
            print(f"\n{already_complete_message(training_args.output_dir, metrics['already_complete'])}")
        return 0
    if training_args.process_index == 0:
        out = training_args.output_dir
        unigram = metrics["unigram_loss"]
        baseline = "n/a for a streamed dataset" if unigram is None else f"{unigram:.3f}"
        print(
            f"\nvalidation loss {metrics['eval_loss']:.3f} (perplexity {metrics['perplexity']:.2f}; "
            f"unigram baseline {baseline}), {metrics['loss_spikes']} loss spikes, "
            f"wall time {metrics['wall_time_s']:.0f} s"
        )
        print(f"\nSample ({args[3].sample_prompt!r} ->):\n{metrics['sample']}\n")
        print(
            "Load it with:\n"
            "    import hf_lowrank\n"
            "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"    model = AutoModelForCausalLM.from_pretrained({out!r})\n"
            f"    tokenizer = AutoTokenizer.from_pretrained({out!r})\n"
            f"Model, tokenizer, metrics.json and training_curves.png are in {out}/"
        )
    return 0
