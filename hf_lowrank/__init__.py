"""hf-lowrank: native low-rank LLM pretraining for the Hugging Face ecosystem.

Importing the package registers the model with the Auto classes, so saved models load with
``AutoModelForCausalLM.from_pretrained`` and no remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaConfig
from .modeling_lowrank import (
    LOWRANK_FACTOR_NAMES,
    LowRankLinear,
    LowRankLlamaForCausalLM,
    LowRankLlamaModel,
    LowRankLlamaPreTrainedModel,
)
from .optim import OPTIMIZER_NAMES, Spectron, build_optimizer, lowrank_pairs
from .presets import PRESETS, count_parameters, dense_counterpart, preset_config

__version__ = "0.1.0"

AutoConfig.register(LowRankLlamaConfig.model_type, LowRankLlamaConfig, exist_ok=True)
AutoModel.register(LowRankLlamaConfig, LowRankLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LowRankLlamaConfig, LowRankLlamaForCausalLM, exist_ok=True)

# `save_pretrained` writes `auto_map` and copies the configuration and modeling files beside the weights,
# so the folder (or Hub repo) loads with `trust_remote_code=True` where this package is not installed.
LowRankLlamaConfig.register_for_auto_class()
LowRankLlamaModel.register_for_auto_class("AutoModel")
LowRankLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LOWRANK_FACTOR_NAMES",
    "LOWRANK_PROJECTIONS",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "Spectron",
    "LowRankLinear",
    "LowRankLlamaConfig",
    "LowRankLlamaForCausalLM",
    "LowRankLlamaModel",
    "LowRankLlamaPreTrainedModel",
    "build_optimizer",
    "count_parameters",
    "dense_counterpart",
    "lowrank_pairs",
    "preset_config",
]
