"""PEFT's LoRA can target the factor nn.Linears of a factorized model, and a training step runs."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_lowrank import LOWRANK_FACTOR_NAMES, LowRankLlamaForCausalLM, preset_config


@pytest.mark.parametrize(
    "targets",
    [list(LOWRANK_FACTOR_NAMES), ["q_proj.up", "v_proj.up"], ["up_proj.down", "down_proj.down", "lm_head"]],
    ids=["all-factors", "qv-up", "mixed"],
)
def test_lora_on_factors_trains(targets):
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny"))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = {n: p.clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in peft_model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
