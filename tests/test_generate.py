"""predistill/stages/generate.py: SeqKD data — teacher continuations of corpus prefixes as a token store."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, single_thread, subprocess_env

from predistill.cli import main as cli_main
from predistill.core.artifacts import PredistillError, is_complete, sha256_file, write_manifest
from predistill.formats.store import TokenStore
from predistill.modeling.models import forward_params, load_model, load_tokenizer, tokenizer_hash
from predistill.stages import generate as gen
from predistill.stages.generate import GenerateConfig, run
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = 16
SETTINGS = dict(prefix_len=PREFIX, max_instances=12, batch_size=4, shard_size=4, seed=3, progress=False)


def save_teacher(tokenizer_dir: Path, out: Path, store: Path, seed: int = 0, steps: int = 60) -> Path:
    """A tiny teacher as a plain HF directory, briefly trained on `store` (re-tokenised when its
    tokenizer differs) so that its predictions depend on the context like a real LM's: a random
    model's near-uniform, context-blind argmaxes would make the batching tests vacuous."""
    from predistill.training.forward import ModelInputs

    model, tokenizer = load_model("preset:tiny", tokenizer=str(tokenizer_dir), seed=seed)
    inputs = ModelInputs(TokenStore(store), tokenizer, max_len=48)
    rows = [inputs.row(i) for i in range(len(inputs.store))]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        tokens, lengths = inputs.batch([rows[i] for i in rng.choice(len(rows), 16, replace=False)])
        labels = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], -100)
        loss = model(input_ids=tokens, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, bpe_tokenizer, tiny_store) -> Path:
    with single_thread():
        return save_teacher(bpe_tokenizer, tmp_path_factory.mktemp("teacher") / "tiny", tiny_store)


def generate(store, out, model, **kw) -> Path:
    return run(GenerateConfig(model=str(model), store=str(store), out=str(out), **{**SETTINGS, **kw}))


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_store, teacher) -> Path:
    """The reference sampled run (default --max-new-tokens: fill up to the store's 65 tokens)."""
    with single_thread():
        return generate(tiny_store, tmp_path_factory.mktemp("gen") / "sampled", teacher)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def greedy_reference(model, prompt: np.ndarray, max_new: int, eos: int) -> np.ndarray:
    """One plain, unbatched `model.generate` call (no padding): the independent recomputation."""
    x = torch.as_tensor(prompt, dtype=torch.long)[None]
    with torch.no_grad():
        y = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=eos,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    new = y[0, x.shape[1] :].numpy()
    ends = np.flatnonzero(new == eos)
    return np.concatenate([prompt, new[: ends[0] + 1] if len(ends) else new])


def make_selection(directory: Path, store: TokenStore, ids) -> Path:
    directory.mkdir(parents=True)
    np.save(directory / "selection.npy", np.asarray(ids, dtype=np.int64))
    write_manifest(
        directory,
        {
            "format": "selection",
            "version": 1,
            "store_hash": store.hash,
            "selection_sha256": sha256_file(directory / "selection.npy"),
        },
    )
    return directory


# ------------------------------------------------------------------------------------------------
# the output store
# ------------------------------------------------------------------------------------------------


