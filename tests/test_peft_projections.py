"""LoRA on whole factorized projections (`target_modules=["q_proj", "v_proj"]`): trained with a real Trainer, saved,
reloaded (with the package and by remote code only), merged exactly into a rank-grown factorized model."""

import json
import subprocess
import sys

import pytest
import torch
from blocked_package import BLOCK_HF_LOWRANK, run_without_package
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_lowrank import LowRankLinear, LowRankLlamaForCausalLM, preset_config
from hf_lowrank.cli import main
from hf_lowrank.peft_integration import (
    LowRankLoraLinear,
    get_lowrank_peft_model,
    load_lora,
    merge_and_unload,
)

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))

# A process in which hf_lowrank cannot be imported loads the base model by remote code and applies the adapter with
# nothing but transformers and peft (PEFT's own lora.Linear as the layer of the remote LowRankLinear class).
REMOTE_LOAD = (
    BLOCK_HF_LOWRANK
    + r"""
import sys, json
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM
base, adapter = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
config = LoraConfig.from_pretrained(adapter)
config._register_custom_module({type(model.get_submodule("model.layers.0.self_attn.q_proj")): LoraLinear})
model = PeftModel.from_pretrained(model, adapter, config=config).eval()
assert "hf_lowrank" not in sys.modules
logits = model(torch.tensor(json.loads(sys.argv[3]))).logits
print(json.dumps({"module": type(model.base_model.model).__module__, "logits": logits.tolist()}))
"""
)


# A process without hf_lowrank loads the folder PEFT's merge_and_unload + save_pretrained wrote, by remote code.
REMOTE_MERGED = (
    BLOCK_HF_LOWRANK
    + r"""
import sys, json
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"module": type(model).__module__, "logits": logits.tolist()}))
"""
)

# The rest of a user's script after its imports: PEFT's own get_peft_model on whole projections, one step.
REGISTERED_IN_A_FRESH_PROCESS = r"""
import json, torch
model = hf_lowrank.LowRankLlamaForCausalLM(hf_lowrank.preset_config("tiny"))
model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, 512, (2, 8))
model(input_ids=ids, labels=ids).loss.backward()
layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
print(json.dumps({"q_proj": type(layer).__name__, "trains": layer.lora_A["default"].weight.grad is not None}))
"""


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, n=16, length=16):
        self.ids = torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder, PEFT model): LoRA r=4 on q_proj and v_proj, trained 6 Trainer steps."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")  # as users load it: the adapter records its path
    # PEFT's own call, as users write it: `import hf_lowrank` made whole projections known to every LoraConfig
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    args = TrainingArguments(
        output_dir=str(root / "run"), max_steps=6, learning_rate=1e-2, per_device_train_batch_size=4,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=TokenBlocks()).train()
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter", model.eval()


def test_projection_targets_wrap_the_whole_lowrank_linear(trained):
    _, adapter, model = trained
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLoraLinear)}
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["q_proj", "v_proj"]
    assert all(isinstance(m.get_base_layer(), LowRankLinear) for m in wrapped.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.lora_A["default"].weight.shape == (4, 64) and layer.lora_B["default"].weight.abs().max() > 0
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}


