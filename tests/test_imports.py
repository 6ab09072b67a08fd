"""The model and the optimizer import and run with torch + transformers alone (the lent GPU machines have neither
`datasets` nor `evaluate`), and `hf-lowrank --help` works."""

import subprocess
import sys

WITHOUT_DATA_LIBS = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "evaluate"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
import torch, hf_lowrank
model = hf_lowrank.LowRankLlamaForCausalLM(hf_lowrank.preset_config("tiny", lowrank_init="normal"))
optimizer = hf_lowrank.build_optimizer(model, "spectron", lr=0.02)
ids = torch.randint(0, 512, (2, 8))
model(ids, labels=ids).loss.backward()
optimizer.step()
assert "datasets" not in sys.modules and "evaluate" not in sys.modules
print("ok")
"""


def test_model_and_optimizer_need_no_datasets_or_evaluate():
    result = subprocess.run([sys.executable, "-c", WITHOUT_DATA_LIBS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cli_help_lists_every_command():
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("pretrain", "presets", "push", "convert", "evaluate"):
        assert command in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "hf_lowrank.cli", "nope"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "invalid choice" in result.stderr
