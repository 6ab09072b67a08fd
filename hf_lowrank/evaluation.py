"""Held-out perplexity of a causal LM with a sliding window, and `hf-lowrank evaluate`.

The method is transformers' "perplexity of fixed-length models": documents are tokenized without special tokens,
each followed by eos (as the pretraining data pipeline packs them), and concatenated into one stream of N tokens.
Windows of ``max_length`` tokens start every ``stride`` tokens; each window scores only the tokens that no
earlier window scored, so with ``stride < max_length`` every scored token sees at least ``max_length - stride``
tokens of context. The first token of the stream is never scored (nothing predicts it), nor, when
``stride == max_length``, the first token of each window. Perplexity is token-weighted:
exp(total NLL / total scored tokens), in nats, aggregated by the `evaluate` metric in ``metrics/perplexity.py``.
"""

import argparse
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli_support import CommandParser
from .files import EVAL_RESULTS_NAME, write_text_atomic
from .loading import load_causal_lm

METRIC_PATH = Path(__file__).parent / "metrics" / "perplexity.py"
DEFAULT_BATCH_SIZE = 8


def load_perplexity_metric():
    """The package's perplexity metric, loaded by path (works offline, unlike ``evaluate.load("perplexity")``)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


# ---------------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the stream go into the model; those in ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows over a stream of ``num_tokens``; every position in ``[1, num_tokens)`` is scored at most once,
    and exactly once when ``stride < max_length``."""
    if not 0 < stride <= max_length:
        raise ValueError(f"`stride` must be in [1, max_length={max_length}], got {stride}.")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        score_from = max(previous_end, begin + 1)  # position `begin` has no context inside its window
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        previous_end = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor, windows: list[Window], batch_size: int = DEFAULT_BATCH_SIZE):
    """``(nll_sum, num_tokens)`` per window, in order: summed NLL (nats, float32 log-softmax) of its scored tokens.

    Windows with the same length and scored span are batched; ``logits_to_keep`` limits the LM head to the
    scored positions, which saves a (B, T, vocab) tensor when only the last ``stride`` tokens are scored.
    """
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list[int]] = {}
    for index, window in enumerate(windows):
        groups.setdefault((window.end - window.begin, window.score_from - window.begin), []).append(index)
    results: list[tuple[float, int] | None] = [None] * len(windows)
    for (length, offset), indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.stack([input_ids[windows[i].begin : windows[i].end] for i in chunk]).to(device)  # (B, T)
            # Logits at positions offset-1 .. T-1; the last one predicts past the window and is dropped.
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=length - offset + 1).logits[:, :-1]
            targets = ids[:, offset:]  # (B, T - offset)
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none").sum(-1)  # (B,)
            for i, value in zip(chunk, nll.tolist()):
                results[i] = (value, length - offset)
    return results


def tokenize_stream(tokenizer, texts: Iterable[str], max_tokens: int | None = None, batch_size: int = 256):
    """One 1-D LongTensor: each non-blank text's ids (no special tokens) then eos; cut at ``max_tokens``.

    Returns ``(ids, documents)``; stops reading ``texts`` once ``max_tokens`` are collected.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        warnings.warn("The tokenizer has no eos token; documents are concatenated without a separator.", stacklevel=2)
    pieces, total, documents, batch = [], 0, 0, []

    def flush():
        nonlocal total, documents
        for ids in tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]:
            ids = ids + ([eos] if eos is not None else [])
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            documents += 1
        batch.clear()

    for text in texts:
        if not text or text.isspace():
            continue
        batch.append(text)
        if len(batch) == batch_size:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:
        flush()
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return (stream[:max_tokens] if max_tokens is not None else stream), documents


def perplexity_of_ids(
    model, input_ids: torch.Tensor, max_length: int, stride: int, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict:
    """Sliding-window perplexity of ``model`` on one 1-D stream of token ids.

    Returns ``perplexity``, ``loss`` (mean NLL per scored token, nats), ``tokens`` (scored), ``input_tokens``,
    ``windows``, ``max_length`` and ``stride``.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2, got {max_length}.")
    if input_ids.numel() < 2:
        raise ValueError("The evaluation text has fewer than 2 tokens; there is nothing to predict.")
    windows = sliding_windows(input_ids.numel(), max_length, stride)
    was_training = model.training
    model.eval()
    try:
        per_window = window_nll(model, input_ids, windows, batch_size)
    finally:
        model.train(was_training)
    metric = load_perplexity_metric()
    metric.add_batch(nll_sum=[nll for nll, _ in per_window], num_tokens=[n for _, n in per_window])
    return {
        **metric.compute(),
        "input_tokens": int(input_ids.numel()),
        "windows": len(windows),
        "max_length": max_length,
        "stride": stride,
    }


