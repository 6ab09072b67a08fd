"""LoRA on a whole factorized projection (`LoraConfig(target_modules=["q_proj", "v_proj"])`) through PEFT's
custom-module mechanism.

PEFT's LoRA accepts `nn.Linear` layers only, so on this model it reaches the two factors of a projection by name
(``q_proj.up``, ``q_proj.down``) and refuses ``q_proj`` itself, a `LowRankLinear`. :class:`LowRankLoraLinear` is
PEFT's own `lora.Linear` with a `LowRankLinear` as base layer: the forward pass is PEFT's,
``y = up(down(x)) + scaling · B(A(x))`` (A: in → k, B: k → out), and the adapter file is exactly what PEFT saves for
a dense Llama projection. Only merging differs, because the base layer has no dense ``weight``:

**Merging grows the rank.** ``up·down`` has rank r and ``scaling·B·A`` rank k; their sum has rank up to r + k, which
a rank-r pair cannot hold. Merging therefore concatenates the factors, ``up ← [up, scaling·B]`` (out × (r+k)) and
``down ← [down; A]`` ((r+k) × in), which is exact: the merged layer computes the same sum as the adapter. Unmerging
cuts the k columns and rows off again. :func:`merge_and_unload` also writes the new ranks into the model config
(``rank_overrides``), so the merged model saves and reloads as a `lowrank_llama` model; it refuses, before touching
the model, when the merged ranks of one projection differ between layers (the config holds one rank per projection
name) or reach min(in, out) (no longer a factorization: convert to dense instead). PEFT's own
``peft_model.merge_and_unload()`` merges the same way, and ``save_pretrained`` of the result writes the grown ranks
(the model's `sync_factor_ranks`), so the saved folder loads.

**PEFT's own calls work once `hf_lowrank` is imported** (`install_peft_registration`): ``get_peft_model`` with
``target_modules=["q_proj", "v_proj"]``, ``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``,
``merge_and_unload``. PEFT does not save the custom-module mapping in ``adapter_config.json``; the registration adds
it to every new `LoraConfig`. Where only the model's remote code is available (no ``hf_lowrank``), register it by
hand::

    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BASE, trust_remote_code=True)
    config = LoraConfig.from_pretrained(ADAPTER)
    config._register_custom_module({type(model.get_submodule("model.layers.0.self_attn.q_proj")): LoraLinear})
    model = PeftModel.from_pretrained(model, ADAPTER, config=config)

which gives the same outputs (PEFT's `lora.Linear` runs the forward pass on any base layer) but cannot merge.
"""

from __future__ import annotations

import abc
import functools

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .modeling_lowrank import LowRankLinear

LOWRANK_LINEAR_CLASS_NAME = LowRankLinear.__name__


def _is_lowrank_linear(module: nn.Module) -> bool:
    # A model loaded through its remote code has its own copy of the class (transformers_modules.<hash>...).
    return isinstance(module, LowRankLinear) or type(module).__name__ == LOWRANK_LINEAR_CLASS_NAME


class LowRankLoraLinear(PeftLoraLinear):
    """PEFT's `lora.Linear` around a `LowRankLinear`; merging grows the base layer's rank (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        if config.lora_bias:
            raise ValueError(
                "lora_bias=True is not supported on a factorized projection; leave it False (the default)."
            )
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _merged_rank_after(self, adapter_names: list[str]) -> int:
        base = self.get_base_layer()
        return base.rank + sum(self.lora_A[name].out_features for name in adapter_names if name in self.lora_A)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise ValueError(
                    f"Adapter {name!r} is a LoRA variant ({type(self.lora_variant[name]).__name__}); only plain LoRA "
                    "can be merged into a factorized projection."
                )
            up, down = base.up.weight, base.down.weight  # (out, r), (r, in)
            extra_up = (self.lora_B[name].weight * self.scaling[name]).to(up.dtype)  # (out, k)
            extra_down = self.lora_A[name].weight.to(down.dtype)  # (k, in)
            if safe_merge and not (torch.isfinite(extra_up).all() and torch.isfinite(extra_down).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            _set_factors(base, torch.cat([up, extra_up], dim=1), torch.cat([down, extra_down], dim=0))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            keep = base.rank - self.lora_A[name].out_features  # merged factors were appended last
            _set_factors(base, base.up.weight[:, :keep], base.down.weight[:keep])

    def __repr__(self) -> str:
        return "lora.LowRank" + nn.Module.__repr__(self)


def _set_factors(base: nn.Module, up_weight: torch.Tensor, down_weight: torch.Tensor) -> None:
    """Replace ``base``'s factors by ``up_weight`` (out, r') and ``down_weight`` (r', in), keeping up's bias."""
    old_up, old_down = base.up, base.down
    rank = down_weight.shape[0]
    down = nn.Linear(base.in_features, rank, bias=False, device=down_weight.device, dtype=down_weight.dtype)
    up = nn.Linear(
        rank, base.out_features, bias=old_up.bias is not None, device=up_weight.device, dtype=up_weight.dtype
    )
    down.weight.copy_(down_weight)
    up.weight.copy_(up_weight)
    if old_up.bias is not None:
        up.bias = old_up.bias
    for new, old in ((down, old_down), (up, old_up)):
        new.weight.requires_grad_(old.weight.requires_grad)
        new._is_lowrank_factor = True
    base.down, base.up, base.rank = down, up, rank


class AnyLowRankLinear(abc.ABC):  # noqa: B024 - a virtual base class: membership by __subclasshook__ alone
    """Matches every `LowRankLinear` class by ``isinstance``: this package's, and the copy a model loaded through its
    remote code brings (``transformers_modules.<hash>.modeling_lowrank.LowRankLinear``), which is another class
    object with the same name and interface."""

    @classmethod
    def __subclasshook__(cls, candidate):
        if candidate.__name__ == LOWRANK_LINEAR_CLASS_NAME and hasattr(candidate, "factors"):
            return True
        return NotImplemented


def install_peft_registration() -> None:
    """Make every `LoraConfig` know whole factorized projections, so PEFT's own entry points (`get_peft_model`,
    `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`, `merge_and_unload`) work on ``"q_proj"``-style targets
    with no call of this package in between. Idempotent.

    PEFT has no public registry of custom layers: its documented mechanism is the per-config
    ``LoraConfig._register_custom_module``, which is not saved with an adapter. So this wraps
    ``LoraConfig.__post_init__`` (which every construction runs, ``LoraConfig.from_pretrained`` included) to
    register `LowRankLoraLinear` for `AnyLowRankLinear` on each new config. Tested against PEFT 0.19 and 0.21
    (tests/test_peft_projections.py). `hf_lowrank` calls this when PEFT is imported (see ``hf_lowrank/__init__.py``).
    """
    if getattr(LoraConfig.__post_init__, "_hf_lowrank", False):
        return
    original = LoraConfig.__post_init__

    @functools.wraps(original)
    def __post_init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._register_custom_module({AnyLowRankLinear: LowRankLoraLinear})

    __post_init__._hf_lowrank = True
    LoraConfig.__post_init__ = __post_init__


def register_lowrank_lora(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Let ``config`` target whole `LowRankLinear` projections (``"q_proj"``, ...); returns ``config``.

    Pass ``model`` when it was loaded through remote code, whose `LowRankLinear` is another class object.
    Targets that are factors (``"q_proj.up"``) or dense layers keep PEFT's standard LoRA layer.
    """
    classes = {LowRankLinear}
    if model is not None:
        classes.update(type(m) for m in model.modules() if _is_lowrank_linear(m))
    config._register_custom_module({cls: LowRankLoraLinear for cls in classes})
    return config


