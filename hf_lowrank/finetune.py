"""`hf-lowrank finetune`: LoRA fine-tuning of a factorized model with PEFT through the HF Trainer.

PEFT's LoRA accepts `nn.Linear` modules, and every `LowRankLinear` is two of them (`down`: in → r, `up`: r → out),
so LoRA attaches to the factors by name. Target presets:

| `--lora_target` | modules | what the adapter changes |
| --- | --- | --- |
| `factors` (default) | every `down` and `up` factor | both factors of every projection: `W = (up + ΔU)(down + ΔD)` |
| `up` | every `up` factor | the output side of every projection (rank ≤ r + lora_r update of W) |
| `down` | every `down` factor | the input side of every projection |
| `attention`, `mlp` | the factors of q/k/v/o, or of gate/up/down | one block type only |
| a comma list, e.g. `q_proj.up,v_proj.up,lm_head` | exactly those (PEFT suffix match) | – |

| a projection name, e.g. `q_proj,v_proj` | the whole `LowRankLinear` (see `peft_integration`) | `W = up·down + s·B·A`, as LoRA on a dense Llama |

A dense projection (`lowrank_modules` leaving it out) is an `nn.Linear` itself and is targeted by its own name.
A whole factorized projection goes through PEFT's custom-module mapping (`hf_lowrank.peft_integration`); such an
adapter is reloaded with `hf_lowrank.peft_integration.load_lora`, and `--merge` grows each merged projection's rank
from r to r + lora_r (exact) and records it in the merged model's `rank_overrides`.

The run is as safe as `hf-lowrank pretrain`'s (R31): its `--output_dir` is locked (R20) and a foreign folder refused
(R21); checkpoints are saved atomically with a manifest by `LowRankTrainer` (R1), which also skips non-finite steps;
re-running the command resumes from the newest complete checkpoint, or changes nothing once the run is complete
(R19); a checkpoint to resume from is checked (manifest, adapter tensor names and shapes) before it is loaded; and
SIGTERM saves a checkpoint at the next step end and exits with status 143, the same command resuming from it (R24).
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .cli_support import HfCommandParser
from .configuration_lowrank import ATTENTION_PROJECTIONS, LOWRANK_FACTOR_NAMES, LOWRANK_PROJECTIONS, MLP_PROJECTIONS
from .files import write_text_atomic
from .loading import load_causal_lm
from .training.arguments import OptimizerArguments
from .training.checkpointing import latest_complete_checkpoint, resolve_resume_checkpoint, tensor_shapes
from .training.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, TrainingPreempted, preemption_message
from .training.run_dir import already_complete_message, mark_complete, on_main_process, open_run_dir
from .training.trainer import LowRankTrainer

logger = logging.getLogger("hf_lowrank.finetune")

RESULTS_NAME = "finetune_results.json"
ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


def lora_target_modules(target: str) -> list[str]:
    """PEFT `target_modules` (name suffixes) for a `--lora_target` preset or comma list."""
    factors = LOWRANK_FACTOR_NAMES
    presets = {
        "factors": [f"{p}.{f}" for p in LOWRANK_PROJECTIONS for f in factors],
        **{f: [f"{p}.{f}" for p in LOWRANK_PROJECTIONS] for f in factors},  # "down", "up"
        "attention": [f"{p}.{f}" for p in ATTENTION_PROJECTIONS for f in factors],
        "mlp": [f"{p}.{f}" for p in MLP_PROJECTIONS for f in factors],
    }
    if target in presets:
        return presets[target]
    names = [name.strip() for name in target.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--lora_target is empty; use one of {sorted(presets)} or a comma list of module names.")
    return names


@dataclass
class FinetuneArguments:
    model_name_or_path: str = field(metadata={"help": "A saved factorized model (folder or Hub id)."})
    lora_target: str = field(
        default="factors", metadata={"help": "factors | up | down | attention | mlp | comma list of module names"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    merge: bool = field(
        default=False, metadata={"help": "Also save the merged model (merge_and_unload) in OUT/merged."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Load the model through its remote code."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an existing non-empty --output_dir that is not a run of this package (its files may "
            "be overwritten); without it such a folder is refused."
        },
    )


def _adapt(model, args: FinetuneArguments):
    from peft import LoraConfig

    from .peft_integration import get_lowrank_peft_model

    targets = lora_target_modules(args.lora_target)
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if len(unmatched) == len(targets):
        raise ValueError(
            f"--lora_target {args.lora_target!r} matches no module of this model (looked for {targets[:4]}...); "
            "a dense model has q_proj/... as nn.Linear: target them by name, e.g. --lora_target q_proj,v_proj."
        )
    targets = [t for t in targets if t not in unmatched]  # e.g. `factors` on a partly factorized model
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_lowrank_peft_model(model, config)  # whole projections (q_proj) and factors (q_proj.up) alike


def check_adapter_fits(checkpoint: str | os.PathLike, model) -> None:
    """Refuse, before anything is loaded, a checkpoint that is not an adapter of this run: a whole model's checkpoint
    (a pretraining run's), an adapter file whose header cannot be read (torn), or one whose tensors differ in name or
    shape from ``model``'s adapter (other targets, rank or base model)."""
    from peft import get_peft_model_state_dict

    checkpoint = Path(checkpoint)
    if not (checkpoint / ADAPTER_CONFIG_NAME).is_file() or not (checkpoint / ADAPTER_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{checkpoint} is not a checkpoint of `hf-lowrank finetune` (it has no {ADAPTER_CONFIG_NAME} and "
            f"{ADAPTER_WEIGHTS_NAME}); resume from one of this fine-tuning run's checkpoint-N folders, or use another "
            "--output_dir."
        )
    saved = tensor_shapes(checkpoint / ADAPTER_WEIGHTS_NAME)  # a torn header is a CheckpointError naming the file
    expected = {key: tuple(value.shape) for key, value in get_peft_model_state_dict(model).items()}
    if saved != expected:
        differ = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
        extra, missing = sorted(saved.keys() - expected.keys()), sorted(expected.keys() - saved.keys())
        example = (
            f"{differ[0]}: checkpoint {saved[differ[0]]}, model {expected[differ[0]]}"
            if differ
            else f"{(extra or missing)[0]} is {'only in the checkpoint' if extra else 'missing from it'}"
        )
        raise ValueError(
            f"The adapter {checkpoint / ADAPTER_WEIGHTS_NAME} does not fit this run's adapter ({len(differ)} tensors "
            f"differ in shape, {len(extra)} are not in this run's adapter, {len(missing)} are missing; e.g. {example}). "
            "Resume with the --model_name_or_path, --lora_target and --lora_r it was trained with, or use another "
            "--output_dir."
        )


def run(finetune_args: FinetuneArguments, data_args, training_args: TrainingArguments) -> dict:
    """The whole job; returns the metrics. Checks the inputs, then, with ``--output_dir`` locked, returns the saved
    metrics of a run that is already complete, or trains (resuming from ``--resume_from_checkpoint``, else from the
    newest complete checkpoint in ``--output_dir``) and saves."""
    set_seed(training_args.seed)
    out = Path(training_args.output_dir)
    source = finetune_args.model_name_or_path
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"--model_name_or_path {source}: no such folder.")
    if (out / "config.json").is_file():
        raise ValueError(
            f"--output_dir {out} holds a saved model (config.json): the adapter would be written beside it, and the "
            "folder would no longer load as that model. Choose another --output_dir."
        )
    # As `pretrain` does: an explicit checkpoint is checked now, before any work; otherwise the newest complete one in
    # the output folder is picked once the folder is locked.
    resume = None
    if training_args.resume_from_checkpoint is not None:
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint)
    with open_run_dir(out, training_args, overwrite=finetune_args.overwrite_output_dir) as completed:
        if completed is not None:
            logger.info("The run in %s is complete (step %d): nothing to do.", out, completed["global_step"])
            return {**json.loads((out / RESULTS_NAME).read_text()), "already_complete": completed}
        if resume is None:  # incomplete or torn checkpoints are skipped with a warning
            resume = latest_complete_checkpoint(out)
            if resume:
                logger.info("Resuming from the newest complete checkpoint %s", resume)
        return _train_and_save(finetune_args, data_args, training_args, resume)


