"""Byte-level BPE tokenizer (HF `tokenizers`) with one special token, `<|endoftext|>`, as EOS."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bigtrain.errors import BigtrainError

EOS_TOKEN = "<|endoftext|>"
_MIN_VOCAB = 257  # 256 byte symbols + EOS


class TextTokenizer:
    """Lossless text <-> token ids: byte-level BPE, so every string round-trips exactly."""

    def __init__(self, hf: Tokenizer) -> None:
        if hf.token_to_id(EOS_TOKEN) != 0:
            raise ValueError(f"tokenizer must have {EOS_TOKEN} at id 0")
        # A literal "<|endoftext|>" inside a document is text, not a document boundary.
        hf.encode_special_tokens = True
        self._hf = hf

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        """Learn a byte-level BPE vocabulary of at most `vocab_size` tokens from `texts`."""
        if vocab_size < _MIN_VOCAB:
            raise BigtrainError(f"vocab_size must be at least {_MIN_VOCAB}, got {vocab_size}")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path | str) -> TextTokenizer:
        """Read a tokenizer saved by `save` (or any HF tokenizer.json with EOS at id 0)."""
        path = Path(path)
        if not path.is_file():
            raise BigtrainError(f"tokenizer file not found: {path}")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise BigtrainError(f"{path} is not a valid tokenizer file: {e}") from e
        if hf.token_to_id(EOS_TOKEN) != 0:
            raise BigtrainError(f"{path} has no {EOS_TOKEN} token at id 0")
        return cls(hf)

    def save(self, path: Path | str) -> None:
        """Write the tokenizer JSON atomically; an existing file is never overwritten."""
        path = Path(path)
        if path.exists():
            raise BigtrainError(f"{path} already exists; refusing to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._hf.to_str(pretty=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (encoded in parallel by the Rust backend), without EOS."""
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; EOS decodes to the literal `<|endoftext|>`."""
        return self._hf.decode(list(ids), skip_special_tokens=False)

    @property
    def eos_id(self) -> int:
        return 0

    @functools.cached_property
    def vocab_size(self) -> int:
        # Cached: the backend builds the whole vocabulary map to count it (tens of ms at 32k).
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: identifies the vocabulary a dataset was tokenized with."""
        return hashlib.sha256(self._hf.to_str().encode()).hexdigest()

    @property
    def hf(self) -> Tokenizer:
        return self._hf
