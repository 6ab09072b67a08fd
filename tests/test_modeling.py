"""The factorized model: layers, shapes, init, attention backends, cache, save/load, checkpointing."""

import pytest
import torch
from conftest import MODEL_VARIANTS, tiny_model
from safetensors.torch import load_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_lowrank import LOWRANK_FACTOR_NAMES, LowRankLinear, LowRankLlamaForCausalLM, LowRankLlamaModel, preset_config
from hf_lowrank.presets import dense_counterpart

VARIANTS = MODEL_VARIANTS


def build(variant="lowrank", seed=0, **extra):
    return tiny_model(variant, seed, **extra).eval()


def tokens(batch=2, length=12, seed=1, vocab=512):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- LowRankLinear
def test_lowrank_linear_is_two_linears_without_nonlinearity():
    layer = LowRankLinear(48, 40, rank=6, bias=True)
    children = dict(layer.named_children())
    assert tuple(children) == LOWRANK_FACTOR_NAMES
    assert all(type(c) is torch.nn.Linear for c in children.values())
    assert layer.down.weight.shape == (6, 48) and layer.up.weight.shape == (40, 6)
    assert layer.down.bias is None and layer.up.bias is not None
    x = torch.randn(3, 5, 48)
    expected = x @ layer.merged_weight().T + layer.up.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 40, 100])
def test_lowrank_linear_rejects_impossible_rank(rank):
    with pytest.raises(ValueError, match="rank must be in"):
        LowRankLinear(48, 40, rank=rank)


def test_from_linear_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=True)
    layer = LowRankLinear.from_linear(dense, rank=8)
    singular_values = torch.linalg.svdvals(dense.weight.detach())
    error = torch.linalg.matrix_norm(dense.weight.detach() - layer.merged_weight(), ord=2)
    # Eckart-Young: the spectral error of the best rank-8 approximation is the 9th singular value.
    torch.testing.assert_close(error, singular_values[8], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.up.bias, dense.bias)
    # the split is balanced: both factors carry sqrt of the spectrum
    torch.testing.assert_close(
        torch.linalg.matrix_norm(layer.up.weight, 2), torch.linalg.matrix_norm(layer.down.weight, 2)
    )


