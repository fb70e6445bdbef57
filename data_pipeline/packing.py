"""Packing: documents, each followed by EOS, concatenated and cut into samples of seq_len + 1 tokens.

Samples do not overlap, so every token of the input is in exactly one sample (the last token of a sample
is a label only, the first an input only). A document may continue into the next sample; it then has no
start in that sample. The EOS token belongs to the document it ends. The last partial sample of a split
cannot be filled; its tokens are counted as dropped and reported.
"""

from __future__ import annotations

import numpy as np


class Packer:
    """Cuts a stream of documents into samples of `sample_tokens` tokens with document-start masks."""

    def __init__(self, sample_tokens: int, dtype: str):
        self.sample_tokens = sample_tokens
        self.dtype = np.dtype(dtype)
        self.tokens = np.zeros(sample_tokens, self.dtype)
        self.is_start = np.zeros(sample_tokens, bool)
        self.fill = 0

    def add(self, document: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append one document (its tokens, EOS included); return the samples it completed.

        Returns tokens [k, sample_tokens] and is_start [k, sample_tokens] (k may be 0).
        """
        size = self.sample_tokens
        tokens = np.zeros((0, size), self.dtype)
        starts = np.zeros((0, size), bool)
        if len(document) == 0:
            return tokens, starts
        self.is_start[self.fill] = True
        head = min(size - self.fill, len(document))
        self.tokens[self.fill : self.fill + head] = document[:head]
        self.fill += head
        if self.fill < size:
            return tokens, starts
        rest = document[head:]
        full = len(rest) // size
        tokens = np.concatenate(
            [self.tokens[None], rest[: full * size].reshape(full, size).astype(self.dtype)]
        )
        starts = np.zeros((full + 1, size), bool)
        starts[0] = self.is_start
        self._reset(rest[full * size :])
        return tokens, starts

    def carry(self) -> tuple[np.ndarray, np.ndarray]:
        """The partial sample: tokens [fill] and is_start [fill]."""
        return self.tokens[: self.fill].copy(), self.is_start[: self.fill].copy()

    def restore(self, tokens: np.ndarray, is_start: np.ndarray) -> None:
        """Continue from a partial sample returned by `carry`."""
        self.tokens[:] = 0
        self.is_start[:] = False
        self.fill = len(tokens)
        self.tokens[: self.fill] = tokens
        self.is_start[: self.fill] = is_start

    def _reset(self, remainder: np.ndarray) -> None:
        self.tokens = np.zeros(self.sample_tokens, self.dtype)
        self.is_start = np.zeros(self.sample_tokens, bool)
        self.fill = len(remainder)
        self.tokens[: self.fill] = remainder
