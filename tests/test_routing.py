"""Parameter routing: factor pairs to Spectron, the rest to AdamW; total and disjoint (R15); training works."""

import pytest
import torch

from hf_lowrank import LowRankLinear, LowRankLlamaForCausalLM, preset_config
from hf_lowrank.optim import (
    DEFAULT_ADAMW_LR,
    OPTIMIZER_NAMES,
    Spectron,
    assert_partition,
    build_optimizer,
    lowrank_pairs,
    routing_table,
)
from hf_lowrank.optim.routing import dense_projections

MODELS = {
    "lowrank": {},
    "dense": {"lowrank_modules": []},
    "mixed_bias": {"lowrank_modules": ["q_proj", "o_proj", "down_proj"], "attention_bias": True, "mlp_bias": True},
    "tied": {"tie_word_embeddings": True},
}
SPECTRON_FAMILY = ("spectron", "muon", "renorm")
# Spectron's lr bounds ‖ΔW‖₂ per step; AdamW's is a per-coordinate step size.
TRAIN_LR = {"spectron": 0.05, "muon": 0.02, "renorm": 0.05, "adamw": 3e-3}


def build(variant, seed=0):
    torch.manual_seed(seed)
    # Normal factor init: routing does not depend on it, and the spectral init's SVDs are slow on a busy CPU.
    return LowRankLlamaForCausalLM(preset_config("tiny", lowrank_init="normal", **MODELS[variant]))


def cases():
    for variant in MODELS:
        for name in OPTIMIZER_NAMES:
            if variant != "dense" or name in ("adamw", "muon"):
                yield variant, name


@pytest.mark.parametrize("variant, name", list(cases()))
def test_routing_is_a_partition_with_one_spectron_group_per_pair(variant, name):
    model = build(variant)
    optimizer = build_optimizer(model, name, lr=0.02)
    assert_partition(model, optimizer)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable

    pairs = lowrank_pairs(model)
    assert len(pairs) == sum(isinstance(m, LowRankLinear) for m in model.modules())
    spectron_groups = [g for g in optimizer.param_groups if g.get("algorithm") == "spectron"]
    if name == "adamw":
        assert isinstance(optimizer, torch.optim.AdamW) and not spectron_groups
    else:
        assert isinstance(optimizer, Spectron)
        # exactly the LowRankLinear pairs, each as [up.weight, down.weight], named after its module
        assert [(g["name"], *g["params"]) for g in spectron_groups] == [
            (f"spectron:{module}", up, down) for module, up, down in pairs
        ]
        expected = {"muon": (True, False), "renorm": (False, True), "spectron": (True, True)}[name]
        assert all((g["orthogonalize"], g["renormalize"]) == expected for g in spectron_groups)

    # Muon trains every dense projection whole; under spectron/renorm they are AdamW's (a deliberate choice)
    dense = {id(m.weight) for m in dense_projections(model).values()}
    muon_groups = [g for g in optimizer.param_groups if g.get("algorithm") == "muon"]
    if name == "muon" and dense:
        assert [g["name"] for g in muon_groups] == ["muon:dense"]
        assert {id(p) for p in muon_groups[0]["params"]} == dense and muon_groups[0]["lr"] == 0.02
    else:
        assert not muon_groups
    assert bool(dense) == (variant in ("dense", "mixed_bias"))

    adamw_groups = {g["name"]: g for g in optimizer.param_groups if g.get("algorithm", "adamw") == "adamw"}
    assert set(adamw_groups) == {"adamw:decay", "adamw:no_decay"}
    decayed = {id(p) for p in adamw_groups["adamw:decay"]["params"]}
    assert not dense & decayed if name == "muon" else dense <= decayed
    assert all(p.ndim >= 2 for p in adamw_groups["adamw:decay"]["params"])
    assert all(p.ndim == 1 for p in adamw_groups["adamw:no_decay"]["params"])
    assert adamw_groups["adamw:no_decay"]["weight_decay"] == 0.0
    if name != "adamw":
        assert all(g["lr"] == DEFAULT_ADAMW_LR for g in adamw_groups.values())
        if variant == "mixed_bias":  # up.bias is AdamW's, like every bias
            no_decay = {id(p) for p in adamw_groups["adamw:no_decay"]["params"]}
            assert all(id(m.up.bias) in no_decay for m in model.modules() if isinstance(m, LowRankLinear))

    table = routing_table(model, name)  # what the docs show: each parameter once, with its group's name
    params = dict(model.named_parameters())
    assert sorted(n for n, _ in table) == sorted(params)
    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    assert all(group_of[id(params[n])] == role for n, role in table)


