"""Tensor-parallel plans: Llama's for the dense baseline, a factor-aware one for factorized projections (see
`LowRankLlamaConfig.tensor_parallel_plan`), run by Transformers' own TP on two gloo processes on CPU."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.configuration_lowrank import LOWRANK_PROJECTIONS

SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "tp_plan_parity.py"
VARIANTS = ("lowrank", "dense", "mixed")  # of conftest.MODEL_VARIANTS: those whose sharding differs


def build(variant):
    return tiny_model(variant).eval()


def test_dense_baseline_has_llamas_plan():
    assert preset_config("tiny", lowrank_modules=[]).base_model_tp_plan == LlamaConfig.base_model_tp_plan
    assert LowRankLlamaForCausalLM._tp_plan == {"lm_head": "colwise_gather_output"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plan_keys_name_real_modules_and_shard_one_factor_each(variant):
    model = build(variant)
    plan = model.config.base_model_tp_plan
    module_names = [name for name, _ in model.model.named_modules()]
    for key in plan:  # every rule matches real modules, one per layer
        pattern = re.compile(re.escape(key).replace(r"\*", r"\d+") + "$")
        assert sum(bool(pattern.match(name)) for name in module_names) == model.config.num_hidden_layers, key
    for projection in LOWRANK_PROJECTIONS:
        planned = {k.rsplit(projection, 1)[1]: v for k, v in plan.items() if f".{projection}" in k}
        if projection in model.config.lowrank_modules:  # one factor sharded, the other replicated
            assert planned in ({".up": "colwise"}, {".down": "rowwise"}), (projection, planned)
        else:
            assert set(planned) == {""}, (projection, planned)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lowrank", "mixed"])
def test_two_process_tensor_parallel_matches_unsharded(variant, tmp_path):
    model = build(variant)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "model" / "reference.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    result = subprocess.run(
        [*command, str(tmp_path / "model"), str(tmp_path / "result.json")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["world_size"] == 2
    assert report["max_abs_diff"] < 1e-5
    # the plan was applied: each factorized projection has exactly its planned factor halved on this rank
    config = model.config
    for layer in range(config.num_hidden_layers):
        for key, style in config.base_model_tp_plan.items():
            name = "model." + key.replace("*", str(layer)) + ".weight"
            full = dict(model.named_parameters())[name].shape
            halved = [full[0] // 2, full[1]] if style == "colwise" else [full[0], full[1] // 2]
            assert report["sharded"][name] == halved, name
        for projection in config.lowrank_modules:
            parent = "self_attn" if projection in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            replicated = "down" if f"layers.*.{parent}.{projection}.up" in config.base_model_tp_plan else "up"
            assert f"model.layers.{layer}.{parent}.{projection}.{replicated}.weight" not in report["sharded"]
