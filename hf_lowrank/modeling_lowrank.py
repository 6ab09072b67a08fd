"""A LLaMA-style causal language model whose projections exist only as low-rank factors.

Self-contained on purpose: this file is copied to the Hub beside the weights and must run with nothing but
torch and transformers installed (`trust_remote_code=True`). It knows nothing of how the model is trained.

Shapes in comments: B batch, T tokens, C hidden size, H heads, Hkv key/value heads, D head dim, r rank.
"""

import functools
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_lowrank import ATTENTION_PROJECTIONS, LOWRANK_FACTOR_NAMES, MLP_PROJECTIONS, LowRankLlamaConfig

# transformers renamed the KV-cache argument and output field from `past_key_values` to `cache` during 5.x;
# the GPU machines we run on have both kinds of release, so accept and return whichever this one uses.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

if _CACHE_FIELD == "cache":
    # Llama's own deprecation of the old keyword: same renaming, same warning.
    _accept_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:

    def _accept_past_key_values(forward):
        """Before the rename `past_key_values` is the current name (generation and Transformers' heads pass it)."""

        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            if "past_key_values" in kwargs:
                kwargs["cache"] = kwargs.pop("past_key_values")
            return forward(*args, **kwargs)

        return wrapper


# Above this size (the smaller side of a projection) the spectral init samples its factors directly instead of taking
# the SVD of a dense draw (same distribution, see `sample_spectral_factors`); at or below it the exact path runs, so
# small models keep the factors they always had at a given seed.
SPECTRAL_INIT_EXACT_MAX_DIM = 512


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a linear map of rank ``r`` stored as two thin ``nn.Linear`` factors.

    ``down.weight`` is (r, in_features) and ``up.weight`` is (out_features, r); there is no nonlinearity
    between them, so the layer equals a dense ``nn.Linear`` with weight ``up.weight @ down.weight``.
    Only ``up`` may carry a bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if not 0 < rank < min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(in_features, out_features) - 1] = [1, {min(in_features, out_features) - 1}], "
                f"got {rank}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        for factor in (self.down, self.up):
            factor._is_lowrank_factor = True  # initialized jointly by the model's `_init_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., r) -> (..., out)

    def factors(self) -> tuple[nn.Linear, nn.Linear]:
        """``(down, up)`` in the order of ``LOWRANK_FACTOR_NAMES``."""
        return tuple(getattr(self, name) for name in LOWRANK_FACTOR_NAMES)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight ``up @ down`` of shape (out_features, in_features)."""
        return self.up.weight @ self.down.weight

    @torch.no_grad()
    def set_from_dense(self, weight: torch.Tensor) -> None:
        """Set the factors to the best rank-r approximation of ``weight`` (truncated SVD, split as U√S, √S Vᵀ)."""
        up, down = split_truncated_svd(weight, self.rank)
        self.up.weight.copy_(up)
        self.down.weight.copy_(down)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """Factorize an existing ``nn.Linear`` by truncated SVD; its bias (if any) moves to ``up``."""
        weight = linear.weight
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        module.set_from_dense(weight)
        if linear.bias is not None:
            with torch.no_grad():
                module.up.bias.copy_(linear.bias)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@torch.no_grad()
def split_truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(up, down)`` with ``up @ down`` the best rank-``rank`` approximation of ``weight`` (out, in).

    The singular values are split evenly (``U√S``, ``√S Vᵀ``) so both factors have the same spectral norm.
    The SVD runs in float32 whatever the weight's dtype.
    """
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root  # (out, r)
    down = root[:, None] * vh[:rank]  # (r, in)
    return up.to(weight.dtype), down.to(weight.dtype)


