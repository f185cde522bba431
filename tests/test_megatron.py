"""Megatron-LM indexed datasets: `export --format megatron` writes the published MMIDIDX layout,
`prepare --source megatron:PREFIX` imports one; checked against a reader and a writer written here
from the layout alone (not from predistill's code)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from predistill import cli
from predistill.core.artifacts import PredistillError
from predistill.formats import megatron
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_tokenizer
from predistill.stages.export import ExportConfig
from predistill.stages.export import run as export
from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare


def read_layout(prefix: Path) -> dict:
    """An independent reader: header, lengths, pointers, document indices, the .bin tokens."""
    data = Path(f"{prefix}.idx").read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, code, n, n_docs = struct.unpack("<QBQQ", data[9:34])
    lengths = np.frombuffer(data, "<i4", n, 34)
    pointers = np.frombuffer(data, "<i8", n, 34 + 4 * n)
    docs = np.frombuffer(data, "<i8", n_docs, 34 + 12 * n)
    assert len(data) == 34 + 12 * n + 8 * n_docs
    dtype = {4: "<i4", 8: "<u2"}[code]
    tokens = np.fromfile(f"{prefix}.bin", dtype=dtype)
    seqs = [tokens[p // np.dtype(dtype).itemsize :][:ln] for p, ln in zip(pointers, lengths)]
    return {"version": version, "code": code, "sequences": seqs, "document_indices": docs.tolist()}


def write_layout(prefix: Path, documents: list[list[list[int]]], code: int = 4) -> None:
    """An independent writer: documents of sequences, as Megatron's builder lays them out."""
    dtype = {4: "<i4", 8: "<u2", 5: "<i8", 7: "<f4"}[code]
    seqs = [np.asarray(s, dtype=dtype) for doc in documents for s in doc]
    ends = np.cumsum([len(doc) for doc in documents])
    Path(f"{prefix}.bin").write_bytes(b"".join(s.tobytes() for s in seqs))
    lengths = np.asarray([len(s) for s in seqs], "<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths * np.dtype(dtype).itemsize)[:-1]]).astype("<i8")
    doc_indices = np.concatenate([[0], ends]).astype("<i8")
    Path(f"{prefix}.idx").write_bytes(
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, code, len(seqs), len(doc_indices))
        + lengths.tobytes()
        + pointers.tobytes()
        + doc_indices.tobytes()
    )


def test_a_store_round_trips_through_the_megatron_layout_token_for_token(tiny_store, bpe_tokenizer, tmp_path):
    store = TokenStore(tiny_store)
    bin_path, idx_path = export(ExportConfig(store=str(tiny_store), out=str(tmp_path / "corpus")))
    layout = read_layout(tmp_path / "corpus")
    assert layout["version"] == 1 and layout["code"] == 8  # uint16: the vocabulary fits
    assert len(layout["sequences"]) == len(store)
    assert all(np.array_equal(layout["sequences"][i], store[i]) for i in range(len(store)))
    # a document ends where an instance ends with EOS: documents cut across instances are whole again
    ends = [i + 1 for i in range(len(store)) if store[i][-1] == store.eos_id]
    assert layout["document_indices"] == [0] + ends and ends[-1] == len(store) and len(ends) < len(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temporaries left

    # and back: the same token stream (each document keeps its one EOS)
    back = prepare(
        PrepareConfig(
            sources=[f"megatron:{tmp_path / 'corpus'}"],
            tokenizer=str(bpe_tokenizer),
            out=str(tmp_path / "back"),
            max_len=store.manifest["config"]["max_len"],
        )
    )
    imported = TokenStore(back)
    original = np.concatenate([store[i] for i in range(len(store))])
    assert np.array_equal(np.concatenate([imported[i] for i in range(len(imported))]), original)


def test_an_independently_written_dataset_imports(bpe_tokenizer, tmp_path):
    tok = load_tokenizer(str(bpe_tokenizer))
    a = tok.encode("def f(x):\n    return x + 1\n", add_special_tokens=False)
    b = tok.encode("The quick brown fox jumps over the lazy dog. " * 3, add_special_tokens=False)
    eos = tok.eos_token_id
    # document 1: two sequences (its text split in two, no EOS); document 2: one sequence ending in EOS
    write_layout(tmp_path / "ext", [[a[:5], a[5:]], [b + [eos]]], code=4)
    ds = megatron.IndexedDataset(tmp_path / "ext")
    assert len(ds) == 3 and ds.n_documents == 2
    store = TokenStore(
        prepare(
            PrepareConfig(
                sources=[f"megatron:{tmp_path / 'ext'}"],
                tokenizer=str(bpe_tokenizer),
                out=str(tmp_path / "s"),
                max_len=512,
            )
        )
    )
    assert store[0].tolist() == a + [eos] + b + [eos]  # documents joined, one EOS each
    assert store.domain_names == ["ext"] and store.manifest["domains"][0]["n_documents"] == 2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: Path(f"{p}.bin").write_bytes(Path(f"{p}.bin").read_bytes()[:-2]), "ext.bin holds"),
        (
            lambda p: Path(f"{p}.idx").write_bytes(b"XXIDIDX\x00\x00" + Path(f"{p}.idx").read_bytes()[9:]),
            "no MMIDIDX header",
        ),
        (
            lambda p: Path(f"{p}.idx").write_bytes(Path(f"{p}.idx").read_bytes() + bytes(2)),
            "(per-sequence modes: a multimodal dataset",
        ),
        (lambda p: Path(f"{p}.idx").unlink(), "no ext.idx"),
        (lambda p: write_layout(p, [[[1, 2], [3]]], code=7), "cannot hold token ids"),
        (lambda p: write_layout(p, [[[1, 2, 10_000]]]), "outside the tokenizer's vocabulary"),
    ],
)
def test_a_bad_dataset_is_one_clear_error(corrupt, message, bpe_tokenizer, tmp_path):
    write_layout(tmp_path / "ext", [[[1, 2], [3]]])
    corrupt(tmp_path / "ext")
    with pytest.raises(PredistillError, match=message.replace("(", r"\(")):
        prepare(
            PrepareConfig(
                sources=[f"megatron:{tmp_path / 'ext'}"],
                tokenizer=str(bpe_tokenizer),
                out=str(tmp_path / "s"),
                max_len=64,
            )
        )
    assert not (tmp_path / "s").exists()


def test_a_tokenizer_is_not_trained_on_token_ids(tmp_path, capsys):
    write_layout(tmp_path / "ext", [[[1, 2]]])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tokenizer", "--source", f"megatron:{tmp_path / 'ext'}", "--out", str(tmp_path / "t")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "holds token ids, not text" in err and len(err.strip().splitlines()) == 1