def test_tied_embeddings_appear_once():
    model = build("tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name in OPTIMIZER_NAMES:
        optimizer = build_optimizer(model, name, lr=0.02)
        count = sum(p is model.lm_head.weight for g in optimizer.param_groups for p in g["params"])
        assert count == 1


def test_hyperparameters_reach_their_groups():
    model = build("mixed_bias")
    optimizer = build_optimizer(
        model, "spectron", lr=0.03, adamw_lr=2e-3, weight_decay=0.1, adamw_weight_decay=0.05, momentum=0.9
    )
    by_name = {g["name"]: g for g in optimizer.param_groups}
    pair = by_name["spectron:model.layers.0.self_attn.q_proj"]
    assert (pair["lr"], pair["weight_decay"], pair["momentum"]) == (0.03, 0.1, 0.9)
    assert (by_name["adamw:decay"]["lr"], by_name["adamw:decay"]["weight_decay"]) == (2e-3, 0.05)
    assert by_name["adamw:no_decay"]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out():
    model = build("lowrank")
    model.model.embed_tokens.weight.requires_grad_(False)
    layer = model.model.layers[0].self_attn.q_proj
    layer.up.weight.requires_grad_(False), layer.down.weight.requires_grad_(False)
    optimizer = build_optimizer(model, "spectron", lr=0.02)
    assert_partition(model, optimizer)
    assert "spectron:model.layers.0.self_attn.q_proj" not in {g["name"] for g in optimizer.param_groups}
    layer.down.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="freeze or unfreeze both"):
        build_optimizer(model, "spectron", lr=0.02)


def test_assert_partition_catches_a_missing_or_repeated_parameter():
    model = build("lowrank")
    params = [p for p in model.parameters() if p is not model.lm_head.weight]
    with pytest.raises(AssertionError, match="lm_head.weight"):
        assert_partition(model, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(AssertionError, match="not trainable parameters"):
        assert_partition(model, torch.optim.SGD([*model.parameters(), torch.zeros(2, requires_grad=True)], lr=0.1))


def test_unknown_names_and_dense_models_are_refused():
    with pytest.raises(ValueError, match="choose from"):
        build_optimizer(build("lowrank"), "lion", lr=0.02)
    for name in ("spectron", "renorm"):  # defined for factor pairs only; Muon also takes dense matrices
        with pytest.raises(ValueError, match="Use 'adamw' or 'muon'"):
            build_optimizer(build("dense"), name, lr=0.02)


def test_variant_names_refuse_contradicting_switches():
    with pytest.raises(ValueError, match="means renormalize=False"):
        build_optimizer(build("lowrank"), "muon", lr=0.02, renormalize=True)


def test_adamw_warns_about_ignored_spectron_settings():
    with pytest.warns(UserWarning, match="adamw_lr.*momentum"):
        build_optimizer(build("lowrank"), "adamw", lr=1e-3, adamw_lr=1e-3, momentum=0.9)


@pytest.mark.parametrize("variant, name", [(v, n) for v, n in cases() if v in ("lowrank", "dense")])
def test_a_few_steps_lower_the_loss(variant, name):
    model = build(variant)
    batch = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    optimizer = build_optimizer(model, name, lr=TRAIN_LR[name])
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
