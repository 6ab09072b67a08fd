"""Configuration of the natively factorized LLaMA-style model.

This file is copied to the Hub next to the weights: it imports only ``transformers``.
"""

import math
import re
from dataclasses import dataclass

import transformers

# The oldest Transformers this code runs on (the lowest version CI tests, .ci/constraints-lowest.txt). Checked here,
# at import, because this file is what `trust_remote_code=True` loads first: an older Transformers would otherwise
# fail later with an unrelated AttributeError (4.57: `'LowRankLlamaConfig' object has no attribute 'validate_rope'`).
MIN_TRANSFORMERS_VERSION = "5.17.0"


def _release(version: str) -> tuple[int, ...]:
    """``"5.18.0.dev0"`` -> ``(5, 18, 0)``: the release numbers, enough to compare with a minimum."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


if _release(transformers.__version__) < _release(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"The lowrank_llama model code needs transformers >= {MIN_TRANSFORMERS_VERSION}; found "
        f"{transformers.__version__}. Upgrade: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )

from transformers import PretrainedConfig  # noqa: E402 - after the version check, which must run first
from transformers.activations import ACT2FN  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# The geometry of the model, declared once: the projection names, the factor names, the long-dimension rule (below)
# and the shapes, ranks and parameter counts (`LowRankLlamaConfig`, `count_parameters`). Every other module derives
# its names, shapes and counts from these.

# The seven LLaMA projections, in Llama's names and module order. Any subset of them can be factorized.
LOWRANK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = LOWRANK_PROJECTIONS[:4]  # children of `self_attn`
MLP_PROJECTIONS = LOWRANK_PROJECTIONS[4:]  # children of `mlp`
# The two factors of every factorized projection, in forward order: `down` maps in_features -> r, `up` maps
# r -> out_features. The model, the optimizer router, PEFT targeting, FSDP placement and conversion read these.
LOWRANK_FACTOR_NAMES = ("down", "up")
DOWN_FACTOR, UP_FACTOR = LOWRANK_FACTOR_NAMES
LOWRANK_INITS = ("spectral", "normal")
# How Llama splits each projection under tensor parallelism: "colwise" shards the output features, "rowwise" the
# input features (its output is all-reduced). Llama's own `base_model_tp_plan`.
TP_STYLES = {
    "q_proj": "colwise",
    "k_proj": "colwise",
    "v_proj": "colwise",
    "o_proj": "rowwise",
    "gate_proj": "colwise",
    "up_proj": "colwise",
    "down_proj": "rowwise",
}


def factor_weight_name(projection_path: str, factor: str) -> str:
    """The parameter name of one factor's weight: ``("model.layers.0.self_attn.q_proj", "up")`` ->
    ``"model.layers.0.self_attn.q_proj.up.weight"``."""
    assert factor in LOWRANK_FACTOR_NAMES, factor
    return f"{projection_path}.{factor}.weight"


def long_dim(shape) -> int:
    """The long dimension (0 or 1) of a 2-D factor of shape ``(rows, cols)``; a square one counts as tall (0).

    The one orientation rule of the project: Spectron works on each factor's tall view (long × r), and FSDP2 shards
    each factor along this dimension, so that every shard holds whole rows of that view.
    """
    rows, cols = shape
    return 1 if rows < cols else 0


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
        rope_parameters: Llama's RoPE settings, e.g. ``{"rope_type": "linear", "factor": 4.0}``; any type among
            Transformers' RoPE init functions (linear, dynamic, yarn, longrope, llama3, ...) and
            ``partial_rotary_factor`` (the leading fraction of each head that is rotated, the rest passes through).
            ``rope_theta`` and ``partial_rotary_factor`` given on their own (older configs) move into it.
        rope_theta: RoPE base frequency, when ``rope_parameters`` does not give one.
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
            product is the best rank-r approximation of a standard init. Projections over 512 on their short
            side sample these factors from the same distribution without the dense draw or its SVD (see
            ``sample_spectral_factors``). ``"normal"``: i.i.d. normal factors with std
            ``sqrt(initializer_range / sqrt(r))`` each, so that entries of the product have the dense init's
            variance; cheaper for very large models.
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
        rope_parameters: dict | None = None,
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
        # Standardized by `PretrainedConfig.__init__` (Llama's format): `rope_theta` and the rope type go inside.
        self.rope_parameters = dict(rope_parameters) if rope_parameters else None
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.rank_ratio = float(rank_ratio)
        self.rank = rank
        self.rank_overrides = dict(rank_overrides or {})
        self.lowrank_modules = list(LOWRANK_PROJECTIONS if lowrank_modules is None else lowrank_modules)
        self.lowrank_init = lowrank_init
        # Per instance: which factor of a projection is sharded depends on which projections are factorized.
        self.base_model_tp_plan = self.tensor_parallel_plan()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            rope_theta=float(kwargs.pop("rope_theta", rope_theta)),
            **kwargs,
        )
        self._validate_lowrank()
        self._validate_rope()

    @property
    def rope_theta(self) -> float:
        """The RoPE base, kept in ``rope_parameters`` (Llama's place for it); this alias serves older readers."""
        return (getattr(self, "rope_parameters", None) or {}).get("rope_theta")

    @rope_theta.setter
    def rope_theta(self, value: float):
        if getattr(self, "rope_parameters", None) is not None:  # before standardization, __init__ handles it
            self.rope_parameters["rope_theta"] = float(value)

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

    def projection_bias(self, projection: str) -> bool:
        """Whether ``projection`` carries a bias: Llama's ``attention_bias`` for q/k/v/o, ``mlp_bias`` for the MLP."""
        return bool(self.attention_bias if projection in ATTENTION_PROJECTIONS else self.mlp_bias)

    def projection_parameters(self, projection: str, *, dense: bool = False, bias: bool = True) -> int:
        """Parameters of ``projection`` in one layer: ``r·(in + out)`` when factorized, ``in·out`` when dense (or with
        ``dense=True``: the dense counterpart), plus ``out`` for its bias unless ``bias=False``. Its forward pass
        costs twice its weight parameters in flops per token."""
        in_features, out_features = self.projection_shapes()[projection]
        rank = None if dense else self.rank_for(projection)
        weights = in_features * out_features if rank is None else rank * (in_features + out_features)
        return weights + (out_features if bias and self.projection_bias(projection) else 0)

    @property
    def is_dense(self) -> bool:
        return len(self.lowrank_modules) == 0

    def tensor_parallel_plan(self) -> dict[str, str]:
        """Tensor-parallel plan of the base model, in Transformers' ``base_model_tp_plan`` format.

        A dense projection takes Llama's style. A factorized one (``W = up @ down``) shards one factor and
        replicates the other, so no rank-r activation is ever split: column-parallel shards ``up`` by rows
        (output features; ``down`` replicated, its r-vector computed whole on every rank); row-parallel shards
        ``down`` by columns (input features; the partial r-vectors are all-reduced, then ``up`` runs replicated).
        Factors left out of the plan are replicated.
        """
        plan = {}
        for name, style in TP_STYLES.items():
            parent = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
            key = f"layers.*.{parent}.{name}"
            if name not in self.lowrank_modules:
                plan[key] = style
            elif style == "colwise":
                plan[f"{key}.{UP_FACTOR}"] = "colwise"
            else:
                plan[f"{key}.{DOWN_FACTOR}"] = "rowwise"
        return plan

    # ------------------------------------------------------------------ validation
    def _validate_rope(self):
        """Refuse RoPE settings the model cannot honour instead of running plain RoPE in their place."""
        self.validate_rope()  # Transformers' checks of each type's required keys
        rope = self.rope_parameters
        rope_type = rope["rope_type"]
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"Unsupported `rope_parameters['rope_type']` {rope_type!r}; choose 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )
        unsupported = sorted({"mrope_section", "mrope_interleaved"} & set(rope))
        if unsupported:
            raise ValueError(f"`rope_parameters` {unsupported} (multimodal RoPE) is not supported by this model.")
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"`rope_theta` must be a finite number > 0 (the RoPE base, e.g. 10000.0), got {theta!r}.")
        partial = rope.get("partial_rotary_factor", 1.0)
        if not (isinstance(partial, (int, float)) and 0.0 < partial <= 1.0) or int(self.head_dim * partial) < 2:
            raise ValueError(
                f"`partial_rotary_factor` must be in (0, 1] and rotate at least 2 of the {self.head_dim} channels "
                f"of a head, got {partial!r}."
            )

    def _validate_lowrank(self):
        """Refuse impossible shapes with a message that says what to change (R14)."""
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in positive.items():
            # bool is an int subclass: `num_hidden_layers=true` must not mean one layer.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"Unknown `hidden_act` {self.hidden_act!r}; choose one of {sorted(ACT2FN)} (Llama: 'silu')."
            )
        for name, low in (("rms_norm_eps", "> 0"), ("initializer_range", ">= 0"), ("attention_dropout", ">= 0")):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0 or (low == "> 0" and value == 0):
                raise ValueError(f"`{name}` must be a finite number {low}, got {value!r}.")
        if self.attention_dropout >= 1:
            raise ValueError(f"`attention_dropout` must be < 1 (a probability), got {self.attention_dropout}.")
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


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a config, split by role, computed from the config alone (no model is built)."""

    embeddings: int  # token embedding + LM head (once if tied)
    projections: int  # the seven projections of every layer, factorized or dense
    norms: int
    dense_projections: int  # what the projections would hold if dense

    @property
    def total(self) -> int:
        return self.embeddings + self.projections + self.norms

    @property
    def dense_total(self) -> int:
        return self.embeddings + self.dense_projections + self.norms

    @property
    def compression(self) -> float:
        """Total parameters relative to the dense counterpart (1.0 = no saving)."""
        return self.total / self.dense_total


def count_parameters(config: LowRankLlamaConfig) -> ParameterCount:
    """The parameters of the model ``config`` describes, by role, and of its dense counterpart."""
    embed = config.vocab_size * config.hidden_size
    embeddings = embed if config.tie_word_embeddings else 2 * embed
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size  # two RMSNorms per layer + the final one
    projections = sum(config.projection_parameters(name) for name in LOWRANK_PROJECTIONS)
    dense = sum(config.projection_parameters(name, dense=True) for name in LOWRANK_PROJECTIONS)
    layers = config.num_hidden_layers
    return ParameterCount(embeddings, projections * layers, norms, dense * layers)


__all__ = [
    "ATTENTION_PROJECTIONS",
    "LOWRANK_FACTOR_NAMES",
    "LOWRANK_INITS",
    "LOWRANK_PROJECTIONS",
    "MLP_PROJECTIONS",
    "TP_STYLES",
    "LowRankLlamaConfig",
    "ParameterCount",
    "count_parameters",
    "factor_weight_name",
    "long_dim",
]
