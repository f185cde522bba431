"""The selection format's one reader: every check that a selection is what `sample` wrote."""

import numpy as np
import pytest

from predistill.core.artifacts import PredistillError, sha256_file, write_manifest
from predistill.formats.selection import FORMAT, IDS_FILE, load_selection, top_fraction
from predistill.formats.store import TokenStore


def make_selection(directory, ids, store: TokenStore, **manifest):
    directory.mkdir(parents=True)
    np.save(directory / IDS_FILE, np.asarray(ids), allow_pickle=False)
    write_manifest(
        directory,
        {
            "format": FORMAT,
            "version": 1,
            "store_hash": store.hash,
            "n_instances": len(store),
            "selection_sha256": sha256_file(directory / IDS_FILE),
            **manifest,
        },
    )
    return directory


def test_a_valid_selection_loads_as_ascending_int64(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    ids = load_selection(make_selection(tmp_path / "s", np.array([0, 3, 7], dtype=np.int32), store), store)
    assert ids.dtype == np.int64 and ids.tolist() == [0, 3, 7]


@pytest.mark.parametrize(
    "ids,match",
    [
        ([3, 3, 7], "unique and ascending"),
        ([7, 3], "unique and ascending"),
        (np.zeros(0, dtype=np.int64), "keeps no instance"),
        ([0, 10**9], "outside the store"),
        ([-1, 2], "outside the store"),
        ([[0, 1]], "1-D integer array"),
        ([0.5, 1.5], "1-D integer array"),
    ],
)
def test_malformed_ids_are_refused(tiny_store, tmp_path, ids, match):
    store = TokenStore(tiny_store)
    directory = make_selection(tmp_path / "s", np.asarray(ids), store)
    with pytest.raises(PredistillError, match=match):
        load_selection(directory, store)


def test_an_edited_selection_is_refused(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    directory = make_selection(tmp_path / "s", [0, 1, 2], store)
    np.save(directory / IDS_FILE, np.array([0, 1, 5]), allow_pickle=False)  # edited after sampling
    with pytest.raises(PredistillError, match="changed since the selection was made"):
        load_selection(directory, store)


def test_a_selection_of_another_store_is_refused(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    directory = make_selection(tmp_path / "s", [0, 1], store)
    with pytest.raises(PredistillError, match="made from token store"):
        load_selection(directory, TokenStore(tiny_store / "val"))


def test_a_selection_applies_to_an_instance_aligned_retokenisation_of_its_store(tiny_store, tmp_path, source_specs):
    # a student with its own tokenizer trains on the same selected text (prepare --source store:DIR)
    from predistill.stages.prepare import PrepareConfig
    from predistill.stages.prepare import run as prepare
    from predistill.stages.tokenizer import TokenizerConfig
    from predistill.stages.tokenizer import run as train_tokenizer

    other = train_tokenizer(TokenizerConfig(sources=source_specs, out=str(tmp_path / "tok"), vocab_size=300))
    derived = TokenStore(
        prepare(PrepareConfig(sources=[f"store:{tiny_store}"], tokenizer=str(other), out=str(tmp_path / "derived")))
    )
    store = TokenStore(tiny_store)
    directory = make_selection(tmp_path / "s", [0, 2, 5], store)
    assert load_selection(directory, derived).tolist() == [0, 2, 5]
    assert derived.decode(2).replace(derived.tokenizer().eos_token, "") == store.decode(2).replace(
        store.tokenizer().eos_token, ""
    )
    with pytest.raises(PredistillError, match="made from token store"):  # its val split derives from val, not the store
        load_selection(directory, TokenStore(derived.dir / "val"))


def test_top_fraction_keeps_the_floor_of_ratio_n_highest_in_corpus_order():
    assert top_fraction(np.array([0.1, 0.9, np.nan, 0.5]), 0.5).tolist() == [1, 3]
