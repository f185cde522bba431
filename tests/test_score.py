"""predistill/stages/score.py: MiniPLM's per-instance mean log-prob, the score table, resume, ranks, hook."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ranks_by_hand, subprocess_env

from predistill.cli import main as cli_main
from predistill.core.artifacts import PredistillError
from predistill.core.sharding import plan_shards
from predistill.formats.scores import FORMAT, ScoreTable
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model, load_tokenizer
from predistill.stages.score import ScoreConfig, ShardScoreWriter, run
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer
from predistill.text.retokenize import retokenize
from predistill.training.forward import ForwardBatch, ForwardConsumer, ModelInputs, run_forward_pass

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_hf_mean_logprob(model, ids: np.ndarray) -> float:
    """The independent recomputation: full logits → log_softmax → gather, one instance at a time."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
    logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, x[0, 1:, None]).squeeze(1)
    return float(logp.mean())


def score(store, out, model="preset:tiny", **kw) -> Path:
    return run(ScoreConfig(model=model, store=str(store), out=str(out), progress=False, **kw))


def table_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_scores_equal_plain_hf_forward(tiny_store, tmp_path):
    out = score(tiny_store, tmp_path / "scores", shard_size=50, batch_size=7)
    table = ScoreTable(out)
    store = TokenStore(tiny_store)
    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    model.eval()
    assert len(table) == len(store)
    np.testing.assert_array_equal(table.n_tokens, store.lengths - 1)
    for i in [0, 1, len(store) // 2, len(store) - 1]:
        assert table.logprob[i] == pytest.approx(plain_hf_mean_logprob(model, store[i]), abs=2e-5)
    m = table.manifest
    assert m["format"] == FORMAT and m["complete"] is True
    assert m["store_hash"] == store.hash and m["retokenized"] is False
    assert m["n_shards"] == -(-len(store) // 50) and m["n_tokens_scored"] == int((store.lengths - 1).sum())
    assert m["flops"] == 2 * m["model"]["forward_params"] * m["n_tokens_scored"]


def test_rerun_of_finished_table_is_a_noop(tiny_store, tmp_path, capsys):
    out = score(tiny_store, tmp_path / "scores", shard_size=100)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    score(tiny_store, out, shard_size=100)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert "nothing to do" in capsys.readouterr().err


def test_rerun_skips_finished_shards_and_redoes_a_corrupt_one(tiny_store, tmp_path):
    out = score(tiny_store, tmp_path / "scores", shard_size=100)
    reference = table_files(out)
    shard1 = out / "shards" / "shard-00001.npy"
    shard1.write_bytes(shard1.read_bytes()[:-4])  # a torn write that the marker no longer vouches for
    (out / "manifest.json").unlink()
    stamp0 = (out / "shards" / "shard-00000.npy").stat().st_mtime_ns
    score(tiny_store, out, shard_size=100)
    assert (out / "shards" / "shard-00000.npy").stat().st_mtime_ns == stamp0  # skipped
    assert table_files(out) == reference


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import predistill.core.artifacts as artifacts
    import predistill.stages.score as score
    mode, store, out = sys.argv[1:4]
    calls = {"n": 0}
    if mode == "mid-batch":
        original = score.ShardScoreWriter.consume
        def consume(self, batch):
            calls["n"] += 1
            if calls["n"] == 5:  # inside the second shard (3 batches per shard)
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, batch)
        score.ShardScoreWriter.consume = consume
    else:  # after a shard's data is renamed into place but before its completion marker
        original = artifacts.write_bytes_atomic
        def write(path, data):
            if path.name.endswith(".done"):
                calls["n"] += 1
                if calls["n"] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            original(path, data)
        artifacts.write_bytes_atomic = write
    score.run(score.ScoreConfig(model="preset:tiny", store=store, out=out, shard_size=24, batch_size=8,
                                progress=False))
""")


@pytest.mark.slow  # a subprocess: importing torch + transformers takes seconds on a shared CPU
@pytest.mark.parametrize("mode", ["mid-batch", "before-marker"])
def test_sigkill_then_rerun_gives_identical_files(tiny_store, tmp_path, mode):
    clean = score(tiny_store, tmp_path / "clean", shard_size=24, batch_size=8)
    killed = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, mode, str(tiny_store), str(killed)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (killed / "manifest.json").exists()
    done = sorted(p.name for p in (killed / "shards").glob("*.done"))
    assert done == ["shard-00000.done"]
    score(tiny_store, killed, shard_size=24, batch_size=8)
    assert table_files(killed) == table_files(clean)


@pytest.mark.slow
def test_two_ranks_give_the_same_table_as_one(tiny_store, tmp_path):
    one = score(tiny_store, tmp_path / "one", shard_size=40)
    two = tmp_path / "two"
    args = [
        "score",
        "--model",
        "preset:tiny",
        "--store",
        str(tiny_store),
        "--out",
        str(two),
        "--shard-size",
        "40",
        "--no-progress",
    ]
    run_ranks_by_hand(args)
    # Both ranks ran without a rendezvous; the one that finished last completed the table.
    assert json.loads((two / "manifest.json").read_text())["complete"] is True
    assert table_files(two) == table_files(one)
    np.testing.assert_array_equal(ScoreTable(two).logprob, ScoreTable(one).logprob)


def test_cross_tokenizer_scores_retokenised_text(tiny_store, tmp_path, source_specs):
    other_tok = train_tokenizer(TokenizerConfig(sources=source_specs, out=str(tmp_path / "tok384"), vocab_size=384))
    tokenizer = load_tokenizer(str(other_tok))
    model, _ = load_model("preset:tiny", tokenizer, seed=3)
    model_dir = tmp_path / "other-family"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = score(tiny_store, tmp_path / "scores", model=str(model_dir), shard_size=100, max_len=48)
    table = ScoreTable(out)
    store = TokenStore(tiny_store)
    assert table.manifest["retokenized"] is True
    model.eval()
    for i in [0, 7, len(store) - 1]:
        ids = retokenize(store[i], store.tokenizer(), store.eos_id, tokenizer)
        # byte-level BPE is lossless: the re-tokenised instance decodes to the same text
        assert tokenizer.decode(ids.tolist(), clean_up_tokenization_spaces=False) == store.decode(i).replace(
            store.tokenizer().eos_token, tokenizer.eos_token
        )
        assert table.n_tokens[i] == min(len(ids), 48) - 1
        assert table.logprob[i] == pytest.approx(plain_hf_mean_logprob(model, ids[:48]), abs=2e-5)


def test_forward_consumers_share_one_pass(tiny_store, tmp_path):
    """The hook a logits-store writer uses: one forward per batch feeds every consumer."""
    store = TokenStore(tiny_store)
    model, tok = load_model("preset:tiny", store.tokenizer(), seed=0)
    model.eval()

    class LogitsCheck(ForwardConsumer):
        def __init__(self):
            self.seen, self.max_err = [], 0.0

        def consume(self, batch: ForwardBatch) -> None:
            self.seen.extend(batch.ids.tolist())
            b = 0
            n = int(batch.lengths[b])
            logits = batch.hidden[b, :n] @ batch.lm_head_weight.t()
            full = model(input_ids=batch.tokens[b : b + 1, :n]).logits[0]
            self.max_err = max(self.max_err, float((logits - full).abs().max()))

    check = LogitsCheck()
    shards = plan_shards(len(store), 64)
    out = tmp_path / "shards-only"
    writer = ShardScoreWriter(out)
    stats = run_forward_pass(model, ModelInputs(store, tok), shards, [writer, check], batch_size=5, progress=False)
    assert sorted(check.seen) == list(range(len(store)))
    assert check.max_err < 1e-4
    assert stats.n_tokens == int(store.lengths.sum()) and stats.n_shards_run == len(shards)
    assert len(list((out / "shards").glob("*.done"))) == len(shards)
    # every consumer reports the shard done → nothing is forwarded again
    again = run_forward_pass(model, ModelInputs(store, tok), shards, [writer], progress=False)
    assert again.n_shards_skipped == len(shards) and again.n_tokens == 0


def test_score_table_refuses_another_store(tiny_store, tmp_path):
    out = score(tiny_store, tmp_path / "scores", shard_size=100)
    val = TokenStore(Path(tiny_store) / "val")
    with pytest.raises(PredistillError, match="made from token store .* but .* is "):
        ScoreTable(out).check_store(val)


def test_rerun_with_another_model_into_a_partial_table_is_refused(tiny_store, tmp_path):
    out = tmp_path / "scores"
    score(tiny_store, out, shard_size=100)
    (out / "manifest.json").unlink()  # a partial table
    with pytest.raises(PredistillError, match="another plan .*model"):
        score(tiny_store, out, shard_size=100, seed=1)


def test_cli_errors_are_one_line(tiny_store, tmp_path, capsys):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "manifest.json").write_text(json.dumps({"format": "token_store", "complete": False}))
    with pytest.raises(SystemExit) as e:
        cli_main(["score", "--model", "preset:tiny", "--store", str(incomplete), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "incomplete" in err
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "score",
                "--model",
                "preset:tiny",
                "--store",
                str(tiny_store),
                "--out",
                str(tmp_path / "o"),
                "--batch-size",
                "0",
            ]
        )
    assert e.value.code == 1 and "--batch-size" in capsys.readouterr().err


@pytest.mark.slow  # torchrun: two gloo ranks
@pytest.mark.parametrize("launch", ["torchrun", "by hand"])
def test_two_ranks_write_the_same_table_and_logits_store_as_one(tiny_store, tmp_path, launch):
    flags = ["--shard-size", "16", "--logits-shard-size", "32", "--logits-mode", "topk", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli_main(
        [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(tiny_store),
            "--out",
            str(one / "scores"),
            "--logits-out",
            str(one / "logits"),
            *flags,
        ]
    )
    args = [
        "-m",
        "predistill",
        "score",
        "--model",
        "preset:tiny",
        "--store",
        str(tiny_store),
        "--out",
        str(two / "scores"),
        "--logits-out",
        str(two / "logits"),
        *flags,
    ]
    if launch == "torchrun":
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        ]
    else:  # ranks started without a rendezvous: the last one to finish completes both artifacts
        procs = [
            subprocess.Popen(
                [sys.executable, *args],
                env={**subprocess_env(), "RANK": str(r), "WORLD_SIZE": "2"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in (0, 1)
        ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert table_files(two / "scores") == table_files(one / "scores")
    shards = lambda d: {p.name: p.read_bytes() for p in sorted((d / "logits" / "shards").iterdir())}  # noqa: E731
    assert shards(two) == shards(one)
    manifests = [json.loads((d / "logits" / "manifest.json").read_text()) for d in (one, two)]
    for m, d in zip(manifests, (one, two)):
        assert m["complete"] is True and m["scored_with"]["score_table"] == str((d / "scores").resolve())
        m["scored_with"].pop("score_table")
    assert manifests[0] == manifests[1]