def test_peft_own_calls_load_merge_save_and_reload(trained, tmp_path):
    """`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and PEFT's `merge_and_unload` + `save_pretrained`, with
    no call of this package in between: the merged folder holds the grown ranks in its config and loads."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    base, adapter, model = trained
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
        torch.testing.assert_close(reloaded(IDS).logits, expected)
        auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        torch.testing.assert_close(auto(IDS).logits, expected)
        merged = auto.merge_and_unload()  # PEFT's own merge: the factors grow from r to r + k, exactly
        assert merged.model.layers[0].self_attn.q_proj.rank == 16 + 4
        merged.save_pretrained(tmp_path / "merged")
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["rank_overrides"] == {
            "q_proj": 20, "v_proj": 12
        }  # fmt: skip
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    payload = run_without_package(REMOTE_MERGED, str(tmp_path / "merged"), json.dumps(IDS.tolist()), cwd=tmp_path)
    assert payload["module"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(payload["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "imports",
    [
        ["import hf_lowrank", "from peft import LoraConfig, get_peft_model"],
        ["from peft import LoraConfig, get_peft_model", "import hf_lowrank"],
        # transformers asks whether PEFT is installed (find_spec) long before anything imports it
        [
            "import hf_lowrank",
            "from transformers.utils import is_peft_available",
            "assert is_peft_available()",
            "import importlib.util",
            "importlib.util.find_spec('peft')",
            "from peft import LoraConfig, get_peft_model",
        ],
    ],
    ids=["hf_lowrank-then-peft", "peft-then-hf_lowrank", "peft-looked-up-first"],
)
def test_plain_get_peft_model_on_projection_names_in_a_fresh_process(tmp_path, imports):
    """As a user's script does it, in either import order (PEFT imported after hf_lowrank is registered when it is
    imported; before, at `import hf_lowrank`), also when PEFT was looked up before it was imported."""
    script = "\n".join([*imports, REGISTERED_IN_A_FRESH_PROCESS])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"q_proj": "LowRankLoraLinear", "trains": True}


def test_the_registration_leaves_other_layers_to_peft():
    """Factors (`q_proj.up`) and dense layers keep PEFT's standard `lora.Linear`; only whole projections are ours."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    model = LowRankLlamaForCausalLM(preset_config("tiny", lowrank_modules=["q_proj"]))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    q = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    v = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.v_proj")  # dense here
    assert type(q) is LowRankLoraLinear and type(v) is PeftLoraLinear
    factors = get_peft_model(LowRankLlamaForCausalLM(preset_config("tiny")), LoraConfig(target_modules=["q_proj.up"]))
    assert type(factors.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.up")) is PeftLoraLinear


def test_reload_and_exact_merge(trained, tmp_path):
    base, adapter, model = trained
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = load_lora(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
        torch.testing.assert_close(reloaded(IDS).logits, expected)
        merged = merge_and_unload(reloaded)
        assert type(merged) is LowRankLlamaForCausalLM
        assert merged.model.layers[0].self_attn.q_proj.rank == 16 + 4  # r + k: exact, not a truncation
        assert merged.config.rank_overrides == {"q_proj": 20, "v_proj": 12}
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        merged.save_pretrained(tmp_path / "merged")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_adapter_and_unmerge_round_trip(trained):
    base, adapter, model = trained
    reloaded = load_lora(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    layer = reloaded.get_submodule("base_model.model.model.layers.1.self_attn.v_proj")
    before = [t.clone() for t in (layer.base_layer.up.weight, layer.base_layer.down.weight)]
    with torch.no_grad():
        expected = reloaded(IDS).logits
        reloaded.merge_adapter()
        assert layer.base_layer.rank == 12
        torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)
        reloaded.unmerge_adapter()
    assert layer.base_layer.rank == 8
    assert torch.equal(layer.base_layer.up.weight, before[0]) and torch.equal(layer.base_layer.down.weight, before[1])


@pytest.mark.slow
def test_remote_code_process_applies_the_adapter(trained, tmp_path):
    base, adapter, model = trained
    payload = run_without_package(REMOTE_LOAD, str(base), str(adapter), json.dumps(IDS.tolist()), cwd=tmp_path)
    assert payload["module"].startswith("transformers_modules"), payload["module"]
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(payload["logits"]), model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_remote_code_model_with_package_merges(trained):
    """A model loaded by remote code has its own LowRankLinear class; the package's helpers handle it too."""
    base, adapter, model = trained
    remote = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    reloaded = load_lora(remote, str(adapter)).eval()
    with torch.no_grad():
        expected = model(IDS).logits
        torch.testing.assert_close(merge_and_unload(reloaded)(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        (dict(r=4, target_modules=["q_proj"], layers_to_transform=[0]), "different ranks"),
        (dict(r=30, target_modules=["v_proj"]), "no longer a factorization"),
    ],
    ids=["some-layers", "rank-too-large"],
)
def test_unrepresentable_merge_is_refused_before_changing_anything(lora, message):
    torch.manual_seed(0)
    peft_model = get_lowrank_peft_model(LowRankLlamaForCausalLM(preset_config("tiny")), LoraConfig(**lora))
    ranks = [m.rank for m in peft_model.modules() if isinstance(m, LowRankLinear)]
    with pytest.raises(ValueError, match=message):
        merge_and_unload(peft_model)
    assert [m.rank for m in peft_model.modules() if isinstance(m, LowRankLinear)] == ranks
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, LowRankLoraLinear))


def test_finetune_cli_on_projection_names(tmp_path, tiny_tokenizer):
    base = tmp_path / "base"
    tokenizer = tiny_tokenizer
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = preset_config("tiny", eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LowRankLlamaForCausalLM(config).save_pretrained(base)
    out = tmp_path / "lora"
    argv = ["finetune", "--model_name_or_path", str(base), "--output_dir", str(out), "--lora_target", "q_proj,v_proj",
            "--max_steps", "4", "--learning_rate", "5e-3", "--per_device_train_batch_size", "4", "--block_size", "64",
            "--max_corpus_bytes", "200000", "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--merge"]  # fmt: skip
    assert main(argv) == 0
    with torch.no_grad():
        adapted = load_lora(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert merged.config.rank_overrides == {"q_proj": 16 + 8, "v_proj": 8 + 8}
        torch.testing.assert_close(merged(IDS).logits, adapted(IDS).logits, rtol=1e-5, atol=1e-5)