def get_lowrank_peft_model(model: nn.Module, config: LoraConfig, **kwargs):
    """`peft.get_peft_model` with ``config`` registered for whole factorized projections."""
    from peft import get_peft_model

    return get_peft_model(model, register_lowrank_lora(config, model), **kwargs)


def load_lora(model: nn.Module, adapter: str, **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained` of an adapter saved from a factorized model (any targets)."""
    config = register_lowrank_lora(LoraConfig.from_pretrained(adapter), model)
    return PeftModel.from_pretrained(model, adapter, config=config, **kwargs)


def _projection_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _check_rank_fits(name: str, module: nn.Module, rank: int) -> None:
    if rank >= min(module.in_features, module.out_features):
        raise ValueError(
            f"Merging into {name} would give rank {rank} >= min(in, out) = "
            f"{min(module.in_features, module.out_features)}: no longer a factorization. Use a smaller LoRA r, "
            "or merge into the dense model (`hf-lowrank convert --to_dense`, then load the adapter there)."
        )


def _check_uniform(ranks: dict[str, dict[str, int]]) -> None:
    for projection, per_layer in ranks.items():
        if len(set(per_layer.values())) > 1:
            raise ValueError(
                f"After merging, the {projection} layers would have different ranks ({per_layer}); the model config "
                "holds one rank per projection name, so the merged model could not be saved and reloaded. Target "
                f"every layer's {projection} with the same LoRA r, or keep the adapter unmerged."
            )


def sync_config_ranks(model: nn.Module) -> None:
    """Write the ranks of ``model``'s factorized projections into ``model.config.rank_overrides`` (after a merge
    grew them): the model's own `sync_factor_ranks`, which ``save_pretrained`` also runs."""
    model.sync_factor_ranks()


def merge_and_unload(peft_model: PeftModel, safe_merge: bool = False, adapter_names: list[str] | None = None):
    """Merge the adapters into the base model and return it, with its config's ranks updated (exact merge).

    Checked before anything changes: every projection name gets one merged rank across layers, below min(in, out).
    """
    ranks: dict[str, dict[str, int]] = {}
    for name, module in peft_model.named_modules():
        if _is_lowrank_linear(module) and ".base_layer" not in f".{name}.":
            ranks.setdefault(_projection_name(name), {})[name] = module.rank
    for name, module in peft_model.named_modules():
        if isinstance(module, LowRankLoraLinear):
            names = adapter_names if adapter_names is not None else module.active_adapters
            names = [n for n in names if n not in module.merged_adapters]
            rank = module._merged_rank_after(names)
            _check_rank_fits(name, module.get_base_layer(), rank)
            ranks.setdefault(_projection_name(name), {})[name] = rank
    _check_uniform(ranks)
    model = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    sync_config_ranks(model)
    return model


__all__ = [
    "AnyLowRankLinear",
    "LowRankLoraLinear",
    "install_peft_registration",
    "get_lowrank_peft_model",
    "load_lora",
    "merge_and_unload",
    "register_lowrank_lora",
    "sync_config_ranks",
]
