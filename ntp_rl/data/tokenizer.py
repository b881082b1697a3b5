"""Tokenizers: a small BPE trained locally on the embedded corpus, or any HF tokenizer.

The embedded tokenizer splits every digit into its own token. A tiny model then sees
numbers as digit sequences it can learn to add column by column, instead of a few
hundred unrelated number tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ntp_rl.errors import DataError, first_line

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_embedded_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with one token per digit; decoding restores the text exactly."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # Byte-level keeps spaces and newlines as ordinary symbols, so nothing is lost
            # on the way back; no prefix space, so a document decodes to itself.
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        # Only the bytes the corpus uses, not all 256: the config allows vocabularies down
        # to 64, and the embedded corpus is plain ASCII.
        initial_alphabet=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer that can separate packed documents (it must have an EOS token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        if Path(name_or_path).is_dir():
            raise DataError(f"tokenizer {name_or_path!r}: cannot be read; its tokenizer files are corrupt or incomplete "
                            f"({first_line(exc)})") from exc
        where = "local directory, and not a tokenizer on the Hugging Face hub"
        raise DataError(f"tokenizer {name_or_path!r}: cannot be loaded (no such {where}): {first_line(exc)}") from exc
    if tokenizer.eos_token is None:
        raise DataError(
            f"tokenizer {name_or_path!r} has no EOS token, so packed documents cannot be separated; "
            "use a tokenizer that defines eos_token"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


