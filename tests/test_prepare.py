"""`predistill prepare`: MiniPLM chunking, held-out split, manifest, determinism, crash safety,
and bad input through the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_code, make_prose, write_jsonl

from predistill import cli
from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_tokenizer, tokenizer_hash
from predistill.stages.prepare import PrepareConfig, _is_val, run
from predistill.text.chunking import Chunker, boundary_table

MAX_LEN = 64


@pytest.fixture(autouse=True)
def only_built_stages(monkeypatch):
    """Run the CLI with this issue's subcommands only: independent of stages under construction."""
    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in ("tokenizer", "prepare")})


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def domain_docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def encoded_stream(tok, docs: list[str]) -> list[int]:
    return sum((tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in docs), [])


def split_docs(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    val = [d for i, d in enumerate(docs) if _is_val(i, fraction)]
    return [d for i, d in enumerate(docs) if not _is_val(i, fraction)], val


def assert_no_complete_store(out: Path) -> None:
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert not partial.exists()


# -- chunking semantics -----------------------------------------------------------------------


def test_instances_concatenate_back_to_the_documents(tiny_store, corpus, bpe_tokenizer):
    tok = load_tokenizer(str(bpe_tokenizer))
    for split, store in (("train", TokenStore(tiny_store)), ("val", TokenStore(tiny_store / "val"))):
        assert store.lengths.max() <= MAX_LEN + 1 and store.lengths.min() >= 1
        assert store.domain_names == ["prose", "code"]
        for d, name in enumerate(store.domain_names):
            train, val = split_docs(domain_docs(corpus[name]), 0.1)
            ids = np.flatnonzero(store.domain_ids == d)
            # domains never mix: each domain's instances are one contiguous run, in source order
            assert ids.tolist() == list(range(ids[0], ids[-1] + 1))
            stream = np.concatenate([store[int(i)] for i in ids]).tolist()
            # nothing lost, nothing duplicated, nothing reordered
            assert stream == encoded_stream(tok, train if split == "train" else val)


def test_cuts_land_after_a_boundary_when_one_exists_in_the_second_half(tiny_store, corpus, bpe_tokenizer):
    """A cut lands right after the last token in the window that is a boundary (EOS, or text
    ending a line or sentence) and ends a pre-tokenizer word, when one lies in its second half;
    else after the last token that ends a word there; else at the full window."""
    tok = load_tokenizer(str(bpe_tokenizer))
    is_boundary = boundary_table(tok)
    assert is_boundary[tok.eos_token_id] and is_boundary[tok.convert_tokens_to_ids("Ċ")]  # EOS and "\n"
    store = TokenStore(tiny_store)
    window = MAX_LEN + 1
    n_trimmed = 0
    for d, name in enumerate(store.domain_names):
        train, _ = split_docs(domain_docs(corpus[name]), 0.1)
        can_end = []
        for doc in train:
            enc = tok.backend_tokenizer.encode(doc, add_special_tokens=False)
            words = enc.word_ids
            for j, t in enumerate(enc.ids):
                ok = j + 1 == len(words) or words[j + 1] != words[j]
                if ok and j + 1 < len(words):  # whitespace after whitespace would merge at the end
                    start, end = enc.word_to_chars(words[j])
                    ok = not (doc[start:end].isspace() and start > 0 and doc[start - 1].isspace())
                can_end.append(2 if ok and is_boundary[t] else int(ok))
            can_end.append(2)  # after EOS
        can_end = np.array(can_end)
        ids = np.flatnonzero(store.domain_ids == d)
        pos = 0
        for k, i in enumerate(ids):
            instance = store[int(i)]
            w = can_end[pos : pos + window]
            if k == len(ids) - 1:
                assert len(instance) == len(w)  # the remainder is flushed whole
            else:
                assert len(w) == window
                ends = np.flatnonzero(w == 2)
                second_half = ends[ends + 1 >= window // 2]
                words_end = np.flatnonzero(w >= 1)
                late_word_ends = words_end[words_end + 1 >= window // 2]
                if len(second_half):
                    assert len(instance) == second_half[-1] + 1  # right after the last boundary
                    assert is_boundary[instance[-1]]
                    n_trimmed += len(instance) < window
                elif len(late_word_ends):
                    assert len(instance) == late_word_ends[-1] + 1  # between words at least
                else:
                    assert len(instance) == window  # no word break late enough: a hard cut
            pos += len(instance)
        assert pos == len(can_end)
    assert n_trimmed > 10  # the rule was exercised


def test_chunker_unit():
    is_boundary = np.zeros(10, dtype=bool)
    is_boundary[0] = True  # EOS
    chunker = Chunker(max_len=7, is_boundary=is_boundary)  # window of 8
    doc = np.array([1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 0])
    out = list(chunker.add(doc)) + list(chunker.flush())
    assert [o.tolist() for o in out] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 1, 2, 3, 4], [5, 6, 7, 0]]
    chunker = Chunker(max_len=7, is_boundary=is_boundary)
    # a boundary in the first half does not trim (it would keep less than half the window)
    out = list(chunker.add(np.array([1, 0, 3, 4, 5, 6, 7, 8, 9]))) + list(chunker.flush())
    assert [o.tolist() for o in out] == [[1, 0, 3, 4, 5, 6, 7, 8], [9]]
    # explicit per-token permissions override the table (a boundary token inside a word)
    chunker = Chunker(max_len=7, is_boundary=is_boundary)
    can_end = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    out = list(chunker.add(np.array([1, 2, 3, 4, 5, 0, 7, 8, 9, 1]), can_end)) + list(chunker.flush())
    assert [o.tolist() for o in out] == [[1, 2, 3, 4, 5], [0, 7, 8, 9, 1]]
    # a boundary between words (2) wins over a later plain word break (1)
    chunker = Chunker(max_len=7, is_boundary=is_boundary)
    levels = np.array([0, 0, 0, 2, 0, 1, 0, 0, 0, 0], dtype=np.int8)
    out = list(chunker.add(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1]), levels)) + list(chunker.flush())
    assert [o.tolist() for o in out] == [[1, 2, 3, 4], [5, 6, 7, 8, 9, 1]]


