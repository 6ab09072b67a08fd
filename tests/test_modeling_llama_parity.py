"""The dense baseline (`lowrank_modules=[]`) has Llama's parameter names, so Transformers' own `LlamaModel` can load its
weights: every Llama behaviour (RoPE variants, attention outputs, output conventions, signatures, task heads) is
checked against the real thing, and the factorized model against the same code paths."""

import warnings

import pytest
import torch
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary_pos_emb

from hf_lowrank import (
    LowRankLlamaForCausalLM,
    LowRankLlamaForQuestionAnswering,
    LowRankLlamaForSequenceClassification,
    LowRankLlamaForTokenClassification,
    LowRankLlamaModel,
    preset_config,
)
from hf_lowrank.modeling_lowrank import apply_rotary_pos_emb

VOCAB = 512
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 10.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + i / 8 for i in range(8)],
        "long_factor": [2.0 + i / 4 for i in range(8)],
        "original_max_position_embeddings": 64,
    },
}


def tokens(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def config_pair(rope=None, attn="eager", **extra):
    """A dense config of ours and the LlamaConfig of the same architecture."""
    rope_parameters = None if rope is None else {**rope, "rope_theta": 10000.0}
    ours = preset_config("tiny", lowrank_modules=[], rope_parameters=rope_parameters, **extra)
    llama = LlamaConfig(
        vocab_size=ours.vocab_size,
        hidden_size=ours.hidden_size,
        intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads,
        head_dim=ours.head_dim,
        max_position_embeddings=ours.max_position_embeddings,
        rms_norm_eps=ours.rms_norm_eps,
        rope_parameters=dict(ours.rope_parameters),
        **{"pad_token_id": ours.pad_token_id, **extra},
    )
    ours._attn_implementation = llama._attn_implementation = attn
    return ours, llama


def model_pair(ours_cls, llama_cls, rope=None, attn="eager", **extra):
    ours_config, llama_config = config_pair(rope, attn, **extra)
    torch.manual_seed(0)
    ours = ours_cls(ours_config).eval()
    llama = llama_cls(llama_config).eval()
    llama.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    return ours, llama


# ---------------------------------------------------------------- 1. RoPE variants
@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_variants_match_llama(rope):
    ours, llama = model_pair(LowRankLlamaForCausalLM, LlamaForCausalLM, ROPES[rope])
    # 140 > max_position_embeddings (128): dynamic and longrope switch to their long-context frequencies
    for length in (12, 140):
        ids = tokens(length=length)
        torch.testing.assert_close(ours(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_scaling_changes_the_model():
    """Before the fix `rope_type="linear", factor=10` gave bit-identical hidden states to plain RoPE."""
    torch.manual_seed(0)
    plain = LowRankLlamaModel(preset_config("tiny")).eval()
    torch.manual_seed(0)
    scaled = LowRankLlamaModel(preset_config("tiny", rope_parameters={"rope_type": "linear", "factor": 10.0})).eval()
    ids = tokens()
    assert not torch.allclose(plain(ids).last_hidden_state, scaled(ids).last_hidden_state, atol=1e-4)


def test_rope_training_backward_matches_autograd_for_scaled_tables():
    """The hand-written training backward (tables scaled by yarn's attention factor) equals autograd of Llama's."""
    ours, llama = model_pair(LowRankLlamaForCausalLM, LlamaForCausalLM, ROPES["yarn"])
    ids = tokens()
    ours.train(), llama.train()
    ours(ids, labels=ids).loss.backward()
    llama(ids, labels=ids).loss.backward()
    for (name, p_ours), p_llama in zip(ours.named_parameters(), llama.parameters()):
        torch.testing.assert_close(p_ours.grad, p_llama.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("training", [False, True])
def test_partial_rotary_turns_the_leading_channels_only(training):
    q = torch.randn(2, 4, 5, 16, requires_grad=training)
    k = torch.randn(2, 2, 5, 16, requires_grad=training)
    config = preset_config("tiny", partial_rotary_factor=0.5)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    model = LowRankLlamaModel(config)
    cos, sin = model.rotary_emb(q, torch.arange(5)[None].expand(2, 5))
    assert cos.shape[-1] == 8  # half of head_dim 16
    for ours, reference in zip(apply_rotary_pos_emb(q, k, cos, sin), neox_apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(ours, reference)
    full = LowRankLlamaModel(preset_config("tiny", partial_rotary_factor=1.0)).eval()
    full.load_state_dict(model.state_dict())
    ids = tokens()
    assert not torch.allclose(model.eval()(ids).last_hidden_state, full(ids).last_hidden_state, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"rope_parameters": {"rope_type": "no-such-rope"}}, ValueError),
        ({"rope_parameters": {"rope_type": "linear"}}, KeyError),  # Transformers' own check: `factor` is required
        ({"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}, ValueError),
        ({"partial_rotary_factor": 0.0}, ValueError),
        ({"partial_rotary_factor": 1.5}, ValueError),
    ],
)
def test_rope_settings_the_model_cannot_honour_raise(overrides, error):
    with pytest.raises(error):
        preset_config("tiny", **overrides)


def test_rope_parameters_round_trip_and_old_rope_theta_still_loads(tmp_path):
    config = preset_config("tiny", rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    assert config.rope_theta == 500.0
    torch.manual_seed(0)
    LowRankLlamaForCausalLM(config).save_pretrained(tmp_path)
    loaded = LowRankLlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters == config.rope_parameters
    assert loaded.model.rotary_emb.rope_type == "linear"


# ---------------------------------------------------------------- 2. attention weights
@pytest.mark.parametrize("variant", [{"lowrank_modules": []}, {}])
def test_output_attentions_eager_are_the_softmax_weights(variant):
    config = preset_config("tiny", **variant)
    config._attn_implementation = "eager"
    model = LowRankLlamaForCausalLM(config).eval()
    out = model(tokens(), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == config.num_hidden_layers and len(out.hidden_states) == config.num_hidden_layers + 1
    for weights in out.attentions:
        assert weights.shape == (2, config.num_attention_heads, 12, 12)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, config.num_attention_heads, 12))
        assert torch.all(weights.triu(1) == 0)  # causal


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_output_attentions_and_hidden_states_match_llama(attn):
    ours, llama = model_pair(LowRankLlamaForCausalLM, LlamaForCausalLM, attn=attn)
    ids = tokens()
    mine = ours(ids, output_attentions=True, output_hidden_states=True)
    theirs = llama(ids, output_attentions=True, output_hidden_states=True)
    assert type(mine.attentions) is type(theirs.attentions) and len(mine.attentions) == len(theirs.attentions)
    for a, b in zip(mine.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_returns_attentions_like_llama():
    ours, llama = model_pair(LowRankLlamaForCausalLM, LlamaForCausalLM)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    mine = ours.generate(tokens(length=4), pad_token_id=0, **kwargs)
    theirs = llama.generate(tokens(length=4), pad_token_id=0, **kwargs)
    assert torch.equal(mine.sequences, theirs.sequences)
    assert len(mine.attentions) == len(theirs.attentions) == 3
    for step_mine, step_theirs in zip(mine.attentions, theirs.attentions):
        assert step_mine[0] is not None
        for a, b in zip(step_mine, step_theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 3. output conventions and signatures
@pytest.mark.parametrize(
    "ours_cls, llama_cls", [(LowRankLlamaModel, LlamaModel), (LowRankLlamaForCausalLM, LlamaForCausalLM)]
)
def test_return_dict_false_gives_llamas_tuple(ours_cls, llama_cls):
    ours, llama = model_pair(ours_cls, llama_cls)
    ids = tokens()
    mine = ours(ids, return_dict=False, output_hidden_states=True)
    theirs = llama(ids, return_dict=False, output_hidden_states=True)
    assert type(mine) is tuple and len(mine) == len(theirs)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-5)


def test_position_ids_reach_the_attention_backend_as_in_llama():
    seen = {}

    def recording_attention(module, *args, name, **kwargs):
        seen[name] = kwargs.get("position_ids")
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("recording_ours", lambda *a, **kw: recording_attention(*a, name="ours", **kw))
    AttentionInterface.register("recording_llama", lambda *a, **kw: recording_attention(*a, name="llama", **kw))
    ours, llama = model_pair(LowRankLlamaForCausalLM, LlamaForCausalLM, attn="sdpa")
    ours.set_attn_implementation("recording_ours")
    llama.set_attn_implementation("recording_llama")
    # a packed batch: two sequences of 5 and 7 tokens in one row, positions restarting at the boundary
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    ids = tokens(batch=1)
    ours(ids, position_ids=position_ids), llama(ids, position_ids=position_ids)
    assert seen["ours"] is not None and torch.equal(seen["ours"], position_ids)
    assert torch.equal(seen["ours"], seen["llama"])


def _deprecation_messages(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(tokens(), **kwargs)
    return [
        str(w.message).replace(type(model).__name__, "<Model>") for w in caught if "past_key_values" in str(w.message)
    ]


@pytest.mark.parametrize(
    "ours_cls, llama_cls", [(LowRankLlamaModel, LlamaModel), (LowRankLlamaForCausalLM, LlamaForCausalLM)]
)
def test_deprecated_cache_keyword_is_accepted_with_llamas_warning(ours_cls, llama_cls):
    ours, llama = model_pair(ours_cls, llama_cls)
    from hf_lowrank.modeling_lowrank import _CACHE_FIELD

    mine, theirs = _deprecation_messages(ours, past_key_values=None), _deprecation_messages(llama, past_key_values=None)
    assert mine == theirs
    # Transformers renamed the keyword to `cache` during 5.x (after 5.17): deprecated exactly where Llama deprecates it
    assert bool(mine) == (_CACHE_FIELD == "cache")
    # and the old keyword still feeds the cache: decoding step by step matches the full forward
    ids = tokens(batch=1)
    prefix = ours(ids[:, :8], use_cache=True)
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = ours(ids[:, 8:9], past_key_values=cache, use_cache=True)
    full = ours(ids[:, :9])
    last = step.logits[:, -1] if hasattr(step, "logits") else step.last_hidden_state[:, -1]
    expected = full.logits[:, 8] if hasattr(full, "logits") else full.last_hidden_state[:, 8]
    torch.testing.assert_close(last, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 5. task heads
HEADS = [
    (LowRankLlamaForSequenceClassification, LlamaForSequenceClassification),
    (LowRankLlamaForTokenClassification, LlamaForTokenClassification),
    (LowRankLlamaForQuestionAnswering, LlamaForQuestionAnswering),
]


@pytest.mark.parametrize("ours_cls, llama_cls", HEADS)
def test_task_heads_match_llama(ours_cls, llama_cls):
    ours_config, llama_config = config_pair(num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    ours = ours_cls(ours_config).eval()
    llama = llama_cls(llama_config).eval()
    state = ours.state_dict()
    if llama_cls is LlamaForQuestionAnswering:  # Llama's QA head keeps its base model under `transformer` (BC)
        state = {k.replace("model.", "transformer.", 1): v for k, v in state.items()}
    llama.load_state_dict(state, strict=True)
    ids = tokens()
    ids[0, -3:] = 0  # right padding: the sequence head pools the last non-pad token
    mine, theirs = ours(ids), llama(ids)
    for key in ("logits", "start_logits", "end_logits"):
        if key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-5)
    assert type(ours(ids, return_dict=False)) is tuple
