"""`predistill score --logits-out`: the logits store written in the scoring pass (one teacher forward)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env

from predistill.cli import main as cli_main
from predistill.formats.logits import P_SLACK, LogitsConfig, LogitsStore
from predistill.formats.scores import ScoreTable
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model, load_tokenizer
from predistill.stages.score import ScoreConfig, run
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mtimes(directory: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*")}


def score(store, out, logits_out=None, model="preset:tiny", logits=None, **kw) -> Path:
    return run(
        ScoreConfig(
            model=model,
            store=str(store),
            out=str(out),
            progress=False,
            logits_out=None if logits_out is None else str(logits_out),
            logits=logits,
            **kw,
        )
    )


def check_top_p_k(reader: LogitsStore, store: TokenStore, model, cfg: LogitsConfig, err: float, instances) -> None:
    """Stored entries vs an independent recomputation: plain HF forward → log_softmax → stable sort →
    top-p-then-top-k. Log-probs within the manifest's error; ids equal up to near-ties (|Δ| < 1e-4)."""
    n_checked = n_exact = 0
    with torch.no_grad():
        for i in instances:
            x = torch.from_numpy(store[i].astype(np.int64))[None]
            ref = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            got = reader.instance_entries(i)
            assert len(got.n) == len(ref)
            for lp_row, part in zip(ref, got.split([1] * len(ref))):
                values, order = torch.sort(lp_row, descending=True, stable=True)
                cum = torch.cumsum(values.double().exp(), 0)
                n_ref = min(int(torch.nonzero(cum >= cfg.top_p - P_SLACK)[0]) + 1, cfg.top_k)
                teacher_at = lp_row[torch.from_numpy(part.ids)]
                stored = torch.from_numpy(part.logprobs.astype(np.float32))
                ok = teacher_at >= cfg.logprob_min
                if ok.any():  # model-forward differences (~1e-5) on top of the stated quantisation error
                    assert (stored - teacher_at)[ok].abs().max() <= err + 1e-4
                assert (stored[~ok] == cfg.logprob_min).all()
                same = part.n[0] == n_ref and part.ids.tolist() == order[:n_ref].tolist()
                if not same:
                    boundary = values[min(part.n[0], n_ref) - 1]
                    assert abs(cum[n_ref - 1] - cfg.top_p) < 1e-4 or (teacher_at - boundary).abs().min() < 1e-4
                n_checked += 1
                n_exact += same
    assert n_exact >= 0.97 * n_checked > 0


