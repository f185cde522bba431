"""predistill.formats.entropy: Huffman-coded integer streams with per-block random access."""

from __future__ import annotations

import numpy as np
import pytest

from predistill.formats import entropy


def round_trip(values, n_direct, raw_bits, blocks):
    code = entropy.Code.fit(values, n_direct, raw_bits)
    data, nbits = entropy.encode(values, code)
    buf = np.frombuffer(data, np.uint8)
    table = entropy.Code.from_bytes(np.frombuffer(code.to_bytes(), np.uint8), n_direct, raw_bits)
    decoder = entropy.Decoder(table)
    bounds = np.concatenate([[0], np.cumsum(nbits)])[blocks]
    return [decoder.decode(buf, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])], nbits


@pytest.mark.parametrize("seed", range(4))
def test_any_block_decodes_to_its_values_with_escapes(seed):
    rng = np.random.default_rng(seed)
    # mostly small (direct symbols), some ≥ 63 (escaped: raw 17-bit value after the escape code)
    values = np.where(rng.random(3000) < 0.9, np.minimum(rng.zipf(1.3, 3000) - 1, 99999), rng.integers(0, 70000, 3000))
    cuts = np.unique(np.concatenate([[0, 3000], rng.integers(0, 3000, 40)]))
    decoded, _ = round_trip(values, 64, 17, cuts)
    for (a, b), got in zip(zip(cuts[:-1], cuts[1:]), decoded):
        np.testing.assert_array_equal(got, values[a:b])


def test_codes_are_near_the_entropy_and_length_limited():
    rng = np.random.default_rng(1)
    p = 0.5 ** np.arange(1, 41)  # geometric: an unlimited Huffman code would need 40-bit codes
    values = rng.choice(40, size=20000, p=p / p.sum())
    code = entropy.Code.fit(values, 41, 0)
    assert code.lengths.max() <= entropy.MAX_LEN
    _, nbits = entropy.encode(values, code)
    freq = np.bincount(values) / len(values)
    h = -(freq[freq > 0] * np.log2(freq[freq > 0])).sum()
    assert h <= nbits.mean() < h + 0.1


def test_single_symbol_and_empty_streams():
    (got,), nbits = round_trip(np.full(5, 7), 16, 0, [0, 5])
    np.testing.assert_array_equal(got, np.full(5, 7))
    assert (nbits == 1).all()
    (got,), _ = round_trip(np.zeros(0, np.int64), 16, 0, [0, 0])
    assert len(got) == 0


def test_corrupt_streams_and_tables_are_refused():
    values = np.arange(100) % 9
    code = entropy.Code.fit(values, 9, 0)
    data, nbits = entropy.encode(values, code)
    buf = np.frombuffer(data, np.uint8).copy()
    decoder = entropy.Decoder(code)
    with pytest.raises(ValueError, match="code boundary"):
        decoder.decode(buf, 0, int(nbits.sum()) - 1)  # a block that ends mid-code
    with pytest.raises(ValueError, match="past the end"):
        decoder.decode(buf, 0, len(buf) * 8)
    with pytest.raises(ValueError, match="Kraft"):
        entropy.Code.from_bytes(np.full(5, 0x11, np.uint8), 9, 0)  # nine 1-bit codes
    with pytest.raises(ValueError, match="raw bits"):
        entropy.encode(np.array([1 << 20]), entropy.Code.fit(np.array([1 << 20]), 9, 17))
    with pytest.raises(ValueError, match="no code"):
        entropy.encode(np.array([3]), entropy.Code.fit(np.array([1, 2]), 9, 0))
