"""Byte-level BPE tokenizer, trained with Hugging Face ``tokenizers``.

Byte-level: any UTF-8 text encodes without unknown tokens (Japanese, code,
JSON alike). The training text is an equal share of every domain, so that no
domain (say, 100 MB of JSON) dominates the merges. Id 0 is the end-of-document
token ``<|endoftext|>``, placed between packed documents.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    assert i is not None, "tokenizer has no end-of-document token"
    return i


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_docs(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens; the caller appends EOS)."""
    if not texts:
        return []
    return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
