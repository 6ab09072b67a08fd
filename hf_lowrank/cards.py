"""Model cards for published checkpoints: Hub metadata, architecture table, training summary, usage, citation.

The card is rendered offline from what the output folder holds (``config.json`` always; ``training_summary.json``,
``eval_results.json`` and ``*.png`` plots when the training and evaluation jobs wrote them) and validated before
anything is uploaded.
"""

import json
import math
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from .configuration_lowrank import LOWRANK_PROJECTIONS, LowRankLlamaConfig, count_parameters
from .files import EVAL_RESULTS_NAME, TOKENIZER_FILES, TRAINING_SUMMARY_NAME

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

# Written by the training job beside the weights (optional, like training_summary.json and eval_results.json).
CURVES_PLOT = "training_curves.png"

# Metadata every published card carries; `validate_model_card` refuses a card without it.
REQUIRED_TAGS = ("low-rank", "spectron", "lowrank_llama", "custom_code")
REQUIRED_METADATA = {"license": None, "library_name": "transformers", "pipeline_tag": "text-generation"}

PROJECT_URL = "https://pypi.org/project/hf-lowrank/"
ARXIV_ID = "2602.12429"
CITATION = f"""@inproceedings{{janson2026spectron,
  title         = {{Stabilizing Native Low-Rank {{LLM}} Pretraining}},
  author        = {{Janson and Oyallon and Belilovsky}},
  booktitle     = {{International Conference on Machine Learning (ICML)}},
  year          = {{2026}},
  eprint        = {{{ARXIV_ID}}},
  archivePrefix = {{arXiv}},
  url           = {{https://arxiv.org/abs/{ARXIV_ID}}}
}}"""

_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".arrow", ".gz", ".zst", ".bin", ".npy")

# training_summary.json: key -> (label, formatter), in the order the card shows them. Unknown keys follow.
_TRAINING_FIELDS = {
    "preset": ("Preset", lambda v: f"`{v}`"),
    "dataset": ("Dataset", lambda v: _dataset_markdown(v)),
    "train_tokens": ("Training tokens", lambda v: _count(v)),
    "max_steps": ("Optimizer steps", lambda v: f"{v:,}" if isinstance(v, int) else str(v)),
    "block_size": ("Context length (tokens)", str),
    "global_batch_size": ("Global batch size (sequences)", str),
    "optimizer": ("Optimizer", lambda v: f"`{v}`"),
    "learning_rate": ("Learning rate (factorized weights; spectral norm of each update)", str),
    "adamw_learning_rate": ("Learning rate (AdamW: embeddings, norms, LM head)", str),
    "seed": ("Seed", str),
    "final_train_loss": ("Final training loss", lambda v: _float(v, 4)),
    "lr_scheduler": ("Learning-rate schedule", lambda v: f"`{v}`"),
    "dense": ("Dense baseline", lambda v: "yes" if v else "no"),
    "hardware": ("Hardware", str),
    "world_size": ("Processes", str),
    "wall_time_s": ("Wall time", lambda v: _duration(v)),
    "train_time_s": ("Training time (excluding set-up and evaluation)", lambda v: _duration(v)),
    "transformers_version": ("transformers", str),
    "torch_version": ("torch", str),
}
_EVAL_FIELDS = {
    "perplexity": ("Perplexity", lambda v: _float(v, 3)),
    "loss": ("Loss (nats/token)", lambda v: _float(v, 4)),
    "dataset": ("Dataset", lambda v: _dataset_markdown(v)),
    "split": ("Split", lambda v: f"`{v}`"),
    "tokens": ("Evaluated tokens", lambda v: _count(v)),
    "max_length": ("Window (tokens)", str),
    "stride": ("Stride (tokens)", str),
    "max_tokens": ("Token budget", lambda v: _count(v)),
    "input_tokens": ("Tokens in the evaluation text", lambda v: _count(v)),
    "documents": ("Documents", lambda v: _count(v)),
    "windows": ("Windows", lambda v: _count(v)),
}
# Keys never shown: local paths, meaningless to readers of the card and revealing the trainer's file system.
_HIDDEN_KEYS = {"model", "output_dir"}


