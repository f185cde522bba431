"""`score --token-record`: per predicted position, the model's log-prob of the next token and the
entropy of its distribution, written in the scoring pass, 4 bytes per position, verified on read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ranks_by_hand, single_thread

from predistill.cli import main as cli_main
from predistill.core.artifacts import PredistillError
from predistill.formats.scores import ScoreTable
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import TokenRecord
from predistill.modeling.models import load_model
from predistill.stages.score import ScoreConfig, run

pytestmark = pytest.mark.usefixtures("one_thread")


def score(store, out: Path, record: Path, **kw) -> Path:
    return run(ScoreConfig(model="preset:tiny", store=str(store), out=str(out), token_record=str(record),
                           progress=False, **kw))  # fmt: skip


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recorded(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokrec")
    with single_thread():  # the reduction order of the subprocesses (two ranks below)
        score(tiny_store, root / "scores", root / "record", shard_size=40, batch_size=5)
    return root


def test_the_record_equals_a_direct_full_vocabulary_computation(tiny_store, recorded):
    store = TokenStore(tiny_store)
    record = TokenRecord(recorded / "record", store)
    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    model.eval()
    for i in [0, 1, 39, 40, len(store) - 1]:
        x = torch.as_tensor(np.asarray(store[i], dtype=np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.float()[0, :-1], dim=-1)
        expected_lp = logp.gather(1, x[0, 1:, None]).squeeze(1).numpy()
        expected_h = -(logp.exp() * logp).sum(-1).numpy()
        lp, h = record.instance(i)
        assert lp.shape == h.shape == (len(store[i]) - 1,)
        np.testing.assert_allclose(lp, expected_lp, rtol=2e-3, atol=2e-3)  # float16 storage
        np.testing.assert_allclose(h, expected_h, rtol=2e-3, atol=2e-3)
    # the record's mean log-prob per instance is the score table's (to float16 rounding)
    table = ScoreTable(recorded / "scores")
    assert float(record.instance(3)[0].mean()) == pytest.approx(float(table.logprob[3]), abs=2e-3)
    m = record.manifest
    assert m["n_positions"] == int((store.lengths - 1).sum()) and m["bytes_per_token"] == 4.0
    assert m["store_hash"] == store.hash and m["model"] == table.manifest["model"]


def test_a_rerun_is_a_noop_and_a_lost_shard_is_rewritten_to_the_same_bytes(tiny_store, recorded, tmp_path, capsys):
    out, rec = tmp_path / "scores", tmp_path / "record"
    for name in ("scores", "record"):
        (tmp_path / name).mkdir()
        for rel, data in files(recorded / name).items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_bytes(data)
    before = files(rec)
    score(tiny_store, out, rec, shard_size=40, batch_size=5)
    assert "nothing to do" in capsys.readouterr().err and files(rec) == before
    # a killed run: neither manifest written yet, one record shard lost
    for d in (out, rec):
        (d / "manifest.json").unlink()
    (rec / "shards" / "shard-00001.npy").unlink()
    score(tiny_store, out, rec, shard_size=40, batch_size=5)
    assert files(rec) == before


def test_a_changed_or_foreign_record_is_refused_on_read(tiny_store, recorded, tmp_path):
    store = TokenStore(tiny_store)
    rec = tmp_path / "record"
    rec.mkdir()
    for rel, data in files(recorded / "record").items():
        (rec / rel).parent.mkdir(parents=True, exist_ok=True)
        (rec / rel).write_bytes(data)
    shard = rec / "shards" / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    record = TokenRecord(rec, store)
    with pytest.raises(PredistillError, match="changed since the token record was written"):
        record.instance(0)
    manifest = json.loads((rec / "manifest.json").read_text())
    (rec / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:-1]}))
    with pytest.raises(PredistillError, match="shard list does not match"):
        TokenRecord(rec, store)
    (rec / "manifest.json").write_text(json.dumps({**manifest, "store_hash": "0" * 64}))
    with pytest.raises(PredistillError, match="was made from token store 000000000000"):
        TokenRecord(rec, store)


def test_verify_checks_every_shard_of_a_record(recorded, tmp_path, capsys):
    cli_main(["verify", str(recorded / "record")])
    assert "positions" in capsys.readouterr().out
    rec = tmp_path / "record"
    rec.mkdir()
    for rel, data in files(recorded / "record").items():
        (rec / rel).parent.mkdir(parents=True, exist_ok=True)
        (rec / rel).write_bytes(data)
    last = sorted((rec / "shards").glob("*.npy"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["verify", str(rec)])
    assert exit_info.value.code == 1 and "changed since the token record was written" in capsys.readouterr().err


def test_records_that_cannot_be_made_are_refused_before_anything_is_written(tiny_store, tmp_path, capsys):
    longest = int(TokenStore(tiny_store).lengths.max())
    cases = [
        (["--max-len", str(longest - 1)], "needs every position"),
        (["--token-record", str(tmp_path / "scores")], "another output's directory"),
    ]
    for extra, message in cases:
        argv = ["score", "--model", "preset:tiny", "--store", str(tiny_store), "--out", str(tmp_path / "scores"),
                "--token-record", str(tmp_path / "record"), "--no-progress", *extra]  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 1 and message in err and "\n" not in err, err
        assert not (tmp_path / "record").exists() and not (tmp_path / "scores").exists()


@pytest.mark.slow  # subprocesses: two ranks started by hand
def test_two_ranks_write_the_same_record_as_one(tiny_store, recorded, tmp_path):
    args = ["score", "--model", "preset:tiny", "--store", str(tiny_store), "--out", str(tmp_path / "scores"),
            "--token-record", str(tmp_path / "record"), "--shard-size", "40", "--batch-size", "5", "--no-progress"]  # fmt: skip
    run_ranks_by_hand(args)
    assert files(tmp_path / "record") == files(recorded / "record")