def test_val_split_is_whole_documents_spread_evenly():
    held = [i for i in range(100) if _is_val(i, 0.1)]
    assert held == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    for f in (0.05, 0.29, 0.3, 0.5, 0.07):
        for n in (1, 10, 57, 100, 1000):  # after n documents exactly ⌊n·f⌋ are held out
            assert sum(_is_val(i, f) for i in range(n)) == int(n * round(f * 100)) // 100
    assert not any(_is_val(i, 0.0) for i in range(100))


def test_manifest_counts_match_the_files(tiny_store, bpe_tokenizer):
    tok = load_tokenizer(str(bpe_tokenizer))
    for directory, n_docs in ((tiny_store, 108), (tiny_store / "val", 12)):
        m = json.loads((directory / "manifest.json").read_text())
        tokens = np.fromfile(directory / "tokens.bin", dtype=m["dtype"])
        offsets = np.load(directory / "offsets.npy")
        domains = np.load(directory / "domains.npy")
        assert m["complete"] is True and m["format"] == "token_store"
        assert m["dtype"] == "uint16" and m["vocab_size"] == len(tok) == 512
        assert m["eos_id"] == tok.eos_token_id and m["tokenizer"]["hash"] == tokenizer_hash(tok)
        assert m["n_tokens"] == len(tokens) == offsets[-1] and offsets.dtype == np.int64
        assert m["n_instances"] == len(offsets) - 1 == len(domains)
        assert m["n_documents"] == n_docs == (tokens == tok.eos_token_id).sum()
        for d, dom in enumerate(m["domains"]):
            lengths = np.diff(offsets)[domains == d]
            assert dom["n_instances"] == len(lengths) and dom["n_tokens"] == lengths.sum()
            assert dom["n_documents"] == n_docs // 2 and dom["n_skipped"] == 0
        assert sum(d["n_tokens"] for d in m["domains"]) == m["n_tokens"]
        assert m["config"]["max_len"] == MAX_LEN and m["config"]["val_fraction"] == 0.1
        assert (directory / "tokenizer" / "tokenizer.json").is_file()
        assert tokenizer_hash(TokenStore(directory).tokenizer()) == m["tokenizer"]["hash"]


def test_decoded_instances_retokenize_to_the_same_ids(tiny_store):
    for directory in (tiny_store, tiny_store / "val"):
        store = TokenStore(directory)
        tok = store.tokenizer()
        for i in range(len(store)):
            assert tok.encode(store.decode(i), add_special_tokens=False) == store[i].tolist(), i


