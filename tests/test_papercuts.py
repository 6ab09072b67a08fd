"""Issue 11, item 12: what a finished `hf-lowrank pretrain` folder says about itself."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_lowrank.evaluation import perplexity_of_ids
from hf_lowrank.training.data import DataArguments, build_datasets
from hf_lowrank.training.pretrain import parse_args, run

BLOCK = 64


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """A short AdamW run of the tiny preset, block size 64 (half the context), with every warning recorded."""
    out = tmp_path_factory.mktemp("adamw")
    argv = ["--output_dir", str(out), "--preset", "tiny", "--optimizer", "adamw", "--max_steps", "6",
            "--max_corpus_bytes", "250000", "--block_size", str(BLOCK), "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--logging_steps", "2", "--eval_strategy", "no",
            "--save_strategy", "no", "--sample_tokens", "4", "--use_cpu", "--report_to", "none"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = run(*parse_args(argv))
    return out, metrics, [str(w.message) for w in caught]


def test_adamw_run_does_not_warn_about_adamw_lr(adamw_run):
    _, _, messages = adamw_run
    assert not [m for m in messages if "ignores" in m], messages


def test_adamw_lr_given_explicitly_still_warns(tmp_path):
    """The warning stays for a value that really is ignored."""
    from transformers import TrainingArguments

    from hf_lowrank import LowRankLlamaForCausalLM, preset_config
    from hf_lowrank.training.arguments import OptimizerArguments
    from hf_lowrank.training.trainer import LowRankTrainer

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, use_cpu=True, report_to="none")
    trainer = LowRankTrainer(model=LowRankLlamaForCausalLM(preset_config("tiny")), args=args,
                             optimizer_args=OptimizerArguments(optimizer="adamw", adamw_learning_rate=1e-4))  # fmt: skip
    with pytest.warns(UserWarning, match="ignores"):
        trainer.create_optimizer()


def test_saved_tokenizer_knows_the_context_length(adamw_run):
    out, _, _ = adamw_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 128


def test_saved_config_keeps_the_kv_cache_on(adamw_run):
    out, _, _ = adamw_run
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert AutoModelForCausalLM.from_pretrained(out).config.use_cache is True


def test_eval_results_tokens_are_scored_tokens_as_evaluate_counts_them(adamw_run):
    """`tokens` and `loss` of pretrain's eval_results.json are what `evaluate`'s method gives on the same blocks."""
    out, metrics, _ = adamw_run
    record = json.loads((out / "eval_results.json").read_text())
    assert (record["max_length"], record["stride"]) == (BLOCK, BLOCK)
    _, _, blocks = build_datasets(DataArguments(max_corpus_bytes=250_000, block_size=BLOCK), str(out), BLOCK)
    scored_blocks = record["tokens"] // (BLOCK - 1)
    assert record["tokens"] == scored_blocks * (BLOCK - 1) and 0 < len(blocks) - scored_blocks < 8  # drop_last
    stream = torch.tensor(blocks.select(range(scored_blocks))["input_ids"]).flatten()
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = perplexity_of_ids(model, stream, max_length=BLOCK, stride=BLOCK)
    assert reference["tokens"] == record["tokens"]
    assert reference["loss"] == pytest.approx(record["loss"], rel=1e-4)
