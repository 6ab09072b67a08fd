"""Configuration of the natively factorized LLaMA-style model.

This file is copied to the Hub next to the weights: it imports only ``transformers``.
"""

import math

from transformers import PretrainedConfig

# The seven LLaMA projections, in Llama's names. Any subset of them can be factorized.
LOWRANK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LOWRANK_INITS = ("spectral", "normal")


class LowRankLlamaConfig(PretrainedConfig):
    r"""Configuration of [`LowRankLlamaModel`]: Llama's fields plus the factorization.

    Every projection named in ``lowrank_modules`` is stored only as two factors ``W = up @ down`` with
    ``up`` of shape (out, r) and ``down`` of shape (r, in); nothing dense exists at any time.

    Args:
        vocab_size: size of the token vocabulary.
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); defaults to ``num_attention_heads``.
        head_dim: per-head width; defaults to ``hidden_size // num_attention_heads``.
        hidden_act: MLP activation (SwiGLU uses ``"silu"``).
        max_position_embeddings: longest sequence the model is meant for (RoPE has no hard limit).
        initializer_range: std of the dense normal init that factors and embeddings are derived from.
        rms_norm_eps: epsilon of RMSNorm.
        use_cache: whether ``forward`` returns a KV cache by default.
        tie_word_embeddings: share the token embedding with the LM head.
        rope_theta: RoPE base frequency.
        attention_bias / mlp_bias: biases on the projections (Llama has none).
        attention_dropout: dropout on attention probabilities.
        rank_ratio: each factorized projection gets rank ``max(1, floor(rank_ratio * min(in, out)))``.
        rank: an absolute rank for every factorized projection; overrides ``rank_ratio``.
        rank_overrides: ``{projection name: rank}``, e.g. ``{"down_proj": 256}``; overrides both above.
        lowrank_modules: which projections are factorized; ``[]`` gives the dense baseline built by the
            same code.
        lowrank_init: ``"spectral"`` (default): draw the dense init ``N(0, initializer_range²)``, keep its
            top-r SVD and split it as ``U√S``, ``√S Vᵀ``. The factors start balanced (equal spectral
            norms), which is what Spectron's step size ``lr / (σ_up + σ_down + 1)`` assumes, and the
            product is the best rank-r approximation of a standard init. ``"normal"``: i.i.d. normal
            factors with std ``sqrt(initializer_range / sqrt(r))`` each, so that entries of the product
            have the dense init's variance; cheaper for very large models.
    """

    model_type = "lowrank_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 1376,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 256,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        rank_ratio: float = 0.25,
        rank: int | None = None,
        rank_overrides: dict[str, int] | None = None,
        lowrank_modules: list[str] | tuple[str, ...] | None = None,
        lowrank_init: str = "spectral",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if head_dim is None and isinstance(num_attention_heads, int) and num_attention_heads > 0:
            if hidden_size % num_attention_heads:
                raise ValueError(
                    f"`hidden_size` ({hidden_size}) is not divisible by `num_attention_heads` "
                    f"({num_attention_heads}); pick a head count that divides it or set `head_dim` explicitly."
                )
            head_dim = hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = float(rope_theta)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.rank_ratio = float(rank_ratio)
        self.rank = rank
        self.rank_overrides = dict(rank_overrides or {})
        self.lowrank_modules = list(LOWRANK_PROJECTIONS if lowrank_modules is None else lowrank_modules)
        self.lowrank_init = lowrank_init
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._validate_lowrank()

    # ------------------------------------------------------------------ shapes and ranks
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (in_features, out_features)}`` for one decoder layer."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        h, m = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (q_out, h),
            "gate_proj": (h, m),
            "up_proj": (h, m),
            "down_proj": (m, h),
        }

    def rank_for(self, projection: str) -> int | None:
        """The rank of ``projection``, or ``None`` when it stays dense."""
        if projection not in self.lowrank_modules:
            return None
        if projection in self.rank_overrides:
            return int(self.rank_overrides[projection])
        if self.rank is not None:
            return int(self.rank)
        in_features, out_features = self.projection_shapes()[projection]
        return max(1, math.floor(self.rank_ratio * min(in_features, out_features)))

    @property
    def is_dense(self) -> bool:
        return len(self.lowrank_modules) == 0

    # ------------------------------------------------------------------ validation
    def _validate_lowrank(self):
        """Refuse impossible shapes with a message that says what to change (R14)."""
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None or self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be a positive even integer (RoPE rotates pairs), got {self.head_dim}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}) for grouped-query attention."
            )
        unknown = [m for m in self.lowrank_modules if m not in LOWRANK_PROJECTIONS]
        if unknown:
            raise ValueError(f"Unknown `lowrank_modules` {unknown}; choose from {list(LOWRANK_PROJECTIONS)}.")
        if len(set(self.lowrank_modules)) != len(self.lowrank_modules):
            raise ValueError(f"`lowrank_modules` lists a projection twice: {self.lowrank_modules}.")
        if self.lowrank_init not in LOWRANK_INITS:
            raise ValueError(f"Unknown `lowrank_init` {self.lowrank_init!r}; choose from {list(LOWRANK_INITS)}.")
        if not 0.0 < self.rank_ratio < 1.0:
            raise ValueError(
                f"`rank_ratio` must be in (0, 1), got {self.rank_ratio}; a ratio of 1 or more is no "
                "compression (use `lowrank_modules=[]` for the dense model)."
            )
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"`rank` must be a positive integer or None, got {self.rank!r}.")
        bad_keys = [k for k in self.rank_overrides if k not in self.lowrank_modules]
        if bad_keys:
            raise ValueError(
                f"`rank_overrides` names {bad_keys}, which are not factorized; "
                f"its keys must be among `lowrank_modules` = {self.lowrank_modules}."
            )
        for projection in self.lowrank_modules:
            r = self.rank_for(projection)
            in_features, out_features = self.projection_shapes()[projection]
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"The rank of `{projection}` must be a positive integer, got {r!r}.")
            if r >= min(in_features, out_features):
                raise ValueError(
                    f"The rank of `{projection}` ({r}) must be smaller than min(in, out) = "
                    f"{min(in_features, out_features)} ({in_features} -> {out_features}), or factorizing it saves "
                    f"nothing; lower `rank`/`rank_ratio`/`rank_overrides` or drop `{projection}` from "
                    "`lowrank_modules`."
                )


__all__ = ["LowRankLlamaConfig", "LOWRANK_PROJECTIONS", "LOWRANK_INITS"]