@torch.no_grad()
def sample_spectral_factors(
    out_features: int, in_features: int, rank: int, std: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` distributed as ``split_truncated_svd(N(0, std²) matrix of shape (out, in), rank)``, in float32.

    No dense matrix is drawn or factorized. A Gaussian matrix ``G = U S Vᵀ`` is orthogonally invariant, so its
    singular vectors ``U``, ``V`` are Haar-distributed and independent of its singular values ``S``; the top-r part
    is therefore sampled piece by piece:

    * ``U_r``, ``V_r``: the Q factor (with positive ``diag(R)``, which makes it Haar) of an (n, r) Gaussian, by
      Cholesky-QR run twice: matrix products instead of Householder QR;
    * ``S_r``: the top r singular values of the Golub-Kahan bidiagonal with independent χ entries, which has the
      singular values of ``G`` in distribution (Dumitriu & Edelman 2002): eigenvalues of an (n, n) tridiagonal,
      n = min(out, in), instead of an SVD of the whole (out, in) matrix with its vectors.

    Costs O(min³ + (out + in)·r²) with a small constant (values only, of a smaller matrix) instead of a full SVD's
    O(out·in·min): a 1b-preset MLP projection (2048 -> 5461, r = 512) takes ~0.3 s instead of ~5 s on one CPU core.
    """
    long_side, short_side = max(out_features, in_features), min(out_features, in_features)
    chi = lambda df: torch.distributions.Chi2(df).sample().sqrt()  # noqa: E731
    diagonal = chi(torch.arange(long_side, long_side - short_side, -1, dtype=torch.float32, device=device))  # (n,)
    superdiagonal = chi(torch.arange(short_side - 1, 0, -1, dtype=torch.float32, device=device))  # (n-1,)
    # Bᵀ B of the upper bidiagonal B: its eigenvalues are the squared singular values.
    gram = torch.diag(diagonal.square())
    gram[1:, 1:] += torch.diag(superdiagonal.square())
    coupling = diagonal[:-1] * superdiagonal
    gram += torch.diag(coupling, 1) + torch.diag(coupling, -1)
    singular_values = torch.linalg.eigvalsh(gram)[-rank:].flip(0).clamp_min(0).sqrt() * std  # (r,), descending
    root = singular_values.sqrt()
    up = _haar_frame(out_features, rank, device) * root  # (out, r)
    down = root[:, None] * _haar_frame(in_features, rank, device).T  # (r, in)
    return up, down


def _haar_frame(rows: int, rank: int, device=None) -> torch.Tensor:
    """A Haar-distributed (rows, rank) matrix with orthonormal columns: Q of ``X = QR`` with ``X`` Gaussian, ``R > 0``
    on its diagonal. Cholesky-QR twice (the second pass restores orthogonality lost to rounding; a Gaussian X is
    well conditioned); each pass keeps R upper triangular with a positive diagonal, so Q stays that QR's factor."""
    frame = torch.randn(rows, rank, device=device)
    for _ in range(2):
        lower = torch.linalg.cholesky(frame.T @ frame)  # Rᵀ
        frame = torch.linalg.solve_triangular(lower, frame.T, upper=False).T  # X R⁻¹
    return frame


def make_projection(config: LowRankLlamaConfig, name: str) -> nn.Module:
    """A ``LowRankLinear`` when ``name`` is factorized by ``config``, else a dense ``nn.Linear``."""
    in_features, out_features = config.projection_shapes()[name]
    rank, bias = config.rank_for(name), config.projection_bias(name)
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return LowRankLinear(in_features, out_features, rank, bias=bias)


def _eager_training(*tensors: torch.Tensor) -> bool:
    """Whether a hand-written backward pays: autograd is recording and torch.compile is not tracing."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not (hasattr(torch, "compiler") and torch.compiler.is_compiling())
    )


class _RMSNormFunction(torch.autograd.Function):
    """Llama's RMSNorm, ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, with a hand-written backward.

    Autograd of the composed forward runs ~20 elementwise passes over (B, T, C) and keeps several of them alive;
    this runs 9 and keeps only ``x`` and the (B, T, 1) ``rstd``: 2x faster forward + backward on CPU, and at 1024
    wide the norms were a third of what keeps factorized training from its FLOP-ideal speedup
    (docs/benchmarks.md). Same dtypes as autograd of the composed forward; the statistics in float32.
    """

    @staticmethod
    def forward(ctx, hidden_states, weight, eps):
        x = hidden_states.float()
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])  # (..., 1)
        rstd = mean_square.add_(eps).rsqrt_()
        ctx.save_for_backward(hidden_states, weight, rstd)
        return weight * (x * rstd).to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, weight, rstd = ctx.saved_tensors
        normalized = hidden_states.float() * rstd  # x̂, recomputed instead of stored
        grad_input = grad_weight = None
        if ctx.needs_input_grad[1]:
            batch_dims = tuple(range(grad_output.dim() - 1))
            grad_weight = (grad_output * normalized.to(hidden_states.dtype)).sum(batch_dims).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_normalized = (grad_output * weight).to(hidden_states.dtype).float()
            projection = (grad_normalized * normalized).mean(-1, keepdim=True)  # (..., 1)
            # d x̂ / d x applied to g: rstd · (g − x̂ · mean(g ⊙ x̂))
            grad_input = torch.addcmul(grad_normalized, normalized, projection, value=-1).mul_(rstd)
            grad_input = grad_input.to(hidden_states.dtype)
        return grad_input, grad_weight, None


class LowRankLlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _eager_training(hidden_states, self.weight):
            return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
        # Inference (generation, export) and torch.compile (whose fusion of the plain ops is better still).
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LowRankLlamaRotaryEmbedding(nn.Module):
    """Llama's rotary embedding: every RoPE type of Transformers' RoPE init functions (``rope_parameters``), the
    dynamic ones updated on the fly by ``dynamic_rope_update``; cos/sin tables computed from ``inv_freq``."""

    inv_freq: torch.Tensor  # (rotary_dim/2,)

    def __init__(self, config: LowRankLlamaConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = self.compute_rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @classmethod
    def compute_rope_parameters(cls, config: LowRankLlamaConfig) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_scaling)`` of the config's RoPE type."""
        rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = cls.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        return rope_init_fn(config)

    @staticmethod
    def compute_default_rope_parameters(config: LowRankLlamaConfig, device=None, seq_len=None, layer_type=None):
        """Plain RoPE over the leading ``partial_rotary_factor`` of each head (all of it by default)."""
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # dynamic / longrope types recompute `inv_freq` from the positions seen
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 even under bf16 autocast: positions times frequencies lose digits fast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(
                device=x.device, dtype=torch.float
            )  # (B, T, rotary_dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
            cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
            return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RotaryFunction(torch.autograd.Function):
    """``x·cos + rotate_half(x)·sin`` written half by half into one output, and its backward (the rotation by
    −θ) the same way: 4 passes over half of x instead of 5 over all of it, each way. Relies on RoPE's tables
    repeating their angles (``cat((freqs, freqs))``), so only their first half is read."""

    @staticmethod
    def forward(ctx, x, cos, sin):  # x (B, H, T, D); cos, sin (B, 1, T, D)
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = x.dtype
        return _rotate(x, cos, sin, sign=1, dtype=torch.promote_types(x.dtype, cos.dtype))  # dtype as x * cos

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_output, cos, sin, sign=-1, dtype=ctx.input_dtype), None, None


def _rotate(x, cos, sin, sign, dtype):
    """Rotate the pairs (x₁, x₂) of ``x`` by ``sign``·θ: (x₁c − s x₂, x₂c + s x₁) with s = sign·sin."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin, value=sign)
    return out


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate q (B, H, T, D) and k (B, Hkv, T, D) by the tables (B, T, rotary_dim). With partial rotary
    (rotary_dim < D) the leading rotary_dim channels turn and the rest pass through, as in GPT-NeoX."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim) broadcasts over heads
    rotary_dim = cos.shape[-1]
    if rotary_dim < q.shape[-1]:
        q_rot, k_rot = _rotate_both(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
        return torch.cat((q_rot, q[..., rotary_dim:]), dim=-1), torch.cat((k_rot, k[..., rotary_dim:]), dim=-1)
    return _rotate_both(q, k, cos, sin)


def _rotate_both(q, k, cos, sin):
    if _eager_training(q, k):
        return _RotaryFunction.apply(q, cos, sin), _RotaryFunction.apply(k, cos, sin)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D)."""
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # (B, T, H, D)
    return attn_output, attn_weights


class LowRankLlamaAttention(nn.Module):
    """Grouped-query attention; q/k/v/o are factorized or dense as the config says."""

    def __init__(self, config: LowRankLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        for name in ATTENTION_PROJECTIONS:
            setattr(self, name, make_projection(config, name))

    @_accept_past_key_values
    def forward(
        self,
        hidden_states,
        position_embeddings,
        attention_mask=None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, D)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, H*D)
        return self.o_proj(attn_output), attn_weights


class LowRankLlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LowRankLlamaConfig):
        super().__init__()
        for name in MLP_PROJECTIONS:
            setattr(self, name, make_projection(config, name))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LowRankLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LowRankLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LowRankLlamaAttention(config, layer_idx)
        self.mlp = LowRankLlamaMLP(config)
        self.input_layernorm = LowRankLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LowRankLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @_accept_past_key_values
    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        # position_ids travel on to the attention backend, which uses them for padding-free (packed) batches.
        hidden_states, _ = self.self_attn(
            hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class LowRankLlamaPreTrainedModel(PreTrainedModel):
    config_class = LowRankLlamaConfig
    config: LowRankLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LowRankLlamaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Transformers' output capture (as Llama): hidden states are the decoder layers' outputs, attention weights the
    # second output of each attention module.
    _can_record_outputs = {
        "hidden_states": LowRankLlamaDecoderLayer,
        "attentions": LowRankLlamaAttention,
    }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Transformers' ``save_pretrained``; when the code is saved beside the weights, ``auto_map`` lists every
        class of ``AUTO_CLASSES``, not only the saved class's own Auto class, so remote code loads the folder as
        any of them (``AutoModel`` for feature extraction, a task head, ...). The config is first given the ranks the
        factors actually have (`sync_factor_ranks`), so a folder the model saved always loads."""
        self.sync_factor_ranks()
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            config_module = type(self.config).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoConfig", f"{config_module}.{type(self.config).__name__}")
            auto_map.update({auto: f"{module}.{name}" for auto, name in AUTO_CLASSES.items()})
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def sync_factor_ranks(self) -> None:
        """Write the ranks the factors hold into ``config.rank_overrides`` where they differ from the config's.

        A LoRA merge into a whole projection (PEFT's own ``merge_and_unload``) grows its rank from r to r + k; saved
        with the old ranks in ``config.json``, the folder would not load (size mismatch). Raises ``ValueError``,
        before anything is written, when one projection has different ranks in different layers (the config holds
        one rank per projection name) or a rank that is no longer a factorization."""
        ranks: dict[str, dict[str, int]] = {}
        for name, module in self.named_modules():
            if isinstance(module, LowRankLinear):
                rank = module.down.weight.shape[0]
                if rank >= min(module.in_features, module.out_features):
                    raise ValueError(
                        f"{name} holds factors of rank {rank} >= min(in, out) = "
                        f"{min(module.in_features, module.out_features)}: no longer a factorization, so it cannot be "
                        "saved as one. Merge a smaller LoRA r, or save the dense model (`hf-lowrank convert --to_dense`)."
                    )
                ranks.setdefault(name.rsplit(".", 1)[-1], {})[name] = rank
        for projection, per_layer in ranks.items():
            if len(set(per_layer.values())) > 1:
                raise ValueError(
                    f"The {projection} layers hold factors of different ranks ({per_layer}); the config holds one rank "
                    f"per projection name, so the model cannot be saved and reloaded. Give every layer's {projection} "
                    "the same rank (e.g. the same LoRA r on every layer before merging)."
                )
        for projection, per_layer in ranks.items():
            rank = next(iter(per_layer.values()))
            if rank != self.config.rank_for(projection):
                self.config.rank_overrides = {**self.config.rank_overrides, projection: rank}

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialize every parameter and buffer; tensors already loaded from a checkpoint are left alone.

        Factor ``nn.Linear``s are skipped in the generic branch and set jointly by their ``LowRankLinear``
        (spectral init needs both at once).
        """
        std = self.config.initializer_range
        if isinstance(module, LowRankLinear):
            self._init_factors(module, std)
        elif isinstance(module, nn.Linear):
            if getattr(module, "_is_lowrank_factor", False):
                return
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LowRankLlamaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LowRankLlamaRotaryEmbedding):
            inv_freq, _ = module.compute_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)

    def _initialize_weights(self, module, *args, **kwargs):
        # transformers skips, in custom code, modules whose own (non-recursive) parameters are all loaded, and a
        # LowRankLinear owns none; route it to `_init_weights` directly, which checks its factors' flags itself.
        if isinstance(module, LowRankLinear):
            if not getattr(module, "_is_hf_initialized", False):
                self._init_weights(module)
                module._is_hf_initialized = True
            return
        super()._initialize_weights(module, *args, **kwargs)

    def _init_factors(self, module: LowRankLinear, std: float):
        if module.up.bias is not None:
            init.zeros_(module.up.bias)
        if getattr(module.up.weight, "_is_hf_initialized", False) and getattr(
            module.down.weight, "_is_hf_initialized", False
        ):
            return
        if module.up.weight.device.type == "meta":
            return
        if self.config.lowrank_init == "spectral":
            # The best rank-r approximation of the dense init this layer would have had.
            device = module.up.weight.device
            if min(module.in_features, module.out_features) > SPECTRAL_INIT_EXACT_MAX_DIM:
                up, down = sample_spectral_factors(module.out_features, module.in_features, module.rank, std, device)
            else:
                dense = torch.empty(module.out_features, module.in_features, device=device)
                dense.normal_(mean=0.0, std=std)
                up, down = split_truncated_svd(dense, module.rank)
            init.copy_(module.up.weight, up.to(module.up.weight.dtype))
            init.copy_(module.down.weight, down.to(module.down.weight.dtype))
        else:
            # Entries of up @ down then have variance r * (std / sqrt(r))^2 = std^2, like the dense init.
            factor_std = math.sqrt(std / math.sqrt(module.rank))
            init.normal_(module.up.weight, mean=0.0, std=factor_std)
            init.normal_(module.down.weight, mean=0.0, std=factor_std)


class LowRankLlamaModel(LowRankLlamaPreTrainedModel):
    def __init__(self, config: LowRankLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LowRankLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LowRankLlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LowRankLlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @_accept_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen  # (1, T)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{_MASK_CACHE_ARG: cache},
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache})


class LowRankLlamaForCausalLM(LowRankLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}  # Llama's: vocab-sharded head, logits gathered

    def __init__(self, config: LowRankLlamaConfig):
        super().__init__(config)
        self.model = LowRankLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @_accept_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        # Generation needs logits of the last position only; computing all T of them wastes a (T, vocab) matmul.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])  # (B, T', vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )


# Llama's task heads: Transformers' generic heads (forward, pooling, losses) over this base model. Each builds its
# base model directly instead of through `AutoModel.from_config` as the generic `__init__` does: under remote code
# nothing registers this config with `AutoModel`, and that call would ask for `trust_remote_code` again.
class LowRankLlamaForSequenceClassification(GenericForSequenceClassification, LowRankLlamaPreTrainedModel):
    def __init__(self, config: LowRankLlamaConfig):
        LowRankLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LowRankLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class LowRankLlamaForTokenClassification(GenericForTokenClassification, LowRankLlamaPreTrainedModel):
    def __init__(self, config: LowRankLlamaConfig):
        LowRankLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = LowRankLlamaModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)  # the generic head's default
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class LowRankLlamaForQuestionAnswering(GenericForQuestionAnswering, LowRankLlamaPreTrainedModel):
    def __init__(self, config: LowRankLlamaConfig):
        LowRankLlamaPreTrainedModel.__init__(self, config)
        self.model = LowRankLlamaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


# Auto class -> class of this file, declared once: the package registers each (hf_lowrank/__init__.py) and every
# saved folder's `auto_map` lists each (`save_pretrained` above), so remote code loads any of them.
AUTO_CLASSES = {
    "AutoModel": "LowRankLlamaModel",
    "AutoModelForCausalLM": "LowRankLlamaForCausalLM",
    "AutoModelForSequenceClassification": "LowRankLlamaForSequenceClassification",
    "AutoModelForTokenClassification": "LowRankLlamaForTokenClassification",
    "AutoModelForQuestionAnswering": "LowRankLlamaForQuestionAnswering",
}

# `Trainer` shifts labels for label smoothing (and the text-generation pipeline accepts a model) only when the model's
# class *name* is in this table of Transformers' own causal LMs; `AutoModelForCausalLM.register` does not add it.
# Done here rather than in the package's `__init__` because remote-code users, who never import the package, run the
# stock `Trainer` too: importing this file, as every load does, is the one step all users share. The name is added
# once, only if its model type is free, and the lazy Auto mappings skip it (the type is not in Transformers' configs).
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(LowRankLlamaConfig.model_type, LowRankLlamaForCausalLM.__name__)


__all__ = [
    "AUTO_CLASSES",
    "LOWRANK_FACTOR_NAMES",
    "LowRankLinear",
    "LowRankLlamaPreTrainedModel",
    "LowRankLlamaModel",
    "LowRankLlamaForCausalLM",
    "LowRankLlamaForSequenceClassification",
    "LowRankLlamaForTokenClassification",
    "LowRankLlamaForQuestionAnswering",
    "sample_spectral_factors",
    "split_truncated_svd",
]