def _train_and_save(finetune_args: FinetuneArguments, data_args, training_args: TrainingArguments, resume) -> dict:
    """`run` once the output folder is checked and locked: load, adapt, train, save, and mark the run complete."""
    from .peft_integration import load_lora, merge_and_unload
    from .training.data import build_datasets

    out, source = Path(training_args.output_dir), finetune_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=finetune_args.trust_remote_code)
    # Pickled weights are refused unopened; a tensor missing or of another shape than the config's is refused (R31).
    model = load_causal_lm(source, "fine-tuned", trust_remote_code=finetune_args.trust_remote_code)
    if data_args.tokenizer_name is None:
        data_args.tokenizer_name = source  # tokenize with the model's own tokenizer, never train a new one
    block_size = data_args.block_size or model.config.max_position_embeddings
    with training_args.main_process_first(desc="dataset preparation"):
        # config: a tokenizer with ids past the model's embedding is refused here, not as an IndexError mid-run
        _, train_dataset, eval_dataset = build_datasets(
            data_args, output_dir=None, block_size=block_size, config=model.config
        )

    peft_model = _adapt(model, finetune_args)
    if resume is not None:
        check_adapter_fits(resume, peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    preemption = PreemptionCallback()
    trainer = LowRankTrainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        # The optimizer a plain Trainer builds from --optim and its flags (the guard skips non-finite steps); the
        # checkpoints record it as AdamW, Trainer's default.
        optimizer_cls_and_kwargs=Trainer.get_optimizer_cls_and_kwargs(training_args, peft_model),
        optimizer_args=OptimizerArguments(optimizer="adamw"),
        callbacks=[preemption],
    )
    result = trainer.train(resume_from_checkpoint=resume)
    if preemption.stop_requested(training_args):  # SIGTERM: checkpoint saved at the step it stopped (R24)
        step, explicit = trainer.state.global_step, training_args.resume_from_checkpoint is not None
        message = on_main_process(lambda: preemption_message(out, step, explicit))
        raise TrainingPreempted(out, step, message)
    metrics = {"train_loss": result.training_loss, "trainable_parameters": trainable, "parameters": total}
    if eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
        tokenizer.save_pretrained(out)
        if finetune_args.merge:
            reloaded = load_lora(
                load_causal_lm(source, "fine-tuned", trust_remote_code=finetune_args.trust_remote_code), out
            )
            merged = merge_and_unload(reloaded)  # exact; whole-projection adapters grow the rank (config updated)
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        write_text_atomic(out / RESULTS_NAME, json.dumps(metrics, indent=2) + "\n")
        mark_complete(out, trainer.state.global_step, training_args)  # last: every output file is written
    return metrics


def main(argv: list[str] | None = None) -> int:
    from .training.data import DataArguments

    parser = HfCommandParser((FinetuneArguments, DataArguments, TrainingArguments), prog="hf-lowrank finetune")
    finetune_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else list(argv)
    )
    try:
        metrics = run(finetune_args, data_args, training_args)
    except TrainingPreempted as stop:  # a checkpoint at the step it stopped; the same command resumes from it
        logger.warning("%s", stop)
        return PREEMPTED_EXIT_CODE
    if training_args.process_index == 0 and metrics.get("already_complete"):
        print(f"\n{already_complete_message(training_args.output_dir, metrics['already_complete'])}")
    elif training_args.process_index == 0:
        print(json.dumps(metrics, indent=2))
        print(
            f"Adapter saved in {training_args.output_dir}. Load it with:\n"
            "    from transformers import AutoModelForCausalLM\n"
            "    from hf_lowrank.peft_integration import load_lora\n"
            f"    model = load_lora(AutoModelForCausalLM.from_pretrained({finetune_args.model_name_or_path!r}), "
            f"{training_args.output_dir!r})"
        )
    return 0
