"""hf-lowrank: native low-rank LLM pretraining for the Hugging Face ecosystem.

Importing the package registers the model with the Auto classes, so saved models load with
``AutoModelForCausalLM.from_pretrained`` and no remote code.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

import transformers
from transformers import AutoConfig

from . import modeling_lowrank
from .configuration_lowrank import LOWRANK_FACTOR_NAMES, LOWRANK_PROJECTIONS, LowRankLlamaConfig
from .modeling_lowrank import (
    AUTO_CLASSES,
    LowRankLinear,
    LowRankLlamaForCausalLM,
    LowRankLlamaForQuestionAnswering,
    LowRankLlamaForSequenceClassification,
    LowRankLlamaForTokenClassification,
    LowRankLlamaModel,
    LowRankLlamaPreTrainedModel,
)
from .optim import OPTIMIZER_NAMES, Spectron, build_optimizer, lowrank_pairs
from .presets import PRESETS, count_parameters, dense_counterpart, preset_config

__version__ = "0.1.0"

AutoConfig.register(LowRankLlamaConfig.model_type, LowRankLlamaConfig, exist_ok=True)
# `save_pretrained` writes `auto_map` (every class of AUTO_CLASSES) and copies the configuration and modeling files
# beside the weights, so the folder (or Hub repo) loads with `trust_remote_code=True` where this package is not
# installed.
LowRankLlamaConfig.register_for_auto_class()
for _auto_name, _class_name in AUTO_CLASSES.items():
    _model_class = getattr(modeling_lowrank, _class_name)
    getattr(transformers, _auto_name).register(LowRankLlamaConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_name)


# PEFT's own calls (`get_peft_model(model, LoraConfig(target_modules=["q_proj"]))`, `PeftModel.from_pretrained`,
# `merge_and_unload`) need whole factorized projections registered with every LoraConfig
# (`peft_integration.install_peft_registration`). PEFT is imported only if the user imports it: now, if it already
# is, or right after its own import otherwise, so `import hf_lowrank` stays light.
class _AfterPeftImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        # The real spec, found without this finder. `find_spec` alone (transformers' `is_peft_available()` asks it)
        # imports nothing, so this finder stays installed until PEFT's module actually runs.
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from .peft_integration import install_peft_registration

            install_peft_registration()

        spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    from .peft_integration import install_peft_registration

    install_peft_registration()
elif importlib.util.find_spec("peft") is not None and not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterPeftImport())

__all__ = [
    "LOWRANK_FACTOR_NAMES",
    "LOWRANK_PROJECTIONS",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "Spectron",
    "LowRankLinear",
    "LowRankLlamaConfig",
    "LowRankLlamaForCausalLM",
    "LowRankLlamaForQuestionAnswering",
    "LowRankLlamaForSequenceClassification",
    "LowRankLlamaForTokenClassification",
    "LowRankLlamaModel",
    "LowRankLlamaPreTrainedModel",
    "build_optimizer",
    "count_parameters",
    "dense_counterpart",
    "lowrank_pairs",
    "preset_config",
]
