"""A LLaMA-style causal language model whose projections exist only as low-rank factors.

Self-contained on purpose: this file is copied to the Hub beside the weights and must run with nothing but
torch and transformers installed (`trust_remote_code=True`). It knows nothing of how the model is trained.

Shapes in comments: B batch, T tokens, C hidden size, H heads, Hkv key/value heads, D head dim, r rank.
"""

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
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_lowrank import LowRankLlamaConfig

# The two factors of every LowRankLinear, declared once: the optimizer router, PEFT targeting, conversion
# and the tests all read this tuple. `down` maps in_features -> r, `up` maps r -> out_features.
LOWRANK_FACTOR_NAMES = ("down", "up")

# transformers renamed the KV-cache argument and output field from `past_key_values` to `cache` during 5.x;
# the GPU machines we run on have both kinds of release, so accept and return whichever this one uses.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


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


def make_projection(config: LowRankLlamaConfig, name: str, bias: bool) -> nn.Module:
    """A ``LowRankLinear`` when ``name`` is factorized by ``config``, else a dense ``nn.Linear``."""
    in_features, out_features = config.projection_shapes()[name]
    rank = config.rank_for(name)
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
    """Plain RoPE (no scaling): cos/sin tables computed on the fly from ``inv_freq``."""

    def __init__(self, config: LowRankLlamaConfig):
        super().__init__()
        self.config = config
        inv_freq = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def compute_inv_freq(config: LowRankLlamaConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # (D/2,)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in float32 even under bf16 autocast: positions times frequencies lose digits fast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(
                device=x.device, dtype=torch.float
            )  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


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
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D) broadcasts over heads
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
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, make_projection(config, name, bias=config.attention_bias))

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None, **kwargs):
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
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, make_projection(config, name, bias=config.mlp_bias))
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

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs
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
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))

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
            dense = torch.empty(module.out_features, module.in_features, device=module.up.weight.device)
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation and a growing cache do not mix
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        kwargs.pop("output_attentions", None)

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
        all_hidden_states = [] if output_hidden_states else None
        for decoder_layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            **{_CACHE_FIELD: cache},
        )


class LowRankLlamaForCausalLM(LowRankLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

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
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
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
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()


__all__ = [
    "LOWRANK_FACTOR_NAMES",
    "LowRankLinear",
    "LowRankLlamaPreTrainedModel",
    "LowRankLlamaModel",
    "LowRankLlamaForCausalLM",
    "split_truncated_svd",
]