def test_output_store_prefixes_counts_and_manifest(sampled, tiny_store, teacher):
    src, out = TokenStore(tiny_store), TokenStore(sampled)
    m = out.manifest
    source_ids = np.load(sampled / "source_ids.npy")
    prompt_lengths = np.load(sampled / "prompt_lengths.npy")
    # 12 evenly spaced instances of the store, so both domains are represented
    assert source_ids.tolist() == [(k * len(src)) // 12 for k in range(12)]
    assert len(out) == 12 and set(out.domain_ids.tolist()) == {0, 1}
    assert out.domain_ids.tolist() == src.domain_ids[source_ids].tolist()
    assert out.domain_names == src.domain_names
    eos = src.eos_id
    n_generated = 0
    for k, i in enumerate(source_ids):
        row, prefix = out[k], src[int(i)][:PREFIX]
        assert prompt_lengths[k] == len(prefix)
        assert row[: len(prefix)].tolist() == prefix.tolist()  # the instance starts with the source prefix
        new = row[len(prefix) :]
        assert 1 <= len(new) <= 65 - PREFIX  # default: fill up to the store's max_len + 1 = 65 tokens
        # generation stops at the first EOS and keeps it; otherwise it ran to the token budget
        assert eos not in new[:-1].tolist()
        assert new[-1] == eos or len(new) == 65 - PREFIX
        n_generated += len(new)
    assert m["split"] == "train" and m["eos_id"] == eos and m["source_store_hash"] == src.hash
    assert m["tokenizer"] == src.manifest["tokenizer"]
    assert set(m["tokenizer"]) >= {"spec", "hash", "vocab_size", "eos_id"}
    assert m["config"]["prefix_len"] == PREFIX and m["config"]["max_new_tokens"] is None
    assert m["generation"]["max_new_tokens"] == 65 - PREFIX and m["generation"]["greedy"] is False
    assert m["n_generated_tokens"] == n_generated
    assert m["n_prompt_tokens"] == int(prompt_lengths.sum())
    assert m["n_documents"] == int((np.asarray(out.tokens) == eos).sum())
    assert sum(d["n_instances"] for d in m["domains"]) == 12
    assert [d["name"] for d in m["domains"]] == src.domain_names
    # teacher FLOPs: 2·N·(tokens fed), each row feeds prompt + generated − 1 tokens
    model, _ = load_model(str(teacher))
    assert m["flops"] == 2 * forward_params(model) * (m["n_tokens"] - 12)
    # the held-out split is the source's, unchanged, and the output's tokenizer loads with the same hash
    assert TokenStore(sampled / "val").hash == TokenStore(tiny_store / "val").hash
    assert tokenizer_hash(out.tokenizer()) == out.tokenizer_hash
    # no work directories left behind
    assert not sampled.with_name("sampled.shards").exists() and not sampled.with_name("sampled.partial").exists()


def test_rerun_of_finished_output_is_a_noop(sampled, tiny_store, teacher, capsys):
    before = {p: p.stat().st_mtime_ns for p in sampled.rglob("*")}
    generate(tiny_store, sampled, teacher)
    assert "already complete" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in sampled.rglob("*")} == before
    with pytest.raises(PredistillError, match="other settings"):
        generate(tiny_store, sampled, teacher, seed=4)


def test_greedy_equals_unbatched_generate_with_a_selection(tiny_store, teacher, tmp_path):
    """Batches mix prompts of different lengths (short instances are whole prompts), so the
    left-padded batched generation must equal one plain call per instance."""
    src = TokenStore(tiny_store)
    lengths = src.lengths
    short = np.flatnonzero(lengths < 56)[:4]  # the fixture store has ~10, of lengths 6…55
    long = np.flatnonzero(lengths >= 56)[:6]
    assert len(short) >= 2, "the fixture store should have a few short instances"
    ids = np.sort(np.concatenate([short, long]))
    sel = make_selection(tmp_path / "sel", src, ids)
    out = generate(
        tiny_store,
        tmp_path / "greedy",
        teacher,
        greedy=True,
        selection=str(sel),
        prefix_len=56,
        max_new_tokens=20,
        batch_size=5,
        shard_size=10,
        max_instances=None,
    )
    store = TokenStore(out)
    assert np.load(out / "source_ids.npy").tolist() == ids.tolist()
    prompt_lengths = np.load(out / "prompt_lengths.npy")
    assert len(set(prompt_lengths.tolist())) > 1  # left padding really happened
    model, _ = load_model(str(teacher))
    model.eval()
    for k, i in enumerate(ids):
        expected = greedy_reference(model, np.asarray(src[int(i)][:56], dtype=np.int64), 20, src.eos_id)
        assert store[k].tolist() == expected.tolist(), f"instance {i}"
    assert store.manifest["generation"]["temperature"] is None and store.manifest["config"]["greedy"] is True


def test_seeded_sampling_is_reproducible(sampled, tiny_store, teacher, tmp_path):
    again = generate(tiny_store, tmp_path / "again", teacher)
    assert tree_bytes(again) == tree_bytes(sampled)
    other = generate(tiny_store, tmp_path / "other_seed", teacher, seed=4)
    assert (other / "tokens.bin").read_bytes() != (sampled / "tokens.bin").read_bytes()
    # the prompts do not depend on the seed; only the continuations do
    a, b = TokenStore(sampled), TokenStore(other)
    assert all(a[k][:PREFIX].tolist() == b[k][:PREFIX].tolist() for k in range(len(a)))


