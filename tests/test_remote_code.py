"""R8: a saved model loads with trust_remote_code=True where hf_lowrank cannot be imported, and without remote
code where it can."""

import ast
import json
from pathlib import Path

import pytest
import torch
from blocked_package import BLOCK_HF_LOWRANK, run_without_package
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_lowrank
from hf_lowrank import (
    LowRankLlamaForCausalLM,
    LowRankLlamaForSequenceClassification,
    LowRankLlamaModel,
    preset_config,
)
from hf_lowrank.modeling_lowrank import AUTO_CLASSES

PACKAGE = Path(hf_lowrank.__file__).parent
STDLIB_OK = {"inspect", "math", "collections", "typing", "dataclasses", "functools", "re"}

# Runs in a fresh interpreter in which any import of hf_lowrank fails.
BLOCKED_LOAD = (
    BLOCK_HF_LOWRANK
    + r"""
import sys, json
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
logits = model(ids).logits
assert "hf_lowrank" not in sys.modules
generated = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
print(json.dumps({"module": type(model).__module__, "logits": logits.tolist(), "generated": generated.tolist()}))
"""
)


def test_model_files_import_only_torch_transformers_and_each_other():
    for name in ("modeling_lowrank.py", "configuration_lowrank.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the config module
                    assert node.module == "configuration_lowrank", (name, node.module)
                    continue
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= {"torch", "transformers"} | STDLIB_OK, (name, roots)


def test_save_writes_auto_map_and_code(tmp_path):
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lowrank_llama"
    assert config["auto_map"]["AutoConfig"] == "configuration_lowrank.LowRankLlamaConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankLlamaForCausalLM"
    assert (tmp_path / "modeling_lowrank.py").read_text() == (PACKAGE / "modeling_lowrank.py").read_text()
    assert (tmp_path / "configuration_lowrank.py").read_text() == (PACKAGE / "configuration_lowrank.py").read_text()


@pytest.mark.slow
def test_remote_code_load_without_package_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny")).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    payload = run_without_package(BLOCKED_LOAD, str(tmp_path), json.dumps(ids.tolist()), cwd=tmp_path)
    assert payload["module"].startswith("transformers_modules"), payload["module"]
    assert torch.equal(torch.tensor(payload["logits"]), model(ids).logits)
    expected = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert payload["generated"] == expected.tolist()


def test_with_package_imported_no_remote_code_is_needed(tmp_path):
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(tmp_path)
    for path in tmp_path.glob("*.py"):
        path.unlink()  # no code beside the weights: only the registered classes can load it
    assert type(AutoConfig.from_pretrained(tmp_path)).__module__ == "hf_lowrank.configuration_lowrank"
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is LowRankLlamaForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is LowRankLlamaModel


# Everything a user without the package does with a saved causal LM folder: the base model (and the feature-extraction
# pipeline), a task head, and the stock Trainer's label smoothing, which must shift the labels.
BLOCKED_USES = (
    BLOCK_HF_LOWRANK
    + r"""
import sys, json
import torch
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoModelForCausalLM, Trainer,
                          TrainingArguments, pipeline)
from transformers.trainer_pt_utils import LabelSmoother
path, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
hidden = base(ids).last_hidden_state
features = pipeline("feature-extraction", model=path, trust_remote_code=True)("hello world")
head = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=3).eval()
head_logits = head(ids[:1]).logits
lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
args = TrainingArguments(output_dir=sys.argv[3], use_cpu=True, label_smoothing_factor=0.1, report_to=[])
with torch.no_grad():
    loss = Trainer(model=lm, args=args).compute_loss(lm, {"input_ids": ids, "labels": ids.clone()})
    shifted = LabelSmoother(epsilon=0.1)(lm(input_ids=ids), ids, shift_labels=True)
assert "hf_lowrank" not in sys.modules
print(json.dumps({
    "base": type(base).__name__, "base_module": type(base).__module__, "hidden": hidden.tolist(),
    "features_width": len(features[0][0]), "head": type(head).__name__, "head_shape": list(head_logits.shape),
    "loss": loss.item(), "shifted": shifted.item(),
}))
"""
)


def _byte_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_auto_map_lists_every_registered_class(tmp_path):
    for cls in (LowRankLlamaForCausalLM, LowRankLlamaForSequenceClassification):
        torch.manual_seed(0)
        cls(preset_config("tiny", pad_token_id=0)).save_pretrained(tmp_path / cls.__name__)
        auto_map = json.loads((tmp_path / cls.__name__ / "config.json").read_text())["auto_map"]
        assert auto_map == {
            "AutoConfig": "configuration_lowrank.LowRankLlamaConfig",
            **{auto: f"modeling_lowrank.{name}" for auto, name in AUTO_CLASSES.items()},
        }
        for auto_name in AUTO_CLASSES:  # the package registers each class it lists
            assert getattr(__import__("transformers"), auto_name)._model_mapping[type(preset_config("tiny"))]


@pytest.mark.slow
def test_remote_code_base_model_heads_pipeline_and_label_smoothing_without_package(tmp_path):
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny", pad_token_id=0)).eval()
    model.save_pretrained(tmp_path / "model")
    _byte_tokenizer().save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    payload = run_without_package(
        BLOCKED_USES, str(tmp_path / "model"), json.dumps(ids.tolist()), str(tmp_path / "out"), cwd=tmp_path
    )
    assert payload["base"] == "LowRankLlamaModel" and payload["base_module"].startswith("transformers_modules")
    assert torch.equal(torch.tensor(payload["hidden"]), model.model(ids).last_hidden_state)
    assert payload["features_width"] == model.config.hidden_size
    assert payload["head"] == "LowRankLlamaForSequenceClassification" and payload["head_shape"] == [1, 3]
    assert payload["loss"] == pytest.approx(payload["shifted"], rel=1e-6)


def test_an_older_transformers_is_refused_at_import_in_one_line(monkeypatch):
    """What `trust_remote_code=True` loads first is the configuration file: under a Transformers older than the
    lowest tested one it must say so, not fail later with an unrelated AttributeError (4.57: `validate_rope`)."""
    import importlib.util
    import re

    import transformers

    from hf_lowrank.configuration_lowrank import MIN_TRANSFORMERS_VERSION

    root = PACKAGE.parent
    assert f'"transformers>={MIN_TRANSFORMERS_VERSION.removesuffix(".0")},' in (root / "pyproject.toml").read_text()
    assert f"transformers=={MIN_TRANSFORMERS_VERSION}" in (root / ".ci" / "constraints-lowest.txt").read_text()
    for old in ("4.57.6", "5.16.1", "5.17.0.dev0"):
        monkeypatch.setattr(transformers, "__version__", old)
        spec = importlib.util.spec_from_file_location("hub_configuration", PACKAGE / "configuration_lowrank.py")
        expected = f"needs transformers >= {re.escape(MIN_TRANSFORMERS_VERSION)}; found {re.escape(old)}"
        if old.startswith("5.17"):  # a development build of the minimum release is that release
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            continue
        with pytest.raises(ImportError, match=expected):
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