# -- determinism, reruns, crash safety ----------------------------------------------------------


def test_workers_give_identical_files(tmp_path, source_specs, bpe_tokenizer, tiny_store):
    out = run(
        PrepareConfig(
            sources=source_specs,
            tokenizer=str(bpe_tokenizer),
            out=str(tmp_path / "w2"),
            max_len=MAX_LEN,
            val_fraction=0.1,
            workers=2,
        )
    )
    assert file_hashes(out) == file_hashes(tiny_store)  # tiny_store was made with one worker


def test_rerun_is_a_noop_and_other_configs_are_refused(tmp_path, source_specs, bpe_tokenizer, capsys):
    cfg = PrepareConfig(
        sources=source_specs, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"), max_len=MAX_LEN, val_fraction=0.1
    )
    out = run(cfg)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    run(cfg)
    assert "already complete; nothing to do" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(PredistillError, match="another config"):
        run(PrepareConfig(**{**cfg.__dict__, "max_len": 32}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(PredistillError, match="not a token store; refusing"):
        run(PrepareConfig(**{**cfg.__dict__, "out": str(foreign)}))
    assert (foreign / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PredistillError, match="not a directory"):
        run(PrepareConfig(**{**cfg.__dict__, "out": str(tmp_path / "file")}))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [None, 2000])  # None: killed before its first checkpoint
def test_sigkill_leaves_nothing_complete_and_rerun_is_byte_identical(tmp_path, bpe_tokenizer, checkpoint):
    big = write_jsonl(tmp_path / "big.jsonl", make_prose(2500, seed=3))
    code = write_jsonl(tmp_path / "code.jsonl", make_code(200, seed=4))
    args = [
        "prepare",
        "--source",
        f"jsonl:{big}",
        "--source",
        f"jsonl:{code}",
        "--tokenizer",
        str(bpe_tokenizer),
        "--max-len",
        str(MAX_LEN),
        "--val-fraction",
        "0.05",
    ]
    args += ["--checkpoint-tokens", str(checkpoint)] if checkpoint else []
    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "predistill", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tokens = partial / "tokens.bin"
            if tokens.exists() and tokens.stat().st_size > 20_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prepare finished before it could be killed; make the corpus bigger"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the killed run left only its staging directory, which claims nothing
    assert not out.exists()
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    assert not (partial / "val" / "manifest.json").exists()
    with pytest.raises(PredistillError):
        TokenStore(partial)
    assert (partial / "progress.json").is_file() == bool(checkpoint)
    cli.main([*args, "--out", str(out)])  # rerun: resumes from the last checkpoint, if any
    assert not partial.exists()
    cli.main([*args, "--out", str(tmp_path / "clean")])  # an uninterrupted run
    assert file_hashes(out) == file_hashes(tmp_path / "clean")
    assert TokenStore(out).manifest["n_documents"] == 2565  # 2700 - 135 held out


def test_max_tokens_per_domain(tmp_path, source_specs, bpe_tokenizer, corpus, capsys):
    out = tmp_path / "capped"
    cli.main(
        [
            "prepare",
            "--source",
            source_specs[0],
            "--source",
            source_specs[1],
            "--tokenizer",
            str(bpe_tokenizer),
            "--out",
            str(out),
            "--max-len",
            str(MAX_LEN),
            "--val-fraction",
            "0.1",
            "--max-tokens-per-domain",
            "2000",
        ]
    )
    assert "wrote" in capsys.readouterr().out
    train, val = TokenStore(out), TokenStore(out / "val")
    assert train.manifest["config"]["max_tokens_per_domain"] == 2000
    tok = train.tokenizer()
    for d, name in enumerate(train.domain_names):
        total = int(train.lengths[train.domain_ids == d].sum() + val.lengths[val.domain_ids == d].sum())
        docs = domain_docs(corpus[name])
        n_docs = train.manifest["domains"][d]["n_documents"] + val.manifest["domains"][d]["n_documents"]
        assert 0 < n_docs < len(docs)
        # the first n_docs documents, and just enough of them: one fewer would stay under the cap
        assert total == len(encoded_stream(tok, docs[:n_docs])) >= 2000
        assert len(encoded_stream(tok, docs[: n_docs - 1])) < 2000
    # the same with two workers: identical files
    cli.main(
        [
            "prepare",
            "--source",
            source_specs[0],
            "--source",
            source_specs[1],
            "--tokenizer",
            str(bpe_tokenizer),
            "--out",
            str(tmp_path / "capped2"),
            "--max-len",
            str(MAX_LEN),
            "--val-fraction",
            "0.1",
            "--max-tokens-per-domain",
            "2000",
            "--workers",
            "2",
        ]
    )
    assert file_hashes(out) == file_hashes(tmp_path / "capped2")


# -- bad input through the CLI ------------------------------------------------------------------

BAD_LINES = {
    "malformed": (b'{"text": "ok"\n', ":3: malformed JSON"),
    "utf8": (b'{"text": "caf\xe9"}\n', ":3: invalid UTF-8"),
    "empty": (b'{"text": ""}\n', ":3: empty document"),
    "missing": (b'{"body": "x"}\n', ":3: missing field 'text'"),
    "nonstring": (b'{"text": null}\n', ":3: field 'text' is NoneType, not a string"),
}


def bad_corpus(tmp_path: Path, line: bytes) -> Path:
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": d}).encode() + b"\n" for d in make_prose(40, seed=5)]
    path.write_bytes(b"".join(good[:2]) + line + b"".join(good[2:]))
    return path


def prepare_fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(["prepare", *argv])
    assert info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith("predistill prepare: error: ")
    return err[0]


# every kind with one process; two kinds also through the worker pool (the source is read in
# the pool's feeder thread there, and its error must still come out as one line)
@pytest.mark.parametrize("kind, workers", [(k, 1) for k in BAD_LINES] + [("malformed", 2), ("utf8", 2)])
def test_bad_documents_fail_cleanly(tmp_path, capsys, bpe_tokenizer, kind, workers):
    line, message = BAD_LINES[kind]
    path = bad_corpus(tmp_path, line)
    out = tmp_path / "out"
    argv = [
        "--source",
        f"jsonl:{path}",
        "--tokenizer",
        str(bpe_tokenizer),
        "--out",
        str(out),
        "--max-len",
        "32",
        "--workers",
        str(workers),
    ]
    err = prepare_fails(capsys, argv)
    assert f"{path}{message}" in err and "--skip-bad" in err
    assert_no_complete_store(out)
    # --skip-bad: skipped and counted
    cli.main(["prepare", *argv, "--skip-bad"])
    m = TokenStore(out).manifest
    assert m["domains"][0]["n_skipped"] == 1 and m["n_documents"] == 40


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "csv:x.csv"], "unknown source 'csv:x.csv'"),
        (["--source", "builtin:klingon"], "unknown built-in source 'klingon'"),
        (["--source", "txt:/nonexistent/*.txt"], "no such file"),
        (["--source", "builtin:shakespeare", "--tokenizer", "/nonexistent/tokenizer"], "no such model directory"),
        (["--source", "builtin:shakespeare", "--tokenizer", "preset:tiny"], "architecture without a tokenizer"),
        (["--source", "builtin:shakespeare", "--val-fraction", "1.5"], "--val-fraction must be finite and in [0, 1)"),
        (["--source", "builtin:shakespeare", "--max-len", "4"], "--max-len must be ≥ 8"),
    ],
)
def test_bad_arguments_fail_cleanly(tmp_path, capsys, bpe_tokenizer, argv, message):
    out = tmp_path / "out"
    if "--tokenizer" not in argv:
        argv = [*argv, "--tokenizer", str(bpe_tokenizer)]
    assert message in prepare_fails(capsys, [*argv, "--out", str(out)])
    assert_no_complete_store(out)