# ---------------------------------------------------------------------------------------------- formatting
def _cell(text) -> str:
    """A markdown table cell: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _count(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _cell(value)
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix} ({int(value):,})"
    return f"{value:,}"


def _float(value, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else _cell(value)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return _cell(seconds)
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} (h:mm:ss)"


def is_hub_dataset_id(value) -> bool:
    """Whether ``value`` reads as a Hub dataset id (``name`` or ``org/name``) rather than a local file or folder."""
    return (
        isinstance(value, str)
        and bool(_HUB_DATASET_ID.fullmatch(value))
        and not value.lower().endswith(_DATA_FILE_SUFFIXES)
        and not Path(value).exists()
    )


def _is_local_path(value) -> bool:
    return isinstance(value, str) and ("/" in value or "\\" in value or value.lower().endswith(_DATA_FILE_SUFFIXES))


def _dataset_markdown(value) -> str:
    if is_hub_dataset_id(value):
        return f"[{value}](https://huggingface.co/datasets/{value})"
    if _is_local_path(value):
        # A local path says nothing to readers of the card and may reveal the trainer's file system: name only.
        return f"local corpus `{_cell(Path(value).name)}`"
    return f"`{_cell(value if isinstance(value, str) else json.dumps(value))}`"


def _rows(record: dict, fields: dict) -> list[tuple[str, str]]:
    rows = [
        (label, _cell(format_(record[key]))) for key, (label, format_) in fields.items() if record.get(key) is not None
    ]
    for key, value in record.items():
        if key not in fields and key not in _HIDDEN_KEYS and value is not None:
            rows.append((f"`{key}`", _cell(value if isinstance(value, str) else json.dumps(value))))
    return rows


# ---------------------------------------------------------------------------------------------- reading
def read_json_record(path: Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when the file does not exist."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it before publishing.") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(record).__name__}.")
    return record


def load_lowrank_config(model_dir: Path) -> LowRankLlamaConfig:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model_dir} has no config.json: pass the folder written by `model.save_pretrained`.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != LowRankLlamaConfig.model_type:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; this card and publisher are for "
            f"{LowRankLlamaConfig.model_type!r} models saved by hf-lowrank."
        )
    return LowRankLlamaConfig.from_json_file(str(config_file))


def plot_files(model_dir: Path) -> list[str]:
    """The plots in ``model_dir`` (top level only), training curves first."""
    names = sorted(p.name for p in Path(model_dir).glob("*.png") if p.is_file())
    return sorted(names, key=lambda name: name != CURVES_PLOT)


# ---------------------------------------------------------------------------------------------- architecture
def projection_rows(config: LowRankLlamaConfig) -> list[dict]:
    """One row per projection of a decoder layer; parameters (with biases) counted as `count_parameters` does."""
    rows = []
    shapes = config.projection_shapes()
    for name in LOWRANK_PROJECTIONS:
        in_features, out_features = shapes[name]
        rank = config.rank_for(name)
        params, dense = config.projection_parameters(name), config.projection_parameters(name, dense=True)
        rows.append(
            dict(
                name=name,
                shape=f"{in_features} → {out_features}",
                rank="dense" if rank is None else str(rank),
                params=f"{params:,}",
                dense_params=f"{dense:,}",
                ratio=f"{params / dense:.3f}",
                count=params,
                dense_count=dense,
            )
        )
    return rows


def _architecture_facts(config: LowRankLlamaConfig) -> list[tuple[str, str]]:
    if config.rank_overrides or config.rank is not None:
        rank_rule = f"rank {config.rank}" if config.rank is not None else f"rank_ratio {config.rank_ratio}"
        if config.rank_overrides:
            rank_rule += f", overrides {json.dumps(config.rank_overrides)}"
    else:
        rank_rule = f"rank = floor({config.rank_ratio} · min(in, out))"
    dense = [name for name in LOWRANK_PROJECTIONS if name not in config.lowrank_modules]
    return [
        ("Decoder layers", str(config.num_hidden_layers)),
        ("Hidden size / MLP size", f"{config.hidden_size} / {config.intermediate_size} (SwiGLU)"),
        ("Attention heads (query / key-value)", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
        ("Head dimension", str(config.head_dim)),
        ("Vocabulary", f"{config.vocab_size:,}"),
        ("Context length", f"{config.max_position_embeddings} (RoPE, θ = {config.rope_theta:g})"),
        ("Tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("Factorized projections", ", ".join(f"`{m}`" for m in config.lowrank_modules) or "none (dense baseline)"),
        ("Dense projections", ", ".join(f"`{m}`" for m in dense) or "none"),
        ("Rank rule", rank_rule if config.lowrank_modules else "n/a"),
        ("Factor initialization", f"`{config.lowrank_init}`" if config.lowrank_modules else "n/a"),
    ]


def _total_rows(config: LowRankLlamaConfig) -> list[dict]:
    count = count_parameters(config)
    layers = config.num_hidden_layers
    return [
        dict(label="Embeddings + LM head", params=f"{count.embeddings:,}", dense_params=f"{count.embeddings:,}"),
        dict(
            label=f"Projections ({layers} layers)",
            params=f"{count.projections:,}",
            dense_params=f"{count.dense_projections:,}",
        ),
        dict(label="Norms", params=f"{count.norms:,}", dense_params=f"{count.norms:,}"),
        dict(label="**Total**", params=f"**{count.total:,}**", dense_params=f"**{count.dense_total:,}**"),
    ]


# ---------------------------------------------------------------------------------------------- metadata
def _eval_results(record: dict, dataset) -> list[EvalResult]:
    dataset = record.get("dataset", dataset)
    dataset_type = dataset if is_hub_dataset_id(dataset) else "custom"
    if is_hub_dataset_id(dataset) or (isinstance(dataset, str) and dataset and not _is_local_path(dataset)):
        dataset_name = dataset
    else:
        dataset_name = Path(dataset).name if _is_local_path(dataset) else "held-out text"
    metric_args = {key: record[key] for key in ("max_length", "stride", "tokens") if key in record} or None
    common = dict(
        task_type="text-generation",
        task_name="Causal language modeling",
        dataset_type=dataset_type,
        dataset_name=dataset_name,
        dataset_split=record.get("split"),
        metric_args=metric_args,
    )
    metrics = (("perplexity", "Perplexity"), ("loss", "Loss (nats/token)"))
    return [
        EvalResult(metric_type=key, metric_name=name, metric_value=record[key], **common)
        for key, name in metrics
        if key in record
    ]


def render_model_card(
    model_dir,
    repo_id: str | None = None,
    revision: str | None = None,
    *,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    template_path=None,
    **card_data,
) -> ModelCard:
    """Render and validate the model card of the checkpoint in ``model_dir``.

    Args:
        model_dir: a folder written by ``save_pretrained``; ``training_summary.json``, ``eval_results.json`` and
            ``*.png`` plots in it are shown when present.
        repo_id: ``org/name`` used in the usage snippets (a placeholder when ``None``).
        revision: the branch or commit sha the snippets pin (default ``"main"``).
        license: Hub license id of the weights.
        tags: extra tags; the required ones (`REQUIRED_TAGS`) are always present.
        template_path: a Jinja template to use instead of the packaged one.
        **card_data: any other `ModelCardData` field (``language``, ``datasets``, ``base_model``, …); it overrides
            what the folder says.

    Raises:
        ValueError: the folder is not a hf-lowrank checkpoint, a record file is malformed, or the rendered card
            fails `validate_model_card`.
    """
    model_dir = Path(model_dir)
    config = load_lowrank_config(model_dir)
    summary = read_json_record(model_dir / TRAINING_SUMMARY_NAME) or {}
    evaluation = read_json_record(model_dir / EVAL_RESULTS_NAME) or {}
    repo_id = repo_id or f"your-org/{model_dir.resolve().name}"
    revision = revision or "main"
    model_name = repo_id.split("/")[-1]

    dataset = summary.get("dataset")
    metadata = dict(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=[dataset] if is_hub_dataset_id(dataset) else None,
    )
    eval_results = _eval_results(evaluation, dataset)
    if eval_results:  # the model-index names the model; without results the key would be stray metadata
        metadata.update(model_name=model_name, eval_results=eval_results)
    metadata.update(card_data)
    metadata["tags"] = list(dict.fromkeys([*REQUIRED_TAGS, *(tags or [])]))
    data = ModelCardData(**metadata)

    count = count_parameters(config)
    factorized = ", ".join(f"`{m}`" for m in config.lowrank_modules)
    card = ModelCard.from_template(
        data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_title=model_name,
        repo_id=repo_id,
        revision=revision,
        revision_is_branch=not _COMMIT_SHA.fullmatch(revision),
        is_dense=config.is_dense,
        factorized_summary=(
            f"Factorized projections of every layer: {factorized}; the model holds {count.compression:.1%} of "
            "the parameters of its dense counterpart"
        ),
        num_layers=config.num_hidden_layers,
        architecture_facts=_architecture_facts(config),
        projection_rows=projection_rows(config),
        total_rows=_total_rows(config),
        compression=(
            f"{count.total:,} parameters, {count.compression:.3f}× the dense counterpart's {count.dense_total:,} "
            f"({1 - count.compression:.1%} fewer); projections alone: "
            f"{count.projections / count.dense_projections:.3f}×."
        ),
        training_rows=_rows(summary, _TRAINING_FIELDS),
        eval_rows=_rows(evaluation, _EVAL_FIELDS),
        plots=[dict(path=name, alt=Path(name).stem.replace("_", " ")) for name in plot_files(model_dir)],
        has_tokenizer=any((model_dir / name).is_file() for name in TOKENIZER_FILES),
        project_url=PROJECT_URL,
        arxiv_id=ARXIV_ID,
        citation=CITATION,
    )
    validate_model_card(card)
    return card


# ---------------------------------------------------------------------------------------------- validation
def validate_model_card(card: ModelCard) -> None:
    """Check offline what the Hub would check, and what this project promises; raise one `ValueError` listing
    every problem found."""
    problems = []
    data = card.data.to_dict()
    try:
        if yaml.safe_load(card.data.to_yaml()) != data:
            problems.append("the metadata does not round-trip through YAML")
        if ModelCard(str(card)).data.to_dict() != data:
            problems.append("the metadata block of the rendered README does not parse back to the same metadata")
    except (yaml.YAMLError, ValueError) as error:
        problems.append(f"the metadata is not valid YAML: {error}")

    for key, expected in REQUIRED_METADATA.items():
        if not data.get(key):
            problems.append(f"metadata key `{key}` is missing")
        elif expected is not None and data[key] != expected:
            problems.append(f"metadata `{key}` is {data[key]!r}, expected {expected!r}")
    missing_tags = [tag for tag in REQUIRED_TAGS if tag not in (data.get("tags") or [])]
    if missing_tags:
        problems.append(f"tags {missing_tags} are missing")

    if "model-index" in data:
        problems += _model_index_problems(data["model-index"])

    if 'trust_remote_code=True, revision="' not in card.text:
        problems.append("the remote-code usage snippet does not pin a `revision` (R8)")

    if problems:
        raise ValueError("Invalid model card:\n" + "\n".join(f"- {problem}" for problem in problems))


def _model_index_problems(model_index) -> list[str]:
    try:
        name, results = model_index_to_eval_results(model_index)
    except (KeyError, TypeError, ValueError) as error:
        return [f"the model-index is malformed ({type(error).__name__}: {error})"]
    problems = [] if name else ["the model-index has no model name"]
    for result in results:
        value = result.metric_value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"model-index metric `{result.metric_type}` is {value!r}, not a finite number")
        if not (result.dataset_type and result.dataset_name):
            problems.append(f"model-index metric `{result.metric_type}` names no dataset")
    return problems


__all__ = ["REQUIRED_TAGS", "TEMPLATE_PATH", "render_model_card", "validate_model_card"]