def evaluate_perplexity(
    model,
    tokenizer,
    texts: Iterable[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int | None = None,
) -> dict:
    """Sliding-window perplexity of ``model`` on ``texts`` (see the module docstring for the method).

    ``max_length`` defaults to the model's ``max_position_embeddings``, ``stride`` to ``max_length // 2``;
    ``max_tokens`` caps the token stream for speed. Returns what :func:`perplexity_of_ids` returns, plus
    ``documents`` (how many texts were read).
    """
    context = model.config.max_position_embeddings
    max_length = context if max_length is None else max_length
    if max_length > context:  # positions past it were never trained: the score would mean nothing
        raise ValueError(
            f"--max_length {max_length} exceeds the model's max_position_embeddings {context}; use at most {context} "
            "(the default)."
        )
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1 (windows per forward pass), got {batch_size}.")
    stride = max(1, max_length // 2) if stride is None else stride
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"`max_tokens` must be at least 2, got {max_tokens}.")
    input_ids, documents = tokenize_stream(tokenizer, texts, max_tokens)
    return {**perplexity_of_ids(model, input_ids, max_length, stride, batch_size), "documents": documents}


# ---------------------------------------------------------------------------------------------- text sources
def load_eval_texts(
    files: list[str | Path] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    split: str = "validation",
    text_column: str = "text",
) -> tuple[Iterable[str], dict]:
    """``(texts, source)`` from local files, a Hub dataset, or the built-in held-out split.

    ``source`` describes the text for ``eval_results.json``: ``dataset`` and ``split`` always (``split`` is
    ``None`` for files), plus ``dataset_config`` or ``files`` (base names only: the record is published with the
    model and should not reveal the evaluator's file system).

    Local files are read as in pretraining (``.txt``: one document per file; ``.json``/``.jsonl``: one per
    record, text in ``text_column``). Without files or a dataset name: the ``validation`` split of the built-in
    standard-library corpus, chosen exactly as `hf-lowrank pretrain` holds it out by default.
    """
    from datasets import load_dataset

    # `eval_results.json` names the built-in corpus and local files as `hf-lowrank pretrain` does, so cards agree.
    from .training.data import (
        BUILTIN_DATASET,
        LOCAL_FILES_DATASET,
        DataArguments,
        load_default_corpus,
        load_raw_datasets,
    )

    if files and dataset_name:
        raise ValueError("Give either evaluation files or a dataset name, not both.")
    if files:
        data_args = DataArguments(
            train_files=[str(f) for f in files], validation_split_percentage=0, text_column=text_column
        )
        dataset = load_raw_datasets(data_args)["train"]
        names = [Path(f).name for f in files]
        return dataset[text_column], {"dataset": LOCAL_FILES_DATASET, "split": None, "files": names}
    if dataset_name:
        dataset = load_dataset(dataset_name, dataset_config, split=split)
        if text_column not in dataset.column_names:
            raise ValueError(
                f"Split {split!r} of {dataset_name!r} has no column {text_column!r}; its columns are "
                f"{dataset.column_names}. Pass --text_column."
            )
        return dataset[text_column], {"dataset": dataset_name, "dataset_config": dataset_config, "split": split}
    defaults = DataArguments()
    corpus = load_default_corpus(defaults.max_corpus_bytes, defaults.validation_split_percentage, text_column)
    return corpus["validation"][text_column], {"dataset": BUILTIN_DATASET, "split": "validation"}


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="hf-lowrank evaluate",
        description="Sliding-window perplexity of a causal LM on held-out text; writes eval_results.json.",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="Model folder (or Hub id, with --output).")
    source = parser.add_argument_group("text (default: the built-in corpus's held-out split)")
    source.add_argument("--files", nargs="+", default=None, help="Local .txt/.json/.jsonl files or globs.")
    source.add_argument("--dataset_name", default=None, help="A `datasets` dataset on the Hub.")
    source.add_argument(
        "--dataset_config_name", "--dataset_config", default=None, help="Configuration of --dataset_name."
    )
    source.add_argument("--split", default="validation", help="Split of --dataset_name (default: validation).")
    source.add_argument("--text_column", default="text", help="Column holding the text (JSON files, Hub datasets).")
    parser.add_argument(
        "--tokenizer_name", "--tokenizer", default=None, help="Tokenizer folder or id (default: MODEL_DIR)."
    )
    parser.add_argument("--max_length", type=int, default=None, help="Window length (default: model context).")
    parser.add_argument("--stride", type=int, default=None, help="Window step (default: max_length // 2).")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="Windows per forward pass.")
    parser.add_argument("--max_tokens", type=int, default=None, help="Evaluate at most this many tokens.")
    parser.add_argument(
        "--output", type=Path, default=None, help="Results file (default: MODEL_DIR/eval_results.json)."
    )
    parser.add_argument("--device", default=None, help="Device (default: cuda when available, else cpu).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow code shipped with the model.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`hf-lowrank evaluate`; a bad argument or input raises `ValueError` (reported by `hf_lowrank.cli.main`)."""
    from transformers import AutoTokenizer

    import hf_lowrank  # noqa: F401  (registers the low-rank model with the Auto classes)

    args = build_parser().parse_args(argv)
    output = args.output
    if output is None:
        if not Path(args.model).is_dir():
            raise ValueError(f"{args.model!r} is not a local folder; pass --output to say where results go.")
        output = Path(args.model) / EVAL_RESULTS_NAME
    texts, source = load_eval_texts(
        args.files, args.dataset_name, args.dataset_config_name, args.split, args.text_column
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = load_causal_lm(args.model, "evaluated", trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_name or args.model, trust_remote_code=args.trust_remote_code
        )
    except OSError as error:
        raise ValueError(f"Cannot load the model or tokenizer from {args.model!r}: {error}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # ids past the embedding: an IndexError mid-run
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding holds "
            f"{model.get_input_embeddings().num_embeddings}: it is not this model's tokenizer. Pass the model's own "
            "tokenizer (--tokenizer_name) or evaluate the model it belongs to."
        )
    model.to(device)
    result = evaluate_perplexity(
        model, tokenizer, texts, args.max_length, args.stride, batch_size=args.batch_size, max_tokens=args.max_tokens
    )
    record = {
        "perplexity": result["perplexity"],
        "loss": result["loss"],
        "tokens": result["tokens"],
        "dataset": source["dataset"],
        "split": source["split"],
        "max_length": result["max_length"],
        "stride": result["stride"],
        **{key: value for key, value in source.items() if key not in ("dataset", "split")},
        "input_tokens": result["input_tokens"],
        "documents": result["documents"],
        "windows": result["windows"],
        "max_tokens": args.max_tokens,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(record, indent=2) + "\n")
    where = source["dataset"] + (f" [{source['split']}]" if source["split"] else "")
    print(
        f"perplexity {record['perplexity']:.4f} (loss {record['loss']:.4f} nats/token) over {record['tokens']:,} "
        f"tokens of {where}, max_length {record['max_length']}, stride {record['stride']}; wrote {output}"
    )
    return 0


__all__ = [
    "METRIC_PATH",
    "Window",
    "evaluate_perplexity",
    "load_eval_texts",
    "load_perplexity_metric",
    "perplexity_of_ids",
    "sliding_windows",
    "tokenize_stream",
    "window_nll",
    "main",
]
