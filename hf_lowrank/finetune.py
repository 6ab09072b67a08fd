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
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .cli_support import HfCommandParser
from .configuration_lowrank import ATTENTION_PROJECTIONS, LOWRANK_FACTOR_NAMES, LOWRANK_PROJECTIONS, MLP_PROJECTIONS
from .files import write_text_atomic

logger = logging.getLogger("hf_lowrank.finetune")


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


def run(finetune_args: FinetuneArguments, data_args, training_args: TrainingArguments) -> dict:
    from .peft_integration import load_lora, merge_and_unload
    from .training.data import build_datasets

    set_seed(training_args.seed)
    out = Path(training_args.output_dir)
    source = finetune_args.model_name_or_path
    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"--model_name_or_path {source}: no such folder.")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=finetune_args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=finetune_args.trust_remote_code)
    if data_args.tokenizer_name is None:
        data_args.tokenizer_name = source  # tokenize with the model's own tokenizer, never train a new one
    block_size = data_args.block_size or model.config.max_position_embeddings
    with training_args.main_process_first(desc="dataset preparation"):
        _, train_dataset, eval_dataset = build_datasets(data_args, output_dir=None, block_size=block_size)

    peft_model = _adapt(model, finetune_args)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {"train_loss": result.training_loss, "trainable_parameters": trainable, "parameters": total}
    if eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        peft_model.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
        tokenizer.save_pretrained(out)
        if finetune_args.merge:
            reloaded = load_lora(
                AutoModelForCausalLM.from_pretrained(source, trust_remote_code=finetune_args.trust_remote_code), out
            )
            merged = merge_and_unload(reloaded)  # exact; whole-projection adapters grow the rank (config updated)
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        write_text_atomic(out / "finetune_results.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    from .training.data import DataArguments

    parser = HfCommandParser((FinetuneArguments, DataArguments, TrainingArguments), prog="hf-lowrank finetune")
    finetune_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else list(argv)
    )
    metrics = run(finetune_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps(metrics, indent=2))
        print(
            f"Adapter saved in {training_args.output_dir}. Load it with:\n"
            "    from transformers import AutoModelForCausalLM\n"
            "    from hf_lowrank.peft_integration import load_lora\n"
            f"    model = load_lora(AutoModelForCausalLM.from_pretrained({finetune_args.model_name_or_path!r}), "
            f"{training_args.output_dir!r})"
        )
    return 0
