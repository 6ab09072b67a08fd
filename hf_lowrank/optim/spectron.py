"""The Spectron optimizer: a thin ``torch.optim.Optimizer`` around the maths of ``functional.py``.

It holds the state, validates param groups through the records of ``hyperparameters.py``, and steps every factor
pair through one driver (:meth:`Spectron._spectron_steps`) whether the pair is local or FSDP2-sharded: the driver
opens each pair as a :class:`~hf_lowrank.optim.functional.PairView` (the factors themselves, or their local shards
with all-reducing Grams from ``sharded.py``), runs the update (pair by pair, or batched over pairs with
``batched.py``), then counts the step and rebalances. Layers, each importing only those below it:
``functional``/``hyperparameters`` → ``batched``, ``sharded`` → ``spectron`` → ``routing``.
"""

from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .batched import spectron_update_batched
from .functional import (
    PairView,
    adamw_update,
    init_adamw_state,
    init_muon_state,
    init_spectron_state,
    muon_update,
    rebalance_pair,
    spectron_pair_update,
)
from .hyperparameters import ADAMW_DEFAULTS, SPECTRON_ONLY_KEYS, AdamWHyperparameters, SpectronHyperparameters
from .sharded import holds_dtensor, init_sharded_pair_state, local_adamw_view, sharded_pair_view


