"""The contract vLLM's and SGLang's Transformers backends read from a custom architecture (issue 19, item 5): the
engines themselves need a GPU and do not run here, so each point of the contract is checked on its own."""

import inspect
import json

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from hf_lowrank import LowRankLlamaForCausalLM, LowRankLlamaModel, preset_config
from hf_lowrank.configuration_lowrank import LOWRANK_PROJECTIONS
from hf_lowrank.modeling_lowrank import LowRankLlamaAttention, LowRankLlamaDecoderLayer


def test_saved_config_maps_auto_model(tmp_path):
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(preset_config("tiny")).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_lowrank.LowRankLlamaModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_lowrank.LowRankLlamaForCausalLM"


def test_the_model_declares_the_attention_backend_support():
    assert LowRankLlamaModel._supports_attention_backend is True
    assert LowRankLlamaForCausalLM._supports_attention_backend is True


def test_forward_signatures_declare_transformers_kwargs_as_llama_does():
    # How the engines and Transformers' own model tests read what a model's forward accepts.
    for forward in (
        LowRankLlamaForCausalLM.forward,
        LowRankLlamaModel.forward,
        LowRankLlamaDecoderLayer.forward,
        LowRankLlamaAttention.forward,
    ):
        kwargs = inspect.signature(forward).parameters["kwargs"]
        assert kwargs.kind is inspect.Parameter.VAR_KEYWORD
        assert kwargs.annotation == Unpack[TransformersKwargs], forward.__qualname__


def test_forward_kwargs_reach_the_attention_function():
    """An engine's attention backend gets its own keyword arguments through the model's forward, unchanged."""
    seen = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("engine_metadata"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hf_lowrank_engine", recording_attention)
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny")).eval()
    model.set_attn_implementation("hf_lowrank_engine")
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    marker = object()
    model(ids, engine_metadata=marker)
    assert seen == [marker] * model.config.num_hidden_layers


def test_tensor_parallel_plan_names_every_projection():
    config = preset_config("tiny")
    plan = config.base_model_tp_plan
    for projection in LOWRANK_PROJECTIONS:
        assert any(key.endswith(projection) or f".{projection}." in key for key in plan), projection
