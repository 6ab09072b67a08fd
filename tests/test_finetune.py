"""PEFT LoRA fine-tuning of a factorized model through the CLI: adapter save/reload, merge_and_unload parity."""

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main
from hf_lowrank.finetune import lora_target_modules


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_tokenizer):
    """A tiny factorized model with a tokenizer, saved as `hf-lowrank pretrain` would."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = tiny_tokenizer
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = preset_config("tiny", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LowRankLlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_target_presets():
    assert lora_target_modules("up") == [
        f"{p}.up" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    assert len(lora_target_modules("factors")) == 14
    assert lora_target_modules("q_proj.up, lm_head") == ["q_proj.up", "lm_head"]
    assert all(t.split(".")[0] in ("gate_proj", "up_proj", "down_proj") for t in lora_target_modules("mlp"))


@pytest.mark.parametrize("target", ["factors", "up"])
def test_finetune_cli_adapter_reload_and_merge(base_model, tmp_path, target):
    out = tmp_path / "lora"
    code = main(
        [
            "finetune",
            "--model_name_or_path",
            str(base_model),
            "--output_dir",
            str(out),
            "--lora_target",
            target,
            "--max_steps",
            "6",
            "--learning_rate",
            "5e-3",
            "--per_device_train_batch_size",
            "4",
            "--block_size",
            "64",
            "--max_corpus_bytes",
            "200000",
            "--use_cpu",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--merge",
            "--seed",
            "0",
        ]
    )
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    results = json.loads((out / "finetune_results.json").read_text())
    assert 0 < results["trainable_parameters"] < results["parameters"] / 5
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(lora_target_modules(target))

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(base_model).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), out).eval()
    with torch.no_grad():
        base_logits, adapted_logits = base(ids).logits, adapted(ids).logits
        assert (adapted_logits - base_logits).abs().max() > 1e-4  # the adapter learned something
        auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(auto(ids).logits, adapted_logits)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert type(merged) is LowRankLlamaForCausalLM  # merging into factors keeps the factorized model
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)


def test_target_matching_nothing_is_a_clear_error(base_model, tmp_path, capsys):
    argv = ["--model_name_or_path", str(base_model), "--output_dir", str(tmp_path), "--lora_target", "nonexistent_proj"]
    options = ["--max_steps", "1", "--use_cpu", "--max_corpus_bytes", "200000", "--block_size", "64"]
    assert main(["finetune", *argv, *options]) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the data preparation's progress bars
    assert last_line.startswith("hf-lowrank finetune: error: --lora_target 'nonexistent_proj' matches no module")


def test_missing_model_folder(tmp_path, capsys):
    assert main(["finetune", "--model_name_or_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "hf-lowrank finetune: error: --model_name_or_path" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_model_is_refused_before_training(tmp_path, tiny_tokenizer, capsys):
    """Ids past the embedding were an IndexError in the first forward pass."""
    folder = tmp_path / "base"
    tiny_tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny", vocab_size=len(tiny_tokenizer) // 2)).save_pretrained(folder)
    argv = ["finetune", "--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "lora"), "--max_steps", "1",
            "--use_cpu", "--max_corpus_bytes", "200000", "--block_size", "64"]  # fmt: skip
    assert main(argv) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line.startswith("hf-lowrank finetune: error: The tokenizer has") and "vocab_size" in last_line
    assert not list((tmp_path / "lora").glob("checkpoint-*"))