class Spectron(torch.optim.Optimizer):
    r"""Spectron for factor pairs, plus AdamW for everything else, in one optimizer.

    **Units: ``lr`` is the largest allowed spectral norm of the weight update ΔW = Δ(up @ down) per step**
    (typical values 0.02–0.1; it is not comparable to an AdamW learning rate). The bound holds approximately:
    Newton–Schulz leaves singular values in about [0.68, 1.14] and power iteration slightly underestimates σ.

    Args:
        params: an iterable of ``(up.weight, down.weight)`` tuples, or of param-group dicts. A Spectron group
            holds exactly one pair, ``"params": [up.weight, down.weight]`` with shapes (out, r) and (r, in),
            plus optional per-group values of the hyperparameters below. A group with ``"algorithm": "adamw"``
            holds any parameters (embeddings, LM head, norms, biases) and gets decoupled AdamW; it must set its
            own ``lr``; ``betas`` and ``eps`` default to ``adamw_betas`` and ``adamw_eps``, ``weight_decay`` to 0
            (the constructor's ``weight_decay`` is in Spectron's units). Use
            :func:`hf_lowrank.optim.build_optimizer` to route a model's parameters.
        lr: spectral-norm bound of ΔW per step (see above).
        hyperparameters: the other Spectron hyperparameters by keyword (``momentum``, ``ns_steps``,
            ``power_iters``, ``first_power_iters``, ``weight_decay``, ``orthogonalize``, ``renormalize``,
            ``rebalance_every``, ``eps``): units, defaults and valid ranges are documented once, in
            :class:`~hf_lowrank.optim.SpectronHyperparameters`.
        adamw_betas, adamw_eps: defaults of the AdamW groups.
        batched: the fast path (default): all pairs that share hyperparameters in one step, Newton–Schulz in its
            r × r Gram form batched over factors of one rank (:mod:`hf_lowrank.optim.batched`), and AdamW groups
            on CPU through torch's fused kernel. ``False`` runs the reference ``spectron_pair_update`` pair by pair
            and ``adamw_update``. Same results up to float32 rounding (tests/test_spectron_fast.py), same state;
            1.8-2.1x faster on CPU (docs/benchmarks.md).

    State (tensors only, loadable with ``torch.load(weights_only=True)``): per factor ``momentum_buffer``
    (float32), power-iteration vectors ``u`` (long,) and ``v`` (r,), the last ``sigma`` and ``step`` (a CPU
    tensor); per AdamW parameter ``step``, ``exp_avg``, ``exp_avg_sq``.

    Groups whose parameters are DTensors (FSDP2) step on local shards with the Grams and power-iteration sums
    all-reduced: see :mod:`hf_lowrank.optim.sharded`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        *,
        adamw_betas: tuple[float, float] = ADAMW_DEFAULTS.betas,
        adamw_eps: float = ADAMW_DEFAULTS.eps,
        batched: bool = True,
        **hyperparameters,
    ):
        self.batched = batched
        self._adamw_defaults = {"betas": tuple(adamw_betas), "eps": adamw_eps, "weight_decay": 0.0}
        unknown = sorted(set(hyperparameters) - set(SpectronHyperparameters.names()))
        if unknown:
            raise TypeError(
                f"Spectron got unknown arguments {unknown}; the hyperparameters are the fields of SpectronHyperparameters."
            )
        defaults = SpectronHyperparameters.from_group({"lr": lr, **hyperparameters}, where="Spectron").as_dict()
        groups = []
        for item in params:
            if isinstance(item, dict):
                groups.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
                groups.append({"params": list(item)})
            else:
                raise ValueError(
                    "Spectron takes (up.weight, down.weight) pairs or param-group dicts, got "
                    f"{type(item).__name__}. Use hf_lowrank.optim.build_optimizer(model, 'spectron', lr) to route "
                    "a model's parameters."
                )
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        algorithm = group.setdefault("algorithm", "spectron")
        if algorithm == "spectron":
            _validate_pair(group)
            SpectronHyperparameters.from_group({**self.defaults, **group}, where=f"group {group.get('name', '')!r}")
        elif algorithm == "adamw":
            if "lr" not in group:
                raise ValueError(
                    f"AdamW group {group.get('name', '')!r} must set its own 'lr': Spectron's lr is a spectral-norm "
                    "bound (~0.02-0.1), not an AdamW step size (~1e-3)."
                )
            for key, value in self._adamw_defaults.items():
                group.setdefault(key, value)
            AdamWHyperparameters.from_group(group, where=f"AdamW group {group.get('name', '')!r}")
        elif algorithm == "muon":
            _validate_muon_group(group)
            SpectronHyperparameters.from_group({**self.defaults, **group}, where=f"group {group.get('name', '')!r}")
        else:
            raise ValueError(
                f"Unknown 'algorithm' {algorithm!r} in a Spectron param group; use 'spectron', 'muon' or 'adamw'."
            )
        super().add_param_group(group)
        if algorithm == "adamw":  # torch filled in Spectron's defaults, which mean nothing here
            for key in SPECTRON_ONLY_KEYS:
                group.pop(key, None)
        elif algorithm == "muon":  # only lr, momentum, ns_steps, weight_decay and eps apply to a whole matrix
            for key in MUON_UNUSED_KEYS:
                group.pop(key, None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = []
        for group in self.param_groups:
            if group["algorithm"] == "adamw":
                self._adamw_step(group)
            elif group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                pairs.append(group)
        self._spectron_steps(pairs)
        return loss

    @contextmanager
    def _pair_view(self, group: dict) -> Iterator[PairView | None]:
        """``group``'s pair as the update sees it, its state created if missing; ``None`` without gradients."""
        up, down = group["params"]
        if holds_dtensor((up, down)):  # FSDP2: local shards along the long dimension, Grams all-reduced
            with sharded_pair_view(up, down, self.state, group.get("name", "")) as pair:
                yield pair
            return
        if up.grad is None and down.grad is None:
            yield None
            return
        for param in (up, down):
            if not self.state[param]:
                self.state[param].update(init_spectron_state(param))
        yield PairView(up, down, up.grad, down.grad, self.state[up], self.state[down])

    def _spectron_steps(self, groups: list[dict]) -> None:
        """The one driver of every pair, local or sharded: update, then count the step and rebalance when due.

        Local pairs with ``batched`` and the same update options are updated together by ``spectron_update_batched``
        (counted and rebalanced after it); the others, sharded pairs included, one by one by
        ``spectron_pair_update`` inside their view, since a sharded view writes resharded factors back on exit.
        """
        batches, deferred = defaultdict(list), []
        for group in groups:
            hyperparameters = SpectronHyperparameters.from_group(group, where=f"group {group.get('name', '')!r}")
            with self._pair_view(group) as pair:
                if pair is None:
                    continue
                first = pair.state_up["step"].item() == 0
                options = hyperparameters.update_options(first)
                arguments = (
                    pair.up,
                    pair.down,
                    pair.grad_up if pair.grad_up is not None else torch.zeros_like(pair.up),
                    pair.grad_down if pair.grad_down is not None else torch.zeros_like(pair.down),
                    pair.state_up,
                    pair.state_down,
                )
                if self.batched and not pair.distributed:
                    batches[tuple(options.items())].append(arguments)
                    deferred.append((pair, hyperparameters))
                    continue
                spectron_pair_update(*arguments, **options, gram_fn=pair.gram_fn, reduce_fn=pair.reduce_fn)
                _end_pair_step(pair, hyperparameters)
        for options, pairs in batches.items():
            spectron_update_batched(*(list(column) for column in zip(*pairs)), **dict(options))
        for pair, hyperparameters in deferred:
            _end_pair_step(pair, hyperparameters)

    def _muon_step(self, group: dict) -> None:
        """Muon on each dense matrix of ``group`` (the step of `muon_update`, one matrix at a time)."""
        hyperparameters = SpectronHyperparameters.from_group(group, where=f"group {group.get('name', '')!r}")
        for param in group["params"]:
            if param.grad is None:
                continue
            if not self.state[param]:
                self.state[param].update(init_muon_state(param))
            muon_update(
                param,
                param.grad,
                self.state[param],
                lr=hyperparameters.lr,
                momentum=hyperparameters.momentum,
                ns_steps=hyperparameters.ns_steps,
                weight_decay=hyperparameters.weight_decay,
                eps=hyperparameters.eps,
            )

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for param in params:
            if not self.state[param]:
                self.state[param].update(init_adamw_state(param))  # zeros_like keeps a DTensor's placement
        options = AdamWHyperparameters.from_group(group, where=f"AdamW group {group.get('name', '')!r}").as_dict()
        if self.batched and params and not holds_dtensor(params) and all(p.device.type == "cpu" for p in params):
            # torch's fused CPU kernel: one pass per tensor instead of adamw_update's five, and no temporaries
            # (10x faster on an embedding); the arithmetic of adamw_update up to float32 rounding.
            states = [self.state[p] for p in params]
            steps = [state["step"] for state in states]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = options["betas"]
            torch._fused_adamw_(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["exp_avg_sq"] for state in states],
                [],
                steps,
                amsgrad=False,
                lr=options["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=options["weight_decay"],
                eps=options["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
            return
        for param in params:  # a sharded parameter steps on its local shard: AdamW is elementwise
            adamw_update(*local_adamw_view(param, self.state[param]), **options)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to its parameter's dtype; Spectron keeps float32 momenta and vectors for
        # bf16 factors, so restore the saved dtypes or a resumed run would not match an uninterrupted one (R5).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor) and value.dtype != self.state[param][key].dtype:
                    self.state[param][key] = value.to(device=self.state[param][key].device)


def _end_pair_step(pair: PairView, hyperparameters: SpectronHyperparameters) -> None:
    """Count the pair's step; rebalance it every ``rebalance_every`` steps (with the view's reductions)."""
    pair.state_up["step"] += 1
    pair.state_down["step"] += 1
    every = hyperparameters.rebalance_every
    if every and int(pair.state_up["step"].item()) % every == 0:
        rebalance_pair(
            pair.up,
            pair.down,
            pair.state_up,
            pair.state_down,
            power_iters=hyperparameters.power_iters,
            eps=hyperparameters.eps,
            reduce_fn=pair.reduce_fn,
        )


def init_optimizer_state(optimizer: Spectron) -> None:
    """Create the state of every parameter now instead of at its first step (sharded for DTensors).

    ``torch.distributed.checkpoint`` needs the state to exist before loading into it; without this,
    ``get_state_dict``/``set_state_dict`` create it by running a step with zero gradients and lr 0. Idempotent.
    """
    for group in optimizer.param_groups:
        params = group["params"]
        if group["algorithm"] in ("adamw", "muon"):
            init = init_adamw_state if group["algorithm"] == "adamw" else init_muon_state
            for param in params:
                if not optimizer.state[param]:
                    optimizer.state[param].update(init(param))
            continue
        up, down = params
        if holds_dtensor(params):
            init_sharded_pair_state(up, down, optimizer.state, group.get("name", ""))
            continue
        for param in params:
            if not optimizer.state[param]:
                optimizer.state[param].update(init_spectron_state(param))


# Spectron hyperparameters that mean nothing for a whole dense matrix under Muon (no factor pair, no σ).
MUON_UNUSED_KEYS = ("power_iters", "first_power_iters", "orthogonalize", "renormalize", "rebalance_every")


def _validate_muon_group(group: dict) -> None:
    name = group.get("name", "")
    for param in group["params"]:
        if param.ndim != 2:
            raise ValueError(
                f"Muon group {name!r} holds a tensor of shape {tuple(param.shape)}; Muon orthogonalizes matrices. "
                "Put vectors (norms, biases) in an 'adamw' group."
            )
    if holds_dtensor(group["params"]):
        raise ValueError(
            f"Muon group {name!r} holds FSDP2-sharded matrices: Newton-Schulz on a whole dense matrix needs all of "
            "it on every rank, which the sharded step does not gather. Train dense projections with AdamW under "
            "FSDP2 (--optimizer spectron or adamw), or shard with DDP."
        )


def _validate_pair(group: dict) -> None:
    name = group.get("name", "")
    params = group["params"]
    if len(params) != 2:
        raise ValueError(
            f"Spectron group {name!r} holds {len(params)} tensors; a Spectron group holds exactly one factor pair, "
            "'params': [up.weight, down.weight]. Put other parameters in a group with 'algorithm': 'adamw'."
        )
    up, down = params
    if up.ndim != 2 or down.ndim != 2:
        raise ValueError(
            f"Spectron group {name!r}: factors must be 2-D, got shapes {tuple(up.shape)} and {tuple(down.shape)}. "
            "Put vectors (norms, biases) in an 'adamw' group."
        )
    out_features, rank = up.shape
    if down.shape[0] != rank or rank > min(out_features, down.shape[1]):
        raise ValueError(
            f"Spectron group {name!r}: shapes {tuple(up.shape)} and {tuple(down.shape)} are not a factor pair "
            "(out, r) and (r, in) with r <= min(out, in); pass [up.weight, down.weight] in that order."
        )