def test_interrupted_run_resumes_identically(sampled, tiny_store, teacher, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_write, real_batch = gen.write_shard, gen.generate_batch
    written = []

    def write_then_die(work, index, *args, **kw):
        real_write(work, index, *args, **kw)
        written.append(index)
        if len(written) == 2:
            raise KeyboardInterrupt  # a Ctrl-C after the second shard

    monkeypatch.setattr(gen, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_store, out, teacher)
    assert not out.exists() and sorted(p.name for p in out.with_name("resumed.shards").glob("*.done")) == [
        "shard-00000.done",
        "shard-00001.done",
    ]
    monkeypatch.setattr(gen, "write_shard", real_write)
    batches = []
    monkeypatch.setattr(gen, "generate_batch", lambda *a, **kw: batches.append(1) or real_batch(*a, **kw))
    generate(tiny_store, out, teacher)
    assert len(batches) == 1  # only the third shard (4 instances, one batch) was generated again
    assert tree_bytes(out) == tree_bytes(sampled)
    assert not out.with_name("resumed.shards").exists()


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_byte_identical(tiny_store, teacher, tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "predistill",
        "generate",
        "--model",
        str(teacher),
        "--store",
        str(tiny_store),
        "--out",
        str(out),
        "--prefix-len",
        str(PREFIX),
        "--max-new-tokens",
        "24",
        "--max-instances",
        "24",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--seed",
        "5",
        "--no-progress",
    ]
    proc = subprocess.Popen(args, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    work = out.with_name("killed.shards")
    deadline = time.monotonic() + 240
    while not list(work.glob("*.done")):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    n_done = len(list(work.glob("*.done")))
    assert 1 <= n_done < 12 and not is_complete(out, "token_store")
    resumed = run(
        GenerateConfig(
            model=str(teacher),
            store=str(tiny_store),
            out=str(out),
            prefix_len=PREFIX,
            max_new_tokens=24,
            max_instances=24,
            batch_size=2,
            shard_size=2,
            seed=5,
            progress=False,
        )
    )
    straight = run(
        GenerateConfig(
            model=str(teacher),
            store=str(tiny_store),
            out=str(tmp_path / "straight"),
            prefix_len=PREFIX,
            max_new_tokens=24,
            max_instances=24,
            batch_size=2,
            shard_size=2,
            seed=5,
            progress=False,
        )
    )
    assert tree_bytes(resumed) == tree_bytes(straight)
    assert len(TokenStore(resumed)) == 24


def test_student_trains_on_the_generated_store(sampled, tmp_path):
    from predistill.stages.train import TrainConfig
    from predistill.stages.train import run as train

    run_dir = train(
        TrainConfig(
            model="preset:tiny", store=str(sampled), out=str(tmp_path / "student"), steps=3, batch_size=2, seq_len=32
        )
    )
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["store_hash"] == TokenStore(sampled).hash
    assert manifest["tokens"] > 0 and np.isfinite(manifest["final_val_loss"])  # evaluated on the real val split


def test_cross_tokenizer_teacher(tiny_store, source_specs, tmp_path):
    tok_dir = train_tokenizer(TokenizerConfig(sources=source_specs, out=str(tmp_path / "bpe400"), vocab_size=400))
    teacher = save_teacher(tok_dir, tmp_path / "teacher400", tiny_store, seed=1, steps=10)
    src = TokenStore(tiny_store)
    teacher_tok = load_tokenizer(str(teacher))
    assert tokenizer_hash(teacher_tok) != src.tokenizer_hash
    out = generate(tiny_store, tmp_path / "cross", teacher, max_instances=6, max_new_tokens=12, prefix_len=10)
    store = TokenStore(out)
    assert store.tokenizer_hash == tokenizer_hash(teacher_tok) == tokenizer_hash(store.tokenizer())
    assert store.vocab_size == len(teacher_tok) == 400 and store.manifest["source"]["retokenized"] is True
    prompt_lengths = np.load(out / "prompt_lengths.npy")
    for k, i in enumerate(np.load(out / "source_ids.npy")):
        # the prompt is the source prefix's text, in the teacher's tokens
        src_text = src.tokenizer().decode(
            src[int(i)][:10].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        prompt = store[k][: prompt_lengths[k]].tolist()
        assert teacher_tok.decode(prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False) == src_text
        assert prompt == teacher_tok.encode(src_text, add_special_tokens=False)
        assert 1 <= len(store[k]) - prompt_lengths[k] <= 12
    val = TokenStore(out / "val")  # re-tokenised held-out split: same texts, teacher's tokens
    assert val.tokenizer_hash == store.tokenizer_hash and len(val) == len(TokenStore(tiny_store / "val"))
    assert val.decode(0) == TokenStore(tiny_store / "val").decode(0)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prefix-len", "0"], "--prefix-len must be ≥ 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),
        (["--temperature", "0"], "--temperature must be finite and in (0, inf)"),
        (["--top-p", "1.5"], "--top-p must be finite and in (0, 1]"),
        (["--batch-size", "0"], "--batch-size must be ≥ 1"),
        (["--max-instances", "0"], "--max-instances must be ≥ 1"),
        (["--prefix-len", "65"], "leaves nothing to generate"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_store, teacher, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli_main(["generate", "--model", str(teacher), "--store", str(tiny_store), "--out", str(out), *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("predistill generate: error:") and "\n" not in err
    assert not out.exists() and not out.with_name("out.shards").exists() and not out.with_name("out.partial").exists()


def test_bad_inputs_are_refused(tiny_store, teacher, tmp_path, capsys):
    def fails(args, message):
        with pytest.raises(SystemExit) as e:
            cli_main(["generate", "--model", str(teacher), *args])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and message in err and "\n" not in err, err

    fails(["--store", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "not a token store")
    assert not (tmp_path / "o1").exists()
    file_out = tmp_path / "file"
    file_out.write_text("x")
    fails(["--store", str(tiny_store), "--out", str(file_out)], "not a directory")
    assert file_out.read_text() == "x"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    fails(["--store", str(tiny_store), "--out", str(busy)], "not a token store; refusing")
    assert (busy / "keep.txt").read_text() == "mine"
    # a selection of another store (its val split) is refused, naming both hashes
    val = TokenStore(tiny_store / "val")
    sel = make_selection(tmp_path / "sel", val, [0, 1])
    fails(
        ["--store", str(tiny_store), "--out", str(tmp_path / "o2"), "--selection", str(sel)],
        "was made from token store",
    )
    fails(
        ["--store", str(tiny_store), "--out", str(tmp_path / "o3"), "--model", str(tmp_path / "no_model")],
        "no such model directory",
    )
    assert not any(is_complete(tmp_path / o, "token_store") or (tmp_path / o).exists() for o in ("o2", "o3"))
    # an unfinished generation with other settings is not silently mixed with this one
    generate_work = tmp_path / "o4.shards"
    generate_work.mkdir()
    (generate_work / ".predistill-staging").write_text("generate_plan")  # this tool's, from another run
    (generate_work / "plan.json").write_text(json.dumps({"format": "generate_plan", "config": {"seed": 99}}))
    fails(["--store", str(tiny_store), "--out", str(tmp_path / "o4"), "--max-instances", "2"], "unfinished generation")
    assert not (tmp_path / "o4").exists()


@pytest.mark.slow  # subprocesses, torchrun with two gloo ranks
@pytest.mark.parametrize("launch", ["torchrun", "by hand"])
def test_two_ranks_generate_the_same_store_as_one(tiny_store, teacher, tmp_path, launch):
    def args(out):
        return [
            "-m",
            "predistill",
            "generate",
            "--model",
            str(teacher),
            "--store",
            str(tiny_store),
            "--out",
            str(out),
            "--prefix-len",
            str(PREFIX),
            "--max-new-tokens",
            "12",
            "--max-instances",
            "12",
            "--batch-size",
            "2",
            "--shard-size",
            "2",
            "--seed",
            "5",
            "--no-progress",
        ]

    subprocess.run(
        [sys.executable, *args(tmp_path / "one")], cwd=REPO, env=subprocess_env(), check=True, capture_output=True
    )
    if launch == "torchrun":
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc-per-node=2",
                    *args(tmp_path / "two"),
                ],
                cwd=REPO,
                env=subprocess_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        ]
    else:
        procs = [
            subprocess.Popen(
                [sys.executable, *args(tmp_path / "two")],
                cwd=REPO,
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
    assert tree_bytes(tmp_path / "two") == tree_bytes(tmp_path / "one")
    assert not (tmp_path / "two.shards").exists()
