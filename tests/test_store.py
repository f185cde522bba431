"""The token store format: writer/reader round trip, dtype choice, integrity checks, batches."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore, TokenStoreWriter, check_same_store, token_dtype

INSTANCES = [[5, 6, 7], [1], [9, 8, 7, 6, 5], [2, 0]]


def write_store(directory, vocab_size=100, instances=INSTANCES, domains=None):
    writer = TokenStoreWriter(directory, vocab_size)
    for i, ids in enumerate(instances):
        writer.append(np.asarray(ids), domain=(domains or [0] * len(instances))[i])
    writer.finish({"eos_id": 0, "tokenizer": {"hash": "t" * 64}, "domains": [{"name": "a"}, {"name": "b"}]})
    return directory


def test_token_dtype_boundary():
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(70_000) == np.uint32


def test_round_trip(tmp_path):
    store = TokenStore(write_store(tmp_path / "s", domains=[0, 1, 1, 0]))
    assert len(store) == 4
    assert [store[i].tolist() for i in range(4)] == INSTANCES
    assert store[-1].tolist() == [2, 0]
    assert store.lengths.tolist() == [3, 1, 5, 2]
    assert store.domain_ids.tolist() == [0, 1, 1, 0]
    assert store.domain_names == ["a", "b"]
    m = store.manifest
    assert (m["format"], m["dtype"], m["n_tokens"], m["n_instances"], m["complete"]) == (
        "token_store",
        "uint16",
        11,
        4,
        True,
    )
    assert np.fromfile(tmp_path / "s" / "tokens.bin", dtype=np.uint16).tolist() == sum(INSTANCES, [])
    assert np.load(tmp_path / "s" / "offsets.npy").tolist() == [0, 3, 4, 9, 11]
    assert np.load(tmp_path / "s" / "offsets.npy").dtype == np.int64
    with pytest.raises(IndexError):
        store[4]
    # the content hash identifies the content, not the path
    assert TokenStore(write_store(tmp_path / "t")).hash == store.hash
    check_same_store(store.hash, store, "a score table")
    with pytest.raises(PredistillError, match="made from token store"):
        check_same_store("0" * 64, store, "a score table")


def test_uint32_when_the_vocabulary_does_not_fit_in_16_bits(tmp_path):
    big = [[69_999, 65_536, 3], [65_535]]
    store = TokenStore(write_store(tmp_path / "s", vocab_size=70_000, instances=big))
    assert store.manifest["dtype"] == "uint32" and store.tokens.dtype == np.uint32
    assert (tmp_path / "s" / "tokens.bin").stat().st_size == 4 * 4
    assert [store[i].tolist() for i in range(2)] == big


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    writer = TokenStoreWriter(tmp_path / "s", 100)
    with pytest.raises(PredistillError, match="outside the vocabulary"):
        writer.append(np.array([1, 100]), 0)


def test_batch_pads_and_reports_lengths(tmp_path):
    store = TokenStore(write_store(tmp_path / "s"))
    tokens, lengths = store.batch([2, 1, 0])
    assert tokens.dtype == torch.long and lengths.tolist() == [5, 1, 3]
    assert tokens.tolist() == [[9, 8, 7, 6, 5], [1, 0, 0, 0, 0], [5, 6, 7, 0, 0]]  # padded with EOS (0)
    tokens, lengths = store.batch([2, 1], max_len=2, pad_id=-1)
    assert tokens.tolist() == [[9, 8], [1, -1]] and lengths.tolist() == [2, 1]
    batches = list(store.iter_batches(3))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2], [3]]
    assert batches[1][1].tolist() == [[2, 0]]


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-2]), "tokens.bin has 20 bytes"),
        (lambda d: np.save(d / "offsets.npy", np.array([0, 3, 4, 9], dtype=np.int64)), "offsets.npy disagrees"),
        (lambda d: np.save(d / "offsets.npy", np.array([0, 3, 9, 4, 11], dtype=np.int64)), "not strictly increasing"),
        (lambda d: np.save(d / "offsets.npy", np.array([0, 3, 4, 9, 11], dtype=np.int32)), "expected int64"),
        (lambda d: np.save(d / "domains.npy", np.zeros(3, dtype=np.int16)), "domains.npy has 3 entries"),
        (lambda d: _edit_manifest(d, n_tokens=12), "disagrees"),
        (lambda d: _edit_manifest(d, complete=False), "incomplete"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: _drop_manifest_key(d, "dtype"), "lacks dtype"),
        (lambda d: _edit_manifest(d, chunk_sha256=["0" * 64] * 2), "2 chunk checksums for 1 chunks"),
        (lambda d: (d / "offsets.npy").write_bytes(b"garbage"), "unreadable store index"),
        (lambda d: _edit_manifest(d, chunk_bytes=0), "chunk_bytes cannot be"),
        (lambda d: _edit_manifest(d, chunk_sha256=5), "chunk_sha256 cannot be"),
        (lambda d: _drop_manifest_key(d, "chunk_sha256"), "lacks chunk_sha256"),  # checksums switched off
        (lambda d: _drop_manifest_key(d, "offsets_sha256"), "lacks offsets_sha256"),
        (lambda d: _edit_manifest(d, domains_sha256=None), "domains_sha256 cannot be"),
        (lambda d: _edit_manifest(d, vocab_size="x"), "vocab_size cannot be"),
        (lambda d: _edit_manifest(d, dtype="int16"), "dtype cannot be"),  # same bytes, ids would read negative
        (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe{"), "unreadable manifest"),
        (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
        # instance boundaries moved, the total kept: the store hash covers them, and so does offsets_sha256
        (
            lambda d: np.save(d / "offsets.npy", np.array([0, 2, 4, 9, 11], dtype=np.int64)),
            "offsets.npy: changed since",
        ),
        (lambda d: np.save(d / "domains.npy", np.array([1, 0, 0, 0], dtype=np.int16)), "domains.npy: changed since"),
        (lambda d: _edit_manifest(d, version=99), "token store version 99"),
        (lambda d: _edit_manifest(d, domains="x"), "not a list of named domains"),
    ],
)
def test_corrupted_store_is_refused(tmp_path, corrupt, match):
    directory = write_store(tmp_path / "s")
    corrupt(directory)
    with pytest.raises(PredistillError, match=match):
        TokenStore(directory)


def _drop_manifest_key(directory, key):
    m = json.loads((directory / "manifest.json").read_text())
    del m[key]
    (directory / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(directory, **changes):
    m = json.loads((directory / "manifest.json").read_text())
    (directory / "manifest.json").write_text(json.dumps(m | changes))


def test_decode_is_exact(tiny_store):
    store = TokenStore(tiny_store)
    tok = store.tokenizer()
    for i in (0, len(store) // 2, len(store) - 1):
        text = store.decode(i)
        assert tok.encode(text, add_special_tokens=False) == store[i].tolist()


@pytest.mark.parametrize(
    "new_bytes, match",
    [
        (np.array([9], dtype=np.uint16), "chunk 0 changed since the store was written"),  # same size, other ids
    ],
)
def test_tokens_changed_in_place_are_refused_when_read(tmp_path, new_bytes, match):
    directory = write_store(tmp_path / "s")
    data = bytearray((directory / "tokens.bin").read_bytes())
    data[:2] = new_bytes.tobytes()
    (directory / "tokens.bin").write_bytes(bytes(data))
    store = TokenStore(directory)  # opening stays cheap: chunks are checked when first read
    with pytest.raises(PredistillError, match=match):
        store[0]


def test_an_id_outside_the_vocabulary_is_refused_when_read_even_with_matching_checksums(tmp_path):
    directory = write_store(tmp_path / "s")
    data = bytearray((directory / "tokens.bin").read_bytes())
    data[:2] = np.array([500], dtype=np.uint16).tobytes()  # vocabulary of 100
    (directory / "tokens.bin").write_bytes(bytes(data))
    _edit_manifest(directory, chunk_sha256=[hashlib.sha256(bytes(data)).hexdigest()])  # re-vouched by hand
    with pytest.raises(PredistillError, match="token id 500 in chunk 0 is outside the vocabulary"):
        TokenStore(directory).batch([1, 0])


def test_chunk_checksums_cover_the_whole_file(tmp_path, monkeypatch):
    import predistill.formats.store as store_module

    monkeypatch.setattr(store_module, "CHUNK_BYTES", 8)  # 4 uint16 ids per chunk: 11 ids → 3 chunks
    store = TokenStore(write_store(tmp_path / "s"))
    assert store.manifest["chunk_bytes"] == 8 and len(store.manifest["chunk_sha256"]) == 3
    assert [store[i].tolist() for i in range(4)] == INSTANCES
