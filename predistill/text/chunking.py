"""Cutting token streams into instances (MiniPLM's chunking), shared by `prepare` and by every
writer of a re-tokenised store (`sample --materialize`).

Documents of one domain are concatenated (each ending with EOS) and cut into instances of at most
max_len + 1 tokens, each cut placed after the last boundary (EOS / newline / sentence end) in the
window's second half; the remainder carries over to the next instance. Numpy only: `prepare`'s
tokenizer worker processes import it.
"""

from __future__ import annotations

import numpy as np

SENTENCE_ENDS = ("\n", ".", "!", "?")


def boundary_table(tokenizer) -> np.ndarray:
    """is_boundary[id]: token `id` may end an instance (EOS, or its text ends a line or sentence)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    table = np.array([t.rstrip(" \t").endswith(SENTENCE_ENDS) for t in texts], dtype=bool)
    table[tokenizer.eos_token_id] = True
    return table


class Chunker:
    """Concatenates one domain's documents and cuts them into instances (see module doc).

    `add(ids, can_end)` takes, per token, how good a place right after it is to end an instance:
    2 = a boundary (EOS / newline / sentence end) between two pre-tokenizer words, 1 = between
    words, 0 = inside a word; without `can_end` it is 2·`is_boundary[ids]`. A cut inside a word
    (e.g. between "  " and the "\n" that ends a Markdown line) would make the decoded instance
    re-tokenise differently, so a window with no boundary in its second half is cut between words,
    and only a window with no word break at all is cut at its full length."""

    def __init__(self, max_len: int, is_boundary: np.ndarray):
        self.window = max_len + 1
        self.is_boundary = is_boundary
        self.buffer = np.zeros(0, dtype=np.int64)
        self.can_end = np.zeros(0, dtype=np.int8)

    def add(self, ids: np.ndarray, can_end: np.ndarray | None = None):
        ids = np.asarray(ids, dtype=np.int64)
        can_end = 2 * self.is_boundary[ids].astype(np.int8) if can_end is None else np.asarray(can_end, dtype=np.int8)
        self.buffer = np.concatenate([self.buffer, ids])
        self.can_end = np.concatenate([self.can_end, can_end])
        while len(self.buffer) >= self.window:
            cut = self._cut(self.can_end[: self.window])
            yield self.buffer[:cut]
            self.buffer = self.buffer[cut:]
            self.can_end = self.can_end[cut:]

    def _cut(self, can_end: np.ndarray) -> int:
        for level in (2, 1):
            ends = np.flatnonzero(can_end >= level)
            if len(ends) and ends[-1] + 1 >= self.window // 2:
                return int(ends[-1]) + 1
        return self.window

    def flush(self):
        if len(self.buffer):
            yield self.buffer
        self.buffer = self.buffer[:0]
        self.can_end = self.can_end[:0]


def encode_document_slow(tokenizer, text: str, is_boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`encode_document` for a slow (Python) HF tokenizer: it reports no words, so an instance may
    end only after a boundary token (level 2) — or, in a window without one, anywhere."""
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    return ids, 2 * is_boundary[ids].astype(np.int8)


def encode_document(tokenizer, text: str, is_boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Token ids of `text` (a `tokenizers.Tokenizer`; no special tokens added) and, per token, how
    good a place right after it is to end an instance (Chunker's levels: 2 boundary between words,
    1 between words, 0 never). The text before a cut must pre-tokenise the same on its own: the cut
    must fall between two pre-tokenizer words, and not after a whitespace word that follows
    whitespace: at the end of a text the byte-level regex (`\s+(?!\S)`) would merge the two
    ("  " + "\n" → "  \n")."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    word_ids = enc.word_ids
    words = np.array([-1 - j if w is None else w for j, w in enumerate(word_ids)], dtype=np.int64)
    between_words = np.ones(len(words), dtype=bool)
    between_words[:-1] = words[1:] != words[:-1]
    # A word's characters from the token offsets: its first token's start, its last token's end.
    # (`enc.word_to_chars` scans the whole encoding per call: quadratic on one long line.)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    run_start = np.ones(len(words), dtype=bool)
    run_start[1:] = words[1:] != words[:-1]
    first_token = np.maximum.accumulate(np.where(run_start, np.arange(len(words)), 0))
    for j in np.flatnonzero(between_words[:-1]):  # the document's last token ends the text anyway
        if word_ids[j] is None:
            continue
        start, end = int(offsets[first_token[j], 0]), int(offsets[j, 1])
        if start > 0 and text[start - 1].isspace() and text[start:end].isspace():
            between_words[j] = False
    return ids, between_words.astype(np.int8) * (1 + is_boundary[ids].astype(np.int8))
