"""The hand-written backwards of the modeling file (RMSNorm, RoPE) against autograd of the plain composition they
replace in eager training: same values, same dtypes, up to rounding; and the plain path everywhere else."""

import pytest
import torch

from hf_lowrank import LowRankLlamaForCausalLM, preset_config
from hf_lowrank.modeling_lowrank import LowRankLlamaRMSNorm, apply_rotary_pos_emb, rotate_half

# (input dtype, weight/table dtype): fp32, bf16, and bf16 activations with fp32 weights (autocast-style)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def plain_rms_norm(norm, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden_states.to(input_dtype)


def plain_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def close(fast, reference, dtype):
    assert fast.dtype == reference.dtype
    # float32: rounding order only; bfloat16: one unit in the last place (one rounding fewer than the reference)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(fast, reference, **tolerance)


@pytest.mark.parametrize("dtype, weight_dtype", DTYPES)
def test_rms_norm_backward_matches_autograd(dtype, weight_dtype):
    norm = LowRankLlamaRMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48, generator=gen(0)))
    norm.to(weight_dtype)
    x0 = (3 * torch.randn(2, 5, 48, generator=gen(1))).to(dtype)
    results = []
    for fn in (norm, lambda x: plain_rms_norm(norm, x)):
        x = x0.clone().requires_grad_()
        norm.weight.grad = None
        y = fn(x)
        y.backward(torch.randn(y.shape, generator=gen(2)).to(y.dtype))
        results.append((y.detach(), x.grad, norm.weight.grad))
    for fast, reference in zip(*results):
        close(fast, reference, dtype)


def test_fast_paths_run_only_in_eager_training():
    norm = LowRankLlamaRMSNorm(8)
    x = torch.randn(2, 8, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "_RMSNormFunctionBackward"
    with torch.no_grad():
        assert norm(x).grad_fn is None
    frozen = LowRankLlamaRMSNorm(8).requires_grad_(False)  # e.g. LoRA fine-tuning
    frozen(x).sum().backward()  # only the input's gradient is formed
    assert x.grad.shape == (2, 8) and frozen.weight.grad is None


def _tables(batch, length, dim, dtype):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(length).float()[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)[None].expand(batch, length, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype, table_dtype", DTYPES)
def test_rope_backward_matches_autograd(dtype, table_dtype):
    batch, heads, length, dim = 2, 3, 7, 16
    cos, sin = _tables(batch, length, dim, table_dtype)
    # (B, T, H, D) transposed to (B, H, T, D), non-contiguous as in the attention layer
    q0 = torch.randn(batch, length, heads, dim, generator=gen(3)).to(dtype).transpose(1, 2)
    k0 = torch.randn(batch, length, heads, dim, generator=gen(4)).to(dtype).transpose(1, 2)
    results = []
    for fn in (apply_rotary_pos_emb, plain_rope):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        rotated_q, rotated_k = fn(q, k, cos, sin)
        grad = torch.randn(rotated_q.shape, generator=gen(5)).to(rotated_q.dtype)
        torch.autograd.backward([rotated_q, rotated_k], [grad, grad])
        results.append((rotated_q.detach(), rotated_k.detach(), q.grad, k.grad))
    for fast, reference in zip(*results):
        close(fast, reference, dtype)


def test_training_a_model_gives_the_plain_paths_gradients():
    torch.manual_seed(0)
    model = LowRankLlamaForCausalLM(preset_config("tiny"))
    batch = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen(6))
    model(input_ids=batch, labels=batch).loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    import hf_lowrank.modeling_lowrank as modeling

    original = modeling._eager_training
    modeling._eager_training = lambda *tensors: False  # force the plain compositions
    try:
        model(input_ids=batch, labels=batch).loss.backward()
    finally:
        modeling._eager_training = original
    for name, param in model.named_parameters():
        torch.testing.assert_close(fast[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
