"""Issue 11, item 10: `hf-lowrank pretrain --streaming` trains end to end on a local streamed dataset."""

import json

from transformers import AutoModelForCausalLM

from hf_lowrank.training.data import default_corpus_files
from hf_lowrank.training.pretrain import parse_args, run


def test_streaming_pretrain_end_to_end(tmp_path):
    files = [f for f in default_corpus_files() if 2_000 < f.stat().st_size < 20_000][:60]
    for split, chosen in (("train", files[:54]), ("validation", files[54:])):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for path in chosen:
                handle.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--preset", "tiny", "--streaming", "--train_files", str(tmp_path / "train.jsonl"),
            "--validation_files", str(tmp_path / "validation.jsonl"), "--tokenizer_vocab_size", "512",
            "--max_steps", "6", "--block_size", "64", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--logging_steps", "2", "--eval_steps", "3", "--eval_max_batches", "2",
            "--save_steps", "3", "--sample_tokens", "4", "--use_cpu", "--report_to", "none"]  # fmt: skip
    metrics = run(*parse_args(argv))
    assert metrics["unigram_loss"] is None  # not available for a stream, reported as such
    assert metrics["eval_tokens"] > 0 and metrics["eval_tokens"] % 63 == 0
    assert metrics["eval_loss"] < 7.0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["streaming"] is True and summary["max_steps"] == 6 and summary["block_size"] == 64
    assert json.loads((out / "eval_results.json").read_text())["tokens"] == metrics["eval_tokens"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in row for row in history[:-1])  # the periodic evaluation ran on the capped stream
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LowRankLlamaForCausalLM"