# ---------------------------------------------------------------------------------------------
# one pass, two artifacts
# ---------------------------------------------------------------------------------------------
def test_one_pass_writes_scores_and_logits(tiny_store, tmp_path):
    out, ldir = tmp_path / "scores", tmp_path / "logits"
    score(tiny_store, out, ldir, shard_size=32, batch_size=5, logits=LogitsConfig(mode="topk", shard_instances=32))
    store = TokenStore(tiny_store)
    table = ScoreTable(out)
    reader = LogitsStore(ldir, store)  # refuses another store / tokenizer
    m = reader.manifest
    # top-p-k's defaults (top-0.95-5, 8-bit log-probs)
    assert m["config"] == {**LogitsConfig(mode="topk", shard_instances=32).__dict__}
    assert m["config"]["top_p"] == 0.95 and m["config"]["top_k"] == 5 and m["config"]["logprob_bits"] == 8
    assert m["n_positions"] == table.manifest["n_tokens_scored"] == int((store.lengths - 1).sum())
    assert m["teacher"] == "preset:tiny" and m["store_hash"] == store.hash
    # the pass's FLOPs are counted once, in the score table; the logits store references it
    assert "flops" not in m and table.manifest["flops"] > 0
    assert m["scored_with"] == {"score_table": str(out.resolve()), "table_hash": table.hash, "teacher_pass": "shared"}
    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    model.eval()
    check_top_p_k(
        reader,
        store,
        model,
        LogitsConfig(mode="topk"),
        m["encoding"]["logprob_max_abs_error"],
        [0, 1, 31, 32, len(store) // 2, len(store) - 1],
    )


def test_scores_are_unchanged_by_logits_out(tiny_store, tmp_path):
    plain = score(tiny_store, tmp_path / "plain", shard_size=40)
    both = score(tiny_store, tmp_path / "both", tmp_path / "logits", shard_size=40)
    assert files_of(both) == files_of(plain)


def test_the_cli_default_store_is_rs_kd_with_8_draws(tiny_store, tmp_path):
    cli_main(
        [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(tiny_store),
            "--out",
            str(tmp_path / "s"),
            "--logits-out",
            str(tmp_path / "l"),
            "--no-progress",
        ]
    )
    cfg = LogitsStore(tmp_path / "l", TokenStore(tiny_store)).cfg
    assert (cfg.mode, cfg.samples) == ("sample", 8)


def test_sample_mode_and_cli_flags(tiny_store, tmp_path, capsys):
    out, ldir = tmp_path / "scores", tmp_path / "logits"
    cli_main(
        [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(tiny_store),
            "--out",
            str(out),
            "--logits-out",
            str(ldir),
            "--logits-mode",
            "sample",
            "--samples",
            "6",
            "--sample-seed",
            "3",
            "--shard-size",
            "25",
            "--logits-shard-size",
            "50",
            "--no-progress",
        ]
    )
    assert "bytes/token" in capsys.readouterr().out
    store = TokenStore(tiny_store)
    reader = LogitsStore(ldir, store)
    cfg = reader.cfg
    assert (cfg.mode, cfg.samples, cfg.seed, cfg.shard_instances) == ("sample", 6, 3, 50)
    for i in [0, 7, len(store) - 1]:
        entries = reader.instance_entries(i)
        assert len(entries.n) == store.lengths[i] - 1
        sums = np.add.reduceat(entries.counts, entries.offsets[:-1]) if len(entries.n) else []
        assert (np.asarray(sums) == 6).all()


# ---------------------------------------------------------------------------------------------
# resume: rerun, kill, late --logits-out
# ---------------------------------------------------------------------------------------------
def test_finished_run_rerun_is_a_noop(tiny_store, tmp_path, capsys):
    out, ldir = tmp_path / "scores", tmp_path / "logits"
    score(tiny_store, out, ldir, shard_size=50)
    before = {**mtimes(out), **mtimes(ldir)}
    capsys.readouterr()
    score(tiny_store, out, ldir, shard_size=50)
    assert {**mtimes(out), **mtimes(ldir)} == before
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.slow
def test_logits_out_added_to_a_finished_table_recomputes_for_the_logits(tiny_store, tmp_path, capsys):
    one = score(tiny_store, tmp_path / "one", tmp_path / "one-logits", shard_size=30, batch_size=4)
    later = score(tiny_store, tmp_path / "later", shard_size=30, batch_size=4)
    table_before = mtimes(later)
    score(tiny_store, later, tmp_path / "later-logits", shard_size=30, batch_size=4)
    assert mtimes(later) == table_before  # the score table is not touched
    assert "logits only" in capsys.readouterr().err
    # the same batching as a one-pass run: the same shard bytes
    shards = {k: v for k, v in files_of(tmp_path / "later-logits").items() if k.startswith("shards/")}
    assert shards == {k: v for k, v in files_of(tmp_path / "one-logits").items() if k.startswith("shards/")}
    m = json.loads((tmp_path / "later-logits" / "manifest.json").read_text())
    table = ScoreTable(later).manifest
    # a second teacher pass: its FLOPs are its own (2 · forward params · positions)
    assert m["scored_with"] == {
        "score_table": str(later.resolve()),
        "table_hash": table["table_hash"],
        "teacher_pass": "separate",
    }
    assert m["flops"] == table["flops"] == 2 * table["model"]["forward_params"] * m["n_positions"]
    # and a rerun is a no-op
    before = mtimes(tmp_path / "later-logits")
    score(tiny_store, later, tmp_path / "later-logits", shard_size=30, batch_size=4)
    assert mtimes(tmp_path / "later-logits") == before
    assert ScoreTable(one).hash == ScoreTable(later).hash


@pytest.mark.slow  # a subprocess: importing torch + transformers takes seconds on a shared CPU
def test_sigkill_after_first_score_shard_then_rerun_gives_identical_files(tiny_store, tmp_path):
    # logits shards span two score shards: a kill leaves logits entries of a shard half-fed
    out, ldir = tmp_path / "scores", tmp_path / "logits"
    flags = dict(shard_size=8, batch_size=3, logits=LogitsConfig(mode="topk", shard_instances=16))
    score(tiny_store, out, ldir, **flags)
    reference = {"scores": files_of(out), "logits": files_of(ldir)}
    shutil.rmtree(out)
    shutil.rmtree(ldir)
    # the same paths: manifests (which name the score table) compare byte for byte as well
    args = [
        sys.executable,
        "-m",
        "predistill",
        "score",
        "--model",
        "preset:tiny",
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--logits-out",
        str(ldir),
        "--logits-mode",
        "topk",
        "--shard-size",
        "8",
        "--batch-size",
        "3",
        "--logits-shard-size",
        "16",
        "--no-progress",
    ]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "shards" / "shard-00000.done").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and not (ldir / "manifest.json").exists()
    n_done = len(list((out / "shards").glob("*.done")))
    assert 1 <= n_done < -(-len(TokenStore(tiny_store)) // 8)
    score(tiny_store, out, ldir, **flags)
    assert files_of(out) == reference["scores"]
    assert files_of(ldir) == reference["logits"]


# ---------------------------------------------------------------------------------------------
# refusals (one line, before anything is written)
# ---------------------------------------------------------------------------------------------
def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_retokenised_scoring_with_logits_out_is_refused(tiny_store, tmp_path, source_specs, capsys):
    tokenizer = load_tokenizer(
        str(train_tokenizer(TokenizerConfig(sources=source_specs, out=str(tmp_path / "tok"), vocab_size=384)))
    )
    model, _ = load_model("preset:tiny", tokenizer, seed=3)
    model.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    ldir = tmp_path / "logits"
    err = cli_error(
        capsys,
        [
            "score",
            "--model",
            str(tmp_path / "other"),
            "--store",
            str(tiny_store),
            "--out",
            str(tmp_path / "scores"),
            "--logits-out",
            str(ldir),
            "--no-progress",
        ],
    )
    assert "--logits-out needs the store's own tokenizer" in err and "re-tokenised" in err
    assert not ldir.exists() and not (tmp_path / "scores").exists()


def test_other_refusals(tiny_store, tmp_path, capsys):
    base = [
        "score",
        "--model",
        "preset:tiny",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path / "s"),
        "--no-progress",
    ]
    assert "--max-len" in cli_error(capsys, [*base, "--logits-out", str(tmp_path / "l"), "--max-len", "16"])
    err = cli_error(
        capsys, [*base, "--logits-out", str(tmp_path / "l"), "--shard-size", "32", "--logits-shard-size", "16"]
    )
    assert "multiple of --shard-size" in err
    assert "is the score table's --out" in cli_error(capsys, [*base, "--logits-out", str(tmp_path / "s")])
    assert "--top-k" in cli_error(capsys, [*base, "--logits-out", str(tmp_path / "l"), "--top-k", "0"])
    # a logits store with other settings is not overwritten
    score(tiny_store, tmp_path / "s", tmp_path / "l", shard_size=64)
    capsys.readouterr()
    assert "other settings" in cli_error(
        capsys, [*base, "--logits-out", str(tmp_path / "l"), "--shard-size", "64", "--top-k", "3"]
    )


# ---------------------------------------------------------------------------------------------
# the real teacher
# ---------------------------------------------------------------------------------------------
@pytest.mark.teacher
@pytest.mark.slow
def test_smollm2_logits_equal_its_own_top_p_k(tmp_path, smollm2_tiny_store):
    store = TokenStore(smollm2_tiny_store)
    score(
        store.dir,
        tmp_path / "scores",
        tmp_path / "logits",
        model="smollm2-135m",
        shard_size=2,
        batch_size=2,
        logits=LogitsConfig(mode="topk"),
    )
    reader = LogitsStore(tmp_path / "logits", store)
    m = reader.manifest
    assert m["config"]["top_p"] == 0.95 and m["config"]["top_k"] == 5 and m["n_positions"] > 40
    assert m["scored_with"]["teacher_pass"] == "shared" and "flops" not in m
    model, _ = load_model("smollm2-135m")
    model.eval()
    check_top_p_k(reader, store, model, reader.cfg, m["encoding"]["logprob_max_abs_error"], range(len(store)))
