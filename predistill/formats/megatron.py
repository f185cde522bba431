"""Megatron-LM's indexed dataset (`PREFIX.bin` + `PREFIX.idx`, "MMIDIDX" version 1): the format of
Megatron-LM's pre-training data and of MiniPLM's released refined corpus. Defined here only;
`predistill export --format megatron` writes it, `prepare --source megatron:PREFIX` reads it.

PREFIX.idx, little-endian:
    magic           9 bytes  b"MMIDIDX\\x00\\x00"
    version         uint64   1
    dtype code      uint8    1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    n_sequences     uint64
    n_doc_indices   uint64   number of entries of `document_indices` (documents + 1)
    lengths         int32    [n_sequences]   tokens per sequence
    pointers        int64    [n_sequences]   byte offset of each sequence in PREFIX.bin
    document_indices int64   [n_doc_indices] 0, then the end (in sequences) of each document
PREFIX.bin: the sequences' tokens back to back, in the dtype.

A multimodal dataset appends an int8 mode per sequence; it is refused (this is text only).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from predistill.core.artifacts import PredistillError, open_exclusive, write_bytes_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_DTYPES = (1, 3, 4, 5, 8)  # integer codes a token id can be read from (int8 holds no vocabulary)
_HEADER = struct.Struct("<9sQBQQ")


def paths(prefix: str | Path) -> tuple[Path, Path]:
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def token_dtype_code(vocab_size: int) -> int:
    """Megatron's choice: uint16 while every id fits, else int32."""
    return 8 if vocab_size <= 65536 else 4


def write(
    prefix: str | Path, sequences: Iterable[np.ndarray], vocab_size: int, document_ends: Iterable[int] | None = None
) -> tuple[Path, Path]:
    """Write `sequences` (one per stored instance) as PREFIX.bin/.idx. `document_ends`: the end, in
    sequences, of each document (default: every sequence is a document). Temporary names are renamed
    into place, .bin first, so a PREFIX.idx next to a .bin means both are whole."""
    bin_path, idx_path = paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    code = token_dtype_code(vocab_size)
    dtype = np.dtype(DTYPES[code]).newbyteorder("<")
    lengths: list[int] = []
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    try:
        with open_exclusive(tmp_bin) as f:
            for seq in sequences:
                seq = np.asarray(seq)
                if len(seq) and (int(seq.min()) < 0 or int(seq.max()) >= vocab_size):
                    raise PredistillError(f"sequence {len(lengths)} has ids outside [0, {vocab_size})")
                f.write(seq.astype(dtype).tobytes())
                lengths.append(len(seq))
            f.flush()
            os.fsync(f.fileno())
        n = len(lengths)
        ends = list(range(1, n + 1)) if document_ends is None else [int(e) for e in document_ends]
        doc_indices = np.asarray([0] + ends, dtype="<i8")
        if n and (doc_indices[-1] != n or np.any(np.diff(doc_indices) <= 0)):
            raise PredistillError(f"document ends must rise strictly to the number of sequences ({n})")
        lengths_arr = np.asarray(lengths, dtype="<i4")
        pointers = (
            np.concatenate([[0], np.cumsum(lengths_arr.astype(np.int64) * dtype.itemsize)[:-1]]).astype("<i8")
            if n
            else np.zeros(0, "<i8")
        )
        index = (
            _HEADER.pack(MAGIC, VERSION, code, n, len(doc_indices))
            + lengths_arr.tobytes()
            + pointers.tobytes()
            + doc_indices.tobytes()
        )
        os.replace(tmp_bin, bin_path)
        write_bytes_atomic(idx_path, index)  # the index last: next to a .bin, it means both are whole
    finally:
        tmp_bin.unlink(missing_ok=True)
    return bin_path, idx_path


class IndexedDataset:
    """A Megatron indexed dataset, read lazily (memory-mapped); every count and offset is checked
    against the file sizes when it is opened, so a truncated or foreign file is one clear error."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        bin_path, idx_path = paths(prefix)
        where = f"megatron:{prefix}"
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise PredistillError(f"{where}: no {p.name} (a Megatron dataset is PREFIX.bin + PREFIX.idx)")
        raw = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
        if len(raw) < _HEADER.size or bytes(raw[: len(MAGIC)]) != MAGIC:
            raise PredistillError(f"{where}: {idx_path.name} is not a Megatron index (no MMIDIDX header)")
        _, version, code, n, n_docs = _HEADER.unpack(bytes(raw[: _HEADER.size]))
        if version != VERSION:
            raise PredistillError(f"{where}: index version {version}; only version {VERSION} is known")
        if code not in TOKEN_DTYPES:
            raise PredistillError(f"{where}: dtype code {code} cannot hold token ids")
        expected = _HEADER.size + n * (4 + 8) + n_docs * 8
        if len(raw) != expected:
            extra = " (per-sequence modes: a multimodal dataset, not supported)" if len(raw) == expected + n else ""
            raise PredistillError(f"{where}: {idx_path.name} holds {len(raw)} bytes, its header says {expected}{extra}")
        off = _HEADER.size
        self.lengths = raw[off : off + 4 * n].view("<i4")
        off += 4 * n
        self.pointers = raw[off : off + 8 * n].view("<i8")
        off += 8 * n
        self.document_indices = raw[off : off + 8 * n_docs].view("<i8")
        self.dtype = np.dtype(DTYPES[code]).newbyteorder("<")
        item = self.dtype.itemsize
        size = bin_path.stat().st_size
        if np.any(self.lengths < 0) or int(self.lengths.astype(np.int64).sum()) * item != size:
            raise PredistillError(
                f"{where}: {bin_path.name} holds {size} bytes, the index's lengths say "
                f"{int(self.lengths.astype(np.int64).sum()) * item}"
            )
        if n and (
            self.pointers[0] != 0
            or np.any(self.pointers[1:] != self.pointers[:-1] + self.lengths[:-1].astype(np.int64) * item)
        ):
            raise PredistillError(f"{where}: sequence pointers are not the running sum of their lengths")
        d = self.document_indices
        if n_docs == 0 or d[0] != 0 or d[-1] != n or np.any(np.diff(d) < 0):
            raise PredistillError(f"{where}: document indices must rise from 0 to the number of sequences ({n})")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n_documents(self) -> int:
        return len(self.document_indices) - 1

    def sequence(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.lengths[i])], dtype=np.int64)

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's ids: its sequences back to back."""
        for k in range(self.n_documents):
            lo, hi = int(self.document_indices[k]), int(self.document_indices[k + 1])
            yield np.concatenate([self.sequence(i) for i in range(lo, hi)]) if hi > lo else np.zeros(0, np.int64)