# ---------------------------------------------------------------- structure and init
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_ranks_and_names(variant):
    model = build(variant)
    config = model.config
    for layer in model.model.layers:
        for name, (fan_in, fan_out) in config.projection_shapes().items():
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            module = getattr(parent, name)
            rank = config.rank_for(name)
            if rank is None:
                assert type(module) is torch.nn.Linear and module.weight.shape == (fan_out, fan_in)
            else:
                assert isinstance(module, LowRankLinear) and module.rank == rank
                assert module.up.weight.shape == (fan_out, rank) and module.down.weight.shape == (rank, fan_in)
    names = dict(model.named_parameters())
    for name in ("self_attn.q_proj", "mlp.down_proj"):  # Llama's names, with up/down children when factorized
        factorized = config.rank_for(name.split(".")[1]) is not None
        suffixes = ("up.weight", "down.weight") if factorized else ("weight",)
        assert all(f"model.layers.1.{name}.{suffix}" in names for suffix in suffixes), (variant, name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_initialized_and_finite(variant):
    model = build(variant)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        else:
            assert 0 < param.float().std() < 1.0, name


def test_spectral_init_is_balanced_and_matches_dense_scale():
    model = build("lowrank")
    std = model.config.initializer_range
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            s_up = torch.linalg.matrix_norm(module.up.weight, 2)
            s_down = torch.linalg.matrix_norm(module.down.weight, 2)
            torch.testing.assert_close(s_up, s_down, rtol=1e-4, atol=0)
            # top singular value of an (m x n) N(0, std^2) matrix is about std * (sqrt(m) + sqrt(n))
            bound = std * (module.in_features**0.5 + module.out_features**0.5)
            assert 0.6 * bound < s_up * s_down < 1.3 * bound


def test_normal_init_product_has_dense_variance():
    config = preset_config("60m", lowrank_init="normal", num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(0)
    model = LowRankLlamaModel(config)
    merged = model.layers[0].mlp.up_proj.merged_weight()
    assert abs(merged.std().item() / config.initializer_range - 1) < 0.1


def test_tied_embeddings_share_storage(tmp_path):
    model = build("normal_init_tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = LowRankLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not build("lowrank").config.tie_word_embeddings
    untied = build("lowrank")
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_finite_with_loss(variant, dtype):
    model = build(variant).to(dtype)
    ids = tokens()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, 512) and out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5  # near-uniform at init


def test_attention_implementation_switch_is_real():
    model = build("lowrank")
    ids = tokens()
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("hf_lowrank_counting", counting_sdpa)
    sdpa_logits = model(ids).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager_logits = model(ids).logits
    torch.testing.assert_close(sdpa_logits, eager_logits, rtol=1e-4, atol=1e-4)
    model.set_attn_implementation("hf_lowrank_counting")
    custom_logits = model(ids).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(custom_logits, sdpa_logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padding_matches_unpadded(attn):
    model = build("lowrank")
    model.set_attn_implementation(attn)
    ids = tokens(batch=1, length=8)
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(ids).logits
    got = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["lowrank", "dense", "mha"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_generation_cache_equals_no_cache(variant, attn):
    model = build(variant)
    model.set_attn_implementation(attn)
    prompt = tokens(batch=2, length=5)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without_cache)


def test_incremental_decoding_matches_full_forward():
    model = build("lowrank")
    ids = tokens(batch=1, length=10)
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    step = model(ids[:, 6:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-4, atol=1e-4)


def test_hidden_states_output():
    model = build("lowrank")
    out = model(tokens(), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_load_bit_identical(variant, tmp_path):
    model = build(variant)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    saved = load_file(tmp_path / "model.safetensors")
    if variant == "lowrank":
        assert "model.layers.0.mlp.down_proj.up.weight" in saved
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LowRankLlamaForCausalLM
    for name, param in model.state_dict().items():
        assert torch.equal(param, loaded.state_dict()[name]), name
    ids = tokens()
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_load_in_bf16(tmp_path):
    build("lowrank").save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.q_proj.up.weight.dtype == torch.bfloat16
    assert torch.isfinite(loaded(tokens()).logits).all()


# ---------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_same_gradients():
    ids = tokens()
    grads = []
    for checkpointing in (False, True):
        model = build("lowrank").train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        attn_calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, calls=attn_calls: calls.append(1))
        model(ids, labels=ids).loss.backward()
        # with checkpointing the layer's forward runs again during backward: recomputation really happened
        assert len(attn_calls) == (2 if checkpointing else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_dense_counterpart_keeps_everything_but_factorization(tiny_config):
    dense = dense_counterpart(tiny_config)
    assert dense.lowrank_modules == [] and dense.hidden_size == tiny_config.hidden_size
    assert dense.vocab_size == tiny_config.vocab_size


# ---------------------------------------------------------------- fast spectral init (large projections)
def test_spectral_init_of_small_projections_is_the_exact_truncated_svd():
    """At or below SPECTRAL_INIT_EXACT_MAX_DIM the factors are those the exact path always drew (same seed, same
    numbers): small presets such as `tiny` keep their factors."""
    from hf_lowrank.modeling_lowrank import SPECTRAL_INIT_EXACT_MAX_DIM, split_truncated_svd

    model = build("lowrank")
    std = model.config.initializer_range
    for shape in [(172, 64), (SPECTRAL_INIT_EXACT_MAX_DIM, SPECTRAL_INIT_EXACT_MAX_DIM + 8)]:
        layer = LowRankLinear(*shape, rank=16)
        torch.manual_seed(5)
        model._init_factors(layer, std)
        torch.manual_seed(5)
        dense = torch.empty(shape[1], shape[0]).normal_(mean=0.0, std=std)
        up, down = split_truncated_svd(dense, 16)
        assert torch.equal(layer.up.weight, up) and torch.equal(layer.down.weight, down)


def test_fast_spectral_init_has_the_truncated_svd_distribution():
    """Above the threshold the factors are sampled (Haar frames, Dumitriu-Edelman spectrum): the product is an exact
    rank-r matrix split as U√S, √S Vᵀ, and its spectrum matches, draw for draw in mean and spread, the top r singular
    values of dense N(0, std²) draws."""
    from hf_lowrank.modeling_lowrank import SPECTRAL_INIT_EXACT_MAX_DIM, sample_spectral_factors, split_truncated_svd

    out_features, in_features, rank, std, draws = 520, 700, 130, 0.02, 12
    assert min(out_features, in_features) > SPECTRAL_INIT_EXACT_MAX_DIM
    model = build("lowrank")
    layer = LowRankLinear(in_features, out_features, rank=rank)
    torch.manual_seed(0)
    model._init_factors(layer, std)  # the model takes the fast path for this shape
    torch.manual_seed(0)
    expected_up, expected_down = sample_spectral_factors(out_features, in_features, rank, std)
    assert torch.equal(layer.up.weight, expected_up) and torch.equal(layer.down.weight, expected_down)

    fast, exact = [], []
    for seed in range(draws):
        torch.manual_seed(seed)
        up, down = sample_spectral_factors(out_features, in_features, rank, std)
        spectrum = torch.linalg.svdvals(up @ down)[:rank]
        # U√S and √S Vᵀ: orthogonal columns / rows carrying the same spectrum (balanced factors)
        torch.testing.assert_close(up.T @ up, torch.diag(spectrum), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(down @ down.T, torch.diag(spectrum), rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(up @ down).item() == rank
        fast.append(spectrum)
        up, down = split_truncated_svd(torch.randn(out_features, in_features) * std, rank)
        exact.append(torch.linalg.svdvals(up @ down)[:rank])
    fast, exact = torch.stack(fast), torch.stack(exact)  # (draws, r)
    # the mean spectrum agrees to within a fraction of its draw-to-draw spread, at every index
    spread = exact.std(0) / draws**0.5
    assert ((fast.mean(0) - exact.mean(0)).abs() < 4 * spread + 1e-3 * exact.mean(0)).all()
    torch.testing.assert_close(fast.std(0).mean(), exact.std(0).mean(), rtol=0.35, atol=0)
    # Marchenko-Pastur edge: the top singular value is about std * (sqrt(m) + sqrt(n))
    assert abs(fast[:, 0].mean() / (std * (out_features**0.5 + in_features**0.5)) - 1) < 0.02
