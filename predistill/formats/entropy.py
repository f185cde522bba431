"""Huffman coding of integer streams, with random access per block (the logits store's v2 ids and counts).

A stream codes values of an alphabet [0, n_direct) with a canonical, length-limited Huffman code
built from the values' own frequencies; values ≥ n_direct − 1 are written as the escape symbol
n_direct − 1 followed by the raw value in `raw_bits` bits (rare ids, or counts of a huge draw
budget). Codes are stored least significant bit first, each bit-reversed, so a decoder reads
`max_len` bits at any bit position and looks up (symbol, length) in one table.

The code lengths travel with the stream (4 bits each, `MAX_LEN` = 15), so a stream decodes alone.
A caller that needs random access keeps the bit offset of every block (e.g. an instance's entries):
`encode` returns each value's bit length, and `decode(buf, b0, b1)` decodes the values whose codes
fill bits [b0, b1). Decoding computes every bit position's table entry at once (numpy) and then
follows the chain of code starts (one Python step per value): about 1 µs per value.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

MAX_LEN = 15  # longest code: the decode table has 2^MAX_LEN entries, lengths fit in 4 bits
WINDOW = 8  # zero bytes after a stream: decoding reads 8-byte windows


def code_lengths(freq: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths [n] for symbol frequencies [n] (0 for unused symbols), none longer
    than `max_len`: the frequencies are flattened (halved, kept ≥ 1) until the longest code fits.
    Deterministic: ties are broken by node number."""
    freq = np.asarray(freq, np.int64)
    lengths = np.zeros(len(freq), np.int64)
    used = np.flatnonzero(freq)
    if len(used) == 1:
        lengths[used] = 1  # a single symbol still needs one bit per value to be counted
    if len(used) <= 1:
        return lengths
    weights = freq[used]
    while True:
        heap = [(int(w), k) for k, w in enumerate(weights)]
        heapq.heapify(heap)
        parent = list(range(len(used)))
        while len(heap) > 1:
            w1, a = heapq.heappop(heap)
            w2, b = heapq.heappop(heap)
            parent[a] = parent[b] = len(parent)
            parent.append(len(parent))
            heapq.heappush(heap, (w1 + w2, parent[a]))
        depth = [0] * len(parent)
        for node in range(len(parent) - 2, -1, -1):  # parents have higher numbers than children
            depth[node] = depth[parent[node]] + 1
        if max(depth[: len(used)]) <= max_len:
            lengths[used] = depth[: len(used)]
            return lengths
        weights = np.maximum(weights // 2, 1)


def _reversed(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros_like(codes)
    for bit in range(int(lengths.max(initial=0))):
        out |= ((codes >> bit) & 1) << np.maximum(lengths - 1 - bit, 0)
    return np.where(lengths > 0, out, 0)


@dataclass(frozen=True)
class Code:
    """A canonical Huffman code over [0, n_direct) (the last symbol is the escape)."""

    lengths: np.ndarray  # [n_direct] int64, 0 = unused
    raw_bits: int  # bits of an escaped value

    @property
    def n_direct(self) -> int:
        return len(self.lengths)

    @staticmethod
    def fit(values: np.ndarray, n_direct: int, raw_bits: int) -> Code:
        symbols = np.minimum(np.asarray(values, np.int64), n_direct - 1)
        return Code(code_lengths(np.bincount(symbols, minlength=n_direct)), raw_bits)

    def codes(self) -> np.ndarray:
        """Canonical codes, bit-reversed for LSB-first streams: symbols sorted by (length, symbol)."""
        order = np.lexsort((np.arange(self.n_direct), self.lengths))
        order = order[self.lengths[order] > 0]
        codes = np.zeros(self.n_direct, np.int64)
        code, prev = 0, int(self.lengths[order[0]]) if len(order) else 0
        for s in order:
            code <<= int(self.lengths[s]) - prev
            prev = int(self.lengths[s])
            codes[s] = code
            code += 1
        return _reversed(codes, self.lengths)

    def to_bytes(self) -> bytes:
        """The lengths, 4 bits each (two per byte, low nibble first)."""
        nib = np.zeros(self.n_direct + (self.n_direct & 1), np.uint8)
        nib[: self.n_direct] = self.lengths
        return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()

    @staticmethod
    def from_bytes(data: np.ndarray, n_direct: int, raw_bits: int) -> Code:
        data = np.asarray(data, np.uint8)
        if len(data) != (n_direct + 1) // 2:
            raise ValueError(f"code table has {len(data)} bytes, expected {(n_direct + 1) // 2}")
        lengths = np.stack([data & 15, data >> 4], axis=1).reshape(-1)[:n_direct].astype(np.int64)
        if (np.exp2(-lengths[lengths > 0].astype(np.float64))).sum() > 1 + 1e-12:
            raise ValueError("code lengths violate the Kraft inequality (corrupt table)")
        return Code(lengths, raw_bits)


def encode(values: np.ndarray, code: Code) -> tuple[bytes, np.ndarray]:
    """(stream bytes + WINDOW zero bytes, bit length of each value's code)."""
    values = np.asarray(values, np.int64)
    esc = code.n_direct - 1
    symbols = np.minimum(values, esc)
    if len(values) and (code.lengths[symbols] == 0).any():
        raise ValueError("a value's symbol has no code (the code was fitted to other values)")
    lengths = code.lengths[symbols]
    words = code.codes()[symbols]
    escaped = symbols == esc
    too_big = (values[escaped] >> code.raw_bits).any() if code.raw_bits else (values > esc).any()
    if len(values) and too_big:
        raise ValueError(f"a value past the direct symbols does not fit in {code.raw_bits} raw bits")
    if code.raw_bits:  # raw value after the escape code
        words = words | np.where(escaped, values << lengths, 0)
    nbits = lengths + np.where(escaped, code.raw_bits, 0)
    total = int(nbits.sum())
    starts = np.cumsum(nbits) - nbits
    owner = np.repeat(np.arange(len(values)), nbits)
    within = np.arange(total) - starts[owner]
    bits = ((words[owner] >> within) & 1).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes() + bytes(WINDOW), nbits


class Decoder:
    """Table-driven decoding of one code (build once per stream, reuse for every block)."""

    def __init__(self, code: Code):
        self.code = code
        self.width = int(code.lengths.max(initial=1)) or 1
        size = 1 << self.width
        self.symbol = np.zeros(size, np.int64)
        self.length = np.zeros(size, np.int64)  # 0: no code starts with these bits (corrupt stream)
        codes = code.codes()
        for s in np.flatnonzero(code.lengths):
            n = int(code.lengths[s])
            fill = int(codes[s]) + (np.arange(1 << (self.width - n), dtype=np.int64) << n)
            self.symbol[fill], self.length[fill] = s, n

    def decode(self, buf: np.ndarray, b0: int, b1: int) -> np.ndarray:
        """The values whose codes fill bits [b0, b1) of `buf` (uint8, WINDOW-padded)."""
        if b1 <= b0:
            return np.zeros(0, np.int64)
        if b1 > (len(buf) - WINDOW) * 8:
            raise ValueError("block runs past the end of the stream")
        pos = np.arange(b0, b1, dtype=np.int64)
        entry = _windows(buf, pos) & ((1 << self.width) - 1)
        length, symbol = self.length[entry], self.symbol[entry]
        esc = self.code.n_direct - 1
        step = (length + np.where(symbol == esc, self.code.raw_bits, 0)).tolist()
        start_list: list[int] = []
        p, end = 0, b1 - b0
        while p < end:
            if step[p] == 0:
                raise ValueError("invalid code in stream (corrupt data)")
            start_list.append(p)
            p += step[p]
        if p != end:
            raise ValueError("block does not end on a code boundary (corrupt data)")
        starts = np.asarray(start_list, np.int64)
        values = symbol[starts]
        escaped = np.flatnonzero(values == esc)
        if len(escaped) and self.code.raw_bits:
            raw_at = pos[starts[escaped]] + length[starts[escaped]]
            values[escaped] = _windows(buf, raw_at) & ((1 << self.code.raw_bits) - 1)
        return values


def _windows(buf: np.ndarray, bitpos: np.ndarray) -> np.ndarray:
    """64-bit little-endian words starting at each bit position (≥ 57 valid bits), as int64."""
    window = buf[(bitpos >> 3)[:, None] + np.arange(8)]
    word = np.ascontiguousarray(window).view("<u8")[:, 0] >> (bitpos & 7).astype(np.uint64)
    return (word & np.uint64((1 << 62) - 1)).astype(np.int64)
