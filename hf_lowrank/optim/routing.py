"""Route a model's parameters to optimizer groups: factor pairs to Spectron, everything else to AdamW.

The table this code implements is in ``docs/optimizer.md``; :func:`routing_table` prints it for a given model.
Every trainable parameter lands in exactly one group (R15), and every group carries a ``"name"`` for logging.
"""

import warnings

import torch
from torch import nn

from ..configuration_lowrank import DOWN_FACTOR, LOWRANK_FACTOR_NAMES, UP_FACTOR, factor_weight_name
from ..modeling_lowrank import LowRankLinear
from .hyperparameters import ADAMW_DEFAULTS
from .spectron import Spectron

OPTIMIZER_NAMES = ("spectron", "adamw", "muon", "renorm")

# What each Spectron-family name switches off (see the ablation switches of `Spectron`).
_SPECTRON_VARIANTS = {
    "spectron": {},
    "muon": {"renormalize": False},  # orthogonalization only
    "renorm": {"orthogonalize": False},  # spectral renormalization only
}

# AdamW learning rate of the non-factor parameters under the Spectron family when `adamw_lr` is not given, and
# `hf-lowrank pretrain`'s default `--learning_rate` under `--optimizer adamw`: the best AdamW rate of the
# stability study (docs/stability.md), which also trains the Spectron family's AdamW groups at it. Spectron's own
# lr is a spectral-norm bound (~0.02-0.1) and is not a sensible AdamW rate, so the two are separate knobs.
DEFAULT_ADAMW_LR = 3e-3

DECAY, NO_DECAY, MUON = "adamw:decay", "adamw:no_decay", "muon:dense"


def lowrank_pairs(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(module name, up.weight, down.weight)`` for every ``LowRankLinear`` of ``model``, in module order."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            factors = dict(zip(LOWRANK_FACTOR_NAMES, module.factors()))
            pairs.append((name, factors[UP_FACTOR].weight, factors[DOWN_FACTOR].weight))
    return pairs


def dense_projections(model: nn.Module) -> dict[str, nn.Linear]:
    """The dense ``nn.Linear`` projections inside the decoder layers (``model.layers.N.*``), by module name: the
    dense baseline's counterparts of the factor pairs. Not factors of a ``LowRankLinear``, not embeddings or the LM
    head (outside the layers), not wrapped layers (PEFT's LoRA)."""
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and ".layers." in f".{name}" and not getattr(module, "_is_lowrank_factor", False)
    }


def _route(model: nn.Module, name: str) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group role: [(parameter name, parameter), ...]}`` over the trainable parameters of ``model``."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"Unknown optimizer {name!r}; choose from {list(OPTIMIZER_NAMES)}.")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    in_pairs: set[int] = set()
    if name == "muon":  # Muon trains every hidden matrix: dense projections whole, factor pairs factor by factor
        for module_name, module in dense_projections(model).items():
            if module.weight.requires_grad:
                groups.setdefault(MUON, []).append((f"{module_name}.weight", module.weight))
                in_pairs.add(id(module.weight))
    if name != "adamw":
        pairs = lowrank_pairs(model)
        if not pairs and not groups:
            raise ValueError(
                f"Optimizer {name!r} trains LowRankLinear factor pairs, and this model has none. Use 'adamw' or "
                "'muon' (Muon on the dense projections) for a dense model, or factorize it (`lowrank_modules`)."
            )
        for module_name, up, down in pairs:
            if up.requires_grad != down.requires_grad:
                raise ValueError(
                    f"{module_name}: one factor is frozen and the other is not; Spectron updates a pair together, "
                    "so freeze or unfreeze both."
                )
            if up.requires_grad:  # the order Spectron expects: [up.weight, down.weight]
                groups[f"spectron:{module_name}"] = [
                    (factor_weight_name(module_name, UP_FACTOR), up),
                    (factor_weight_name(module_name, DOWN_FACTOR), down),
                ]
                in_pairs.update((id(up), id(down)))
    for param_name, param in model.named_parameters():  # a tied parameter is listed once
        if param.requires_grad and id(param) not in in_pairs:
            groups.setdefault(DECAY if param.ndim >= 2 else NO_DECAY, []).append((param_name, param))
    return groups