def test_unknown_hub_tokenizer_fails_fast_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    err = prepare_fails(
        capsys, ["--source", "builtin:shakespeare", "--tokenizer", "no-such-model-xyz", "--out", str(tmp_path / "out")]
    )
    assert "cannot load tokenizer 'no-such-model-xyz'" in err and time.time() - start < 30
    assert_no_complete_store(tmp_path / "out")


def test_too_few_documents_for_the_val_split(tmp_path, capsys, bpe_tokenizer):
    path = write_jsonl(tmp_path / "few.jsonl", make_prose(3, seed=6))
    err = prepare_fails(
        capsys,
        [
            "--source",
            f"jsonl:{path}",
            "--tokenizer",
            str(bpe_tokenizer),
            "--out",
            str(tmp_path / "out"),
            "--val-fraction",
            "0.1",
        ],
    )
    assert "holds out no document" in err
    assert_no_complete_store(tmp_path / "out")


# -- other source kinds and the real teacher tokenizer ---------------------------------------------


def test_prepare_reads_parquet_and_hf_sources(tmp_path, bpe_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_sources import write_hf_dataset

    docs = make_prose(12, seed=7)
    pq.write_table(pa.table({"text": docs}), tmp_path / "p.parquet")
    write_hf_dataset(tmp_path / "ds", [{"text": d} for d in docs])
    out = run(
        PrepareConfig(
            sources=[f"a=parquet:{tmp_path / 'p.parquet'}", f"b=hf:{tmp_path / 'ds'}"],
            tokenizer=str(bpe_tokenizer),
            out=str(tmp_path / "out"),
            max_len=MAX_LEN,
        )
    )
    store = TokenStore(out)
    assert store.domain_names == ["a", "b"]
    a, b = (np.concatenate([store[int(i)] for i in np.flatnonzero(store.domain_ids == d)]) for d in (0, 1))
    assert a.tolist() == b.tolist() == encoded_stream(store.tokenizer(), docs)


@pytest.mark.teacher
@pytest.mark.slow
def test_smollm2_store_of_the_builtin_corpus_retokenizes(tmp_path):
    out = run(
        PrepareConfig(
            sources=["builtin:shakespeare", "builtin:python"],
            tokenizer="smollm2-135m",
            out=str(tmp_path / "s"),
            max_len=256,
            val_fraction=0.5,
            workers=2,
            max_tokens_per_domain=60_000,
        )
    )
    store = TokenStore(out)
    m = store.manifest
    assert m["vocab_size"] == 49152 and m["dtype"] == "uint16" and m["eos_id"] == 0
    assert store.domain_names == ["shakespeare", "python"]
    assert store.lengths.max() <= 257
    tok = store.tokenizer()
    for i in range(len(store)):
        assert tok.encode(store.decode(i), add_special_tokens=False) == store[i].tolist(), i
    val = TokenStore(out / "val")
    for d in m["domains"]:
        assert d["n_tokens"] > 0
    assert sum(v["n_tokens"] for v in val.manifest["domains"]) > 0


@pytest.mark.parametrize("where", ["right after a checkpoint", "between checkpoints", "in the second domain"])
def test_an_interrupted_prepare_resumes_from_its_checkpoint_byte_identical(
    tmp_path, bpe_tokenizer, corpus, monkeypatch, capsys, where
):
    import predistill.stages.prepare as prepare_module

    cfg = dict(
        sources=[f"prose=jsonl:{corpus['prose']}", f"code=jsonl:{corpus['code']}"],
        tokenizer=str(bpe_tokenizer),
        max_len=MAX_LEN,
        val_fraction=0.1,
        checkpoint_tokens=300,
    )
    clean = run(PrepareConfig(out=str(tmp_path / "clean"), **cfg))
    n = {"checkpoints": 0, "emitted": 0}
    save, emit = prepare_module._save_progress, prepare_module._emit

    def save_then_stop(*a, **k):
        save(*a, **k)
        n["checkpoints"] += 1
        n["emitted"] = 0
        if where == "right after a checkpoint" and n["checkpoints"] == 3:
            raise KeyboardInterrupt
        if where == "in the second domain" and a[4] == 1 and a[5] > 0:  # domain 1, a document in
            raise KeyboardInterrupt

    def emit_then_stop(*a, **k):
        emit(*a, **k)
        n["emitted"] += 1
        if where == "between checkpoints" and n["checkpoints"] == 2 and n["emitted"] == 3:
            raise KeyboardInterrupt  # instances appended after the last checkpoint are dropped on resume

    monkeypatch.setattr(prepare_module, "_save_progress", save_then_stop)
    monkeypatch.setattr(prepare_module, "_emit", emit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(PrepareConfig(out=str(tmp_path / "resumed"), **cfg))
    assert (tmp_path / "resumed.partial" / "progress.json").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.undo()
    capsys.readouterr()
    resumed = run(PrepareConfig(out=str(tmp_path / "resumed"), **cfg))
    assert "resuming" in capsys.readouterr().err
    assert file_hashes(resumed) == file_hashes(clean)
    assert not (tmp_path / "resumed.partial").exists()


def test_a_resume_after_an_input_changed_starts_over_and_never_mixes_old_and_new_text(
    tmp_path, bpe_tokenizer, corpus, monkeypatch, capsys
):
    import shutil

    import predistill.stages.prepare as prepare_module

    source = tmp_path / "prose.jsonl"
    shutil.copy(corpus["prose"], source)
    cfg = dict(sources=[f"prose=jsonl:{source}"], tokenizer=str(bpe_tokenizer), max_len=MAX_LEN, checkpoint_tokens=300)
    save, n = prepare_module._save_progress, {"checkpoints": 0}

    def save_then_stop(*a, **k):
        save(*a, **k)
        n["checkpoints"] += 1
        if n["checkpoints"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_save_progress", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(PrepareConfig(out=str(tmp_path / "resumed"), **cfg))
    monkeypatch.undo()
    with open(source, "a") as f:  # the source is edited while the prepare is down
        f.write(json.dumps({"text": "A new document written after the kill."}) + "\n")
    capsys.readouterr()
    resumed = run(PrepareConfig(out=str(tmp_path / "resumed"), **cfg))
    assert "resuming" not in capsys.readouterr().err
    assert file_hashes(resumed) == file_hashes(run(PrepareConfig(out=str(tmp_path / "clean"), **cfg)))


def test_a_second_writer_of_one_output_is_refused_while_the_first_holds_it(tmp_path, bpe_tokenizer, corpus):
    import os

    from predistill.core.artifacts import STAGING_MARK, lock_dir
    from predistill.formats.store import FORMAT

    out = tmp_path / "store"
    staging = tmp_path / "store.partial"
    staging.mkdir()
    (staging / STAGING_MARK).write_text(FORMAT)  # what a running prepare into OUT holds
    held = lock_dir(staging, out)
    try:
        with pytest.raises(PredistillError, match="being written by another predistill process"):
            run(PrepareConfig(sources=[f"jsonl:{corpus['prose']}"], tokenizer=str(bpe_tokenizer), out=str(out)))
        assert staging.is_dir() and not out.exists()  # the first writer's work is untouched
    finally:
        os.close(held)
    run(PrepareConfig(sources=[f"jsonl:{corpus['prose']}"], tokenizer=str(bpe_tokenizer), out=str(out)))
    assert (out / "manifest.json").is_file() and not staging.exists()


def slow_twin(bpe_tokenizer, out: Path):
    """The test BPE tokenizer as a slow (pure Python) GPT-2 tokenizer: no Rust implementation."""
    from transformers import GPT2Tokenizer

    model = json.loads((Path(bpe_tokenizer) / "tokenizer.json").read_text())["model"]
    out.mkdir()
    (out / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return GPT2Tokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        add_prefix_space=False,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slow_only_tokenizer_is_loaded_with_a_warning_and_prepares_a_store(
    bpe_tokenizer, corpus, tmp_path, monkeypatch, capsys, workers
):
    import transformers

    slow = slow_twin(bpe_tokenizer, tmp_path / "slow")
    assert not slow.is_fast
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: slow))
    tokenizer = load_tokenizer(str(tmp_path / "slow"))
    assert "no fast (Rust) implementation" in capsys.readouterr().err
    assert tokenizer_hash(tokenizer) == tokenizer_hash(slow_twin(bpe_tokenizer, tmp_path / "again"))
    out = run(
        PrepareConfig(
            sources=[f"jsonl:{corpus['prose']}"],
            tokenizer=str(tmp_path / "slow"),
            out=str(tmp_path / "store"),
            max_len=MAX_LEN,
            workers=workers,
        )
    )
    store = TokenStore(out)
    assert store.tokenizer_hash == tokenizer_hash(tokenizer) and len(store) > 10
    assert max(store.lengths) <= MAX_LEN + 1
    docs = domain_docs(corpus["prose"])
    text = "".join(store.decode(i) for i in range(len(store)))
    assert text.startswith(docs[0]) and text.count("<|endoftext|>") == len(docs)
