"""`predistill tokenizer`: a byte-level BPE saved as an HF tokenizer directory."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from predistill import cli
from predistill.core.artifacts import read_manifest
from predistill.modeling.models import load_tokenizer
from predistill.stages.tokenizer import EOS

TEXTS = [
    "Hello, world!",
    "  leading spaces\tand tabs\n\nnewlines ",
    "naïve café — 日本語 🤖 ∑x²",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|endoftext|> is a special token",
    "\x00\x7f\u200b",
]


def test_trained_tokenizer_loads_and_round_trips(bpe_tokenizer):
    tok = AutoTokenizer.from_pretrained(bpe_tokenizer)
    assert tok.is_fast
    assert tok.eos_token == EOS and tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert len(tok) == 512
    for text in TEXTS:  # byte level: any text, unicode included, comes back exactly
        ids = tok.encode(text, add_special_tokens=False)
        assert max(ids) < 512
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    assert read_manifest(bpe_tokenizer, "tokenizer")["vocab_size"] == 512
    assert load_tokenizer(str(bpe_tokenizer)).eos_token_id == tok.eos_token_id


@pytest.fixture(autouse=True)
def only_built_stages(monkeypatch):
    """Run the CLI with this issue's subcommands only: independent of stages under construction."""
    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in ("tokenizer", "prepare")})


def test_cli_tokenizer_respects_vocab_size(tmp_path, source_specs, capsys):
    out = tmp_path / "tok"
    cli.main(["tokenizer", *sum((["--source", s] for s in source_specs), []), "--out", str(out), "--vocab-size", "300"])
    assert f"wrote tokenizer {out}" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert not (tmp_path / "tok.partial").exists()
    text = "The noble king speaks of love and war . ünïcode"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # no space "clean-up"
    # same config again: nothing to do; another config or foreign content: refused
    cli.main(["tokenizer", *sum((["--source", s] for s in source_specs), []), "--out", str(out), "--vocab-size", "300"])
    assert "already complete" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "--source", source_specs[0], "--out", str(out), "--vocab-size", "300"])
    assert "another config" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "--source", source_specs[0], "--out", str(tmp_path / "foreign")])
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_cli_tokenizer_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(SystemExit) as info:
        cli.main(["tokenizer", "--source", f"jsonl:{bad}", "--out", str(tmp_path / "tok")])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"predistill tokenizer: error: {bad}:2: malformed JSON")
    assert not (tmp_path / "tok").exists() and not (tmp_path / "tok.partial").exists()
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "--source", f"jsonl:{bad}", "--out", str(tmp_path / "t"), "--vocab-size", "100"])
    assert "--vocab-size must be ≥ 257" in capsys.readouterr().err


def test_a_tokenizer_trained_on_a_token_stores_text(tiny_store, tmp_path, capsys):
    from predistill.formats.store import TokenStore

    out = tmp_path / "tok"
    cli.main(["tokenizer", "--source", f"store:{tiny_store}", "--out", str(out), "--vocab-size", "300"])
    tok = AutoTokenizer.from_pretrained(out)
    store = TokenStore(tiny_store)
    text = store.decode(0).replace(store.tokenizer().eos_token, "")
    assert len(tok) == 300 and tok.decode(tok.encode(text), clean_up_tokenization_spaces=False) == text
    assert read_manifest(out, "tokenizer")["config"]["store_hashes"] == [store.hash]
    capsys.readouterr()
    cli.main(["tokenizer", "--source", f"store:{tiny_store}", "--out", str(out), "--vocab-size", "300"])
    assert "already complete" in capsys.readouterr().err