def routing_table(model: nn.Module, name: str) -> list[tuple[str, str]]:
    """``(parameter name, group role)`` for every trainable parameter, as ``build_optimizer`` routes them."""
    return [(param_name, role) for role, members in _route(model, name).items() for param_name, _ in members]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    adamw_lr: float | None = None,
    weight_decay: float = 0.0,
    adamw_weight_decay: float = 0.0,
    betas: tuple[float, float] = ADAMW_DEFAULTS.betas,
    eps: float = ADAMW_DEFAULTS.eps,
    **spectron_options,
) -> torch.optim.Optimizer:
    """One optimizer over every trainable parameter of ``model``, so one LR scheduler drives all groups.

    Args:
        name: ``"spectron"``, ``"muon"`` (Muon on every hidden matrix: dense projections whole, factor pairs factor
            by factor, i.e. orthogonalization only), ``"renorm"`` (renormalization only) or ``"adamw"`` (plain
            ``torch.optim.AdamW`` over everything: the naive low-rank and the dense baseline).
        lr: under the Spectron family, the spectral-norm bound of each factor pair's ΔW per step (~0.02-0.1); under
            ``"muon"`` also ``‖ΔW‖₂ ≈ lr`` of each dense projection; under ``"adamw"``, the AdamW learning rate of
            every parameter.
        adamw_lr: Spectron family only: the AdamW rate of the other parameters (embeddings, LM head, norms,
            biases, and, under ``"spectron"``/``"renorm"``, the dense projections of a partly factorized model:
            Spectron's step is defined for factor pairs, so a dense projection gets AdamW, as in the paper's
            setting); default ``DEFAULT_ADAMW_LR`` = 3e-3.
        weight_decay: of the factor pairs (Spectron's decoupled ``p ← p·(1 − lr·wd)``) or, under ``"adamw"``, of
            every matrix.
        adamw_weight_decay: Spectron family only: of the AdamW matrices (embeddings, LM head, dense projections).
            Vectors (norms, biases) are never decayed.
        betas: AdamW betas of every AdamW group (default (0.9, 0.95), `AdamWHyperparameters`' default; `hf-lowrank
            pretrain` uses the same unless --adam_beta1/--adam_beta2 say otherwise).
        eps: AdamW epsilon of every AdamW group (`--adam_epsilon`).
        spectron_options: further ``Spectron`` arguments (``momentum``, ``ns_steps``, ``rebalance_every``, ...).

    Groups are named ``"spectron:<module>"`` (one per ``LowRankLinear``), ``"muon:dense"`` (the dense projections,
    under ``"muon"``), ``"adamw:decay"`` (matrices) and ``"adamw:no_decay"`` (vectors).
    """
    routes = _route(model, name)
    if name == "adamw":
        ignored = ["adamw_lr"] if adamw_lr is not None else []
        ignored += ["adamw_weight_decay"] if adamw_weight_decay != 0 else []
        ignored += sorted(spectron_options)
        if ignored:
            warnings.warn(
                f"build_optimizer(name='adamw') ignores {ignored}: every parameter uses `lr` and `weight_decay`.",
                stacklevel=2,
            )
        groups = [
            {"params": [p for _, p in members], "weight_decay": weight_decay if role == DECAY else 0.0, "name": role}
            for role, members in routes.items()
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    adamw_lr = DEFAULT_ADAMW_LR if adamw_lr is None else adamw_lr
    groups = []
    for role, members in routes.items():
        params = [p for _, p in members]
        if role.startswith("spectron:"):
            groups.append({"params": params, "name": role})
        elif role == MUON:
            groups.append({"params": params, "algorithm": "muon", "name": role})
        else:
            decay = adamw_weight_decay if role == DECAY else 0.0
            groups.append({"params": params, "algorithm": "adamw", "lr": adamw_lr, "weight_decay": decay, "name": role})
    for key, value in _SPECTRON_VARIANTS[name].items():
        if spectron_options.get(key, value) != value:
            raise ValueError(f"Optimizer {name!r} means {key}={value}; drop `{key}` or pick another name.")
    options = {**spectron_options, **_SPECTRON_VARIANTS[name]}
    return Spectron(groups, lr=lr, weight_decay=weight_decay, adamw_betas=betas, adamw_eps=eps, **options)


def assert_partition(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``AssertionError`` unless every trainable parameter of ``model`` is in exactly one group (R15)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    seen: dict[int, int] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen[id(param)] = seen.get(id(param), 0) + 1
    missing = [n for i, n in names.items() if i not in seen]
    repeated = [names.get(i, "<not a trainable parameter>") for i, count in seen.items() if count > 1]
    foreign = [i for i in seen if i not in names]
    if missing or repeated or foreign:
        raise AssertionError(
            f"Parameter routing is not a partition: missing {missing}, in several groups {repeated}, "
            f"{len(foreign)} tensor(s) that are not trainable parameters of the model."
        )
