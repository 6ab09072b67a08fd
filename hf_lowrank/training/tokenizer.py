"""Byte-level BPE tokenizer: trained on the training corpus with `tokenizers`, saved beside the model.

Byte-level BPE has no unknown token (every byte is in the base alphabet) and its decoder restores the exact
bytes, so source code with any unicode and any whitespace decodes to the text it came from.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..files import STAGING_PREFIX, fsync_dir, fsync_file

if TYPE_CHECKING:
    from ..configuration_lowrank import LowRankLlamaConfig
    from .arguments import DataArguments

logger = logging.getLogger(__name__)

# GPT-2's document separator: it ends every document (eos) and may start one (bos). Padding gets its own
# token so that `DataCollatorForLanguageModeling`, which masks pad ids out of the labels, never hides eos.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def train_bpe_tokenizer(
    text_iterator: Iterable[str | list[str]],
    vocab_size: int,
    save_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``text_iterator`` (strings or batches of strings).

    The result has ``len(tokenizer) <= vocab_size`` (fewer when the corpus has too few distinct merges),
    ``<|endoftext|>`` as eos and bos, ``<|pad|>`` as pad, and adds no special tokens when encoding. When
    ``save_dir`` is given it is saved there with ``save_pretrained``, so ``AutoTokenizer.from_pretrained``
    loads it.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"`tokenizer_vocab_size` must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens) for a byte-level BPE, got {vocab_size}."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_iterator, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Cleaning up spaces (" ." -> ".") would corrupt code on decode.
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        save_tokenizer_atomic(wrapped, save_dir)
    return wrapped


TOKENIZER_FILE = "tokenizer.json"  # its presence makes a later run reuse the saved tokenizer: written last


def save_tokenizer_atomic(tokenizer: PreTrainedTokenizerBase, save_dir: str | os.PathLike) -> None:
    """``save_pretrained`` into a staging folder, fsynced, then each file renamed into ``save_dir``,
    ``tokenizer.json`` last: a crash leaves either no ``tokenizer.json`` (the next run trains again) or a whole one."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    staging = save_dir / f"{STAGING_PREFIX}tokenizer.{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    tokenizer.save_pretrained(staging)
    files = sorted(staging.iterdir(), key=lambda path: path.name == TOKENIZER_FILE)
    for path in files:
        fsync_file(path)
    for path in files:
        os.replace(path, save_dir / path.name)
    fsync_dir(save_dir)
    staging.rmdir()


def load_saved_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(folder)``; a torn or corrupted tokenizer is an error naming the file."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - `tokenizers` raises its own exception types; re-raised with the file
        path = Path(folder) / TOKENIZER_FILE
        raise ValueError(
            f"Cannot read the tokenizer saved in {path} (torn or corrupted?): {error}. Copy tokenizer.json back from a "
            "checkpoint-N folder of this run, or, if no checkpoint was trained with it, delete it (or pass "
            "--overwrite_cache) to train a new one."
        ) from error


def iter_text_batches(dataset, text_column: str, max_bytes: int | None, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of the texts of ``dataset`` (map-style or streaming), stopping once ``max_bytes`` of UTF-8 are out."""
    seen = 0
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([text_column])
    for batch in dataset.iter(batch_size=batch_size):
        texts = batch[text_column]
        if max_bytes is not None and max_bytes > 0:
            kept = []
            for text in texts:
                if seen >= max_bytes:
                    break
                kept.append(text)
                seen += len(text.encode("utf-8"))
            texts = kept
        if texts:
            yield texts
        if max_bytes is not None and 0 < max_bytes <= seen:
            return


def load_or_train_tokenizer(
    args: DataArguments, raw_train, output_dir: str | os.PathLike | None
) -> PreTrainedTokenizerBase:
    """The tokenizer for this run.

    ``args.tokenizer_name`` set: ``AutoTokenizer.from_pretrained`` of it. Otherwise a tokenizer already saved
    in ``output_dir`` (a resumed run keeps its vocabulary) unless ``args.overwrite_cache``; otherwise a
    byte-level BPE of ``args.tokenizer_vocab_size`` trained on (at most ``args.tokenizer_train_bytes`` of)
    ``raw_train`` and saved in ``output_dir``. Under several processes, call this inside
    ``TrainingArguments.main_process_first()`` so that only the main process trains and the others load.
    """
    if args.tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"Tokenizer {args.tokenizer_name!r} has no eos token, which packing puts between documents; "
                "choose a tokenizer with an eos token or leave `tokenizer_name` unset to train one."
            )
        return tokenizer
    if (
        output_dir is not None
        and os.path.isfile(os.path.join(output_dir, "tokenizer.json"))
        and not args.overwrite_cache
    ):
        logger.info("Reusing the tokenizer saved in %s (pass --overwrite_cache to train a new one).", output_dir)
        return load_saved_tokenizer(output_dir)
    logger.info("Training a byte-level BPE tokenizer (vocab %d) on the training split.", args.tokenizer_vocab_size)
    tokenizer = train_bpe_tokenizer(
        iter_text_batches(raw_train, args.text_column, args.tokenizer_train_bytes),
        vocab_size=args.tokenizer_vocab_size,
        save_dir=output_dir,
    )
    # Reload what was saved, so this run and a resumed one tokenize with the same object (and hit the same
    # `datasets` cache entries).
    return tokenizer if output_dir is None else load_saved_tokenizer(output_dir)


def check_vocab(tokenizer: PreTrainedTokenizerBase, config: LowRankLlamaConfig) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding; warn when most rows would go unused."""
    n_tokens = len(tokenizer)
    if n_tokens > config.vocab_size:
        raise ValueError(
            f"The tokenizer has {n_tokens} tokens but the model's `vocab_size` is {config.vocab_size}: ids past "
            f"{config.vocab_size - 1} have no embedding. Set `vocab_size` to at least {n_tokens} (or train a "
            f"smaller tokenizer with `tokenizer_vocab_size` <= {config.vocab_size})."
        )
    if n_tokens < config.vocab_size // 2:
        logger.warning(
            "The tokenizer has %d tokens but the model's `vocab_size` is %d: %d embedding rows will never be used. "
            "Consider `vocab_size=%d`.",
            n_tokens,
            config.vocab_size,
            config.vocab_size - n_tokens,
            n_tokens,
        )


__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "check_vocab",
    "iter_text_batches",
    "load_or_train_tokenizer",
    "train_bpe_tokenizer",
]
