"""`predistill verify`: every hash and schema an artifact records, checked up front."""

import pytest
from test_scores import make_table
from test_selection import make_selection

from predistill import cli
from predistill.formats.logits import shard_files
from predistill.formats.store import TokenStore
from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train


def test_intact_artifacts_pass_one_line_each(tiny_store, tmp_path, capsys):
    table = make_table(tmp_path / "scores")
    selection = make_selection(tmp_path / "sel", [0, 2], TokenStore(tiny_store))
    run = train(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), steps=2, batch_size=2, seq_len=16))
    capsys.readouterr()
    cli.main(["verify", str(tiny_store), str(table), str(selection), str(run)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[2].split(" ok")[0] for line in lines] == ["token_store", "score_table", "selection", "run"]
    assert "2 split(s)" in lines[0]


def test_a_changed_token_chunk_is_found_before_any_stage_reads_it(tiny_store, tmp_path, capsys):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    tokens = bytearray((copy / "val" / "tokens.bin").read_bytes())
    tokens[-2:] = bytes(reversed(tokens[-2:])) if tokens[-2:] != tokens[-2:][::-1] else b"\x01\x00"
    (copy / "val" / "tokens.bin").write_bytes(bytes(tokens))
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", str(copy)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and err.count("\n") == 0 and "val/tokens.bin" in err


def test_a_changed_logits_shard_is_found_up_front(tmp_path, capsys):
    from test_logits import make_store, write_store

    from predistill.formats.logits import LogitsConfig

    store = make_store(tmp_path / "store", seed=0)
    write_store(tmp_path / "logits", store, LogitsConfig(mode="sample", samples=4, shard_instances=4))
    cli.main(["verify", str(tmp_path / "logits")])
    assert "logits_store ok" in capsys.readouterr().out
    data, _ = shard_files(tmp_path / "logits", 3)[1]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", str(tmp_path / "logits")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and err.count("\n") == 0 and "shards/00001.bin" in err and "sha256" in err


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: d.mkdir(), "not an artifact"),
        (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"format": "mystery"}')), "not one verify checks"),
        (lambda d: (d.mkdir(), (d / "manifest.json").write_text("[" * 100000)), "unreadable manifest"),
    ],
)
def test_what_is_not_an_artifact_is_one_line(tmp_path, capsys, setup, message):
    setup(tmp_path / "x")
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and err.count("\n") == 0 and message in err
