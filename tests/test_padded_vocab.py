"""Padded output layers (Qwen1.5-1.8B: 151 936 rows for 151 646 tokens): ids are the tokenizer's,
and the rows past it carry no probability anywhere — scoring, logits stores, offline and online KD,
MiniLLM's samples, generation.

The padded twin of a model gets 64 extra rows so large that, were they not masked, they would take
almost all of every softmax's mass: any path that forgets the mask changes its numbers visibly.
"""

import json

import numpy as np
import pytest
import torch

from predistill.formats.logits import LogitsConfig, LogitsStore
from predistill.formats.scores import ScoreTable
from predistill.formats.store import TokenStore
from predistill.modeling.models import forward_params, head_weight, load_model
from predistill.stages.generate import GenerateConfig
from predistill.stages.generate import run as generate
from predistill.stages.score import ScoreConfig
from predistill.stages.score import run as score
from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train
from predistill.training.distill import MiniLLM
from predistill.training.kd import KDConfig

PAD = 64
FAST = dict(
    model="preset:tiny", steps=3, batch_size=4, seq_len=32, lr=3e-3, eval_instances=8, alpha_schedule="constant"
)


def save_padded_twin(model, tokenizer, out):
    """`model` with PAD extra output rows that dominate every softmax unless masked."""
    model.resize_token_embeddings(len(tokenizer) + PAD, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[len(tokenizer) :] = 10 * weight[:PAD]  # for any hidden state, some padded row outscores every token
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_store):
    root = tmp_path_factory.mktemp("padded")
    store = TokenStore(tiny_store)
    model, tokenizer = load_model("preset:tiny", store.tokenizer(), seed=7)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5)  # decisive predictions, not near-uniform
    model.save_pretrained(root / "plain", safe_serialization=True)
    tokenizer.save_pretrained(root / "plain")
    save_padded_twin(model, tokenizer, root / "padded")
    return {"plain": root / "plain", "padded": root / "padded", "root": root}


def test_the_twin_really_is_padded_and_would_dominate_unmasked(teachers, tiny_store):
    model, tokenizer = load_model(str(teachers["padded"]))
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) + PAD
    with torch.no_grad():
        ids = torch.from_numpy(TokenStore(tiny_store)[0][:16].astype(np.int64))[None]
        probs = torch.softmax(model(input_ids=ids).logits, -1)
    assert probs[..., len(tokenizer) :].sum(-1).min() > 0.5  # the unmasked softmax: padding takes the mass
    assert head_weight(model, len(tokenizer)).shape[0] == len(tokenizer)
    assert forward_params(model, len(tokenizer)) == forward_params(model) - PAD * model.config.hidden_size


@pytest.mark.slow  # two full scoring passes with logits
def test_scores_and_logits_of_a_padded_teacher_equal_the_unpadded_ones(teachers, tiny_store, tmp_path):
    runs = {}
    for name in ("plain", "padded"):
        out = score(
            ScoreConfig(
                model=str(teachers[name]),
                store=str(tiny_store),
                out=str(tmp_path / name / "scores"),
                logits_out=str(tmp_path / name / "logits"),
                logits=LogitsConfig(mode="topk", top_k=8),
                shard_size=64,
                progress=False,
            )
        )
        runs[name] = (ScoreTable(out), LogitsStore(tmp_path / name / "logits", TokenStore(tiny_store)))
    (plain_table, plain_logits), (padded_table, padded_logits) = runs["plain"], runs["padded"]
    np.testing.assert_array_equal(padded_table.logprob, plain_table.logprob)
    assert padded_logits.manifest["vocab_size"] == TokenStore(tiny_store).vocab_size
    for i in (0, 5, len(TokenStore(tiny_store)) - 1):
        a, b = plain_logits.instance_entries(i), padded_logits.instance_entries(i)
        assert b.ids.max() < TokenStore(tiny_store).vocab_size  # a padding row is never stored
        assert a.ids.tolist() == b.ids.tolist() and np.array_equal(a.logprobs, b.logprobs)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_online_kd_from_a_padded_teacher_equals_the_unpadded_teacher(teachers, tiny_store, tmp_path):
    losses = {}
    for name in ("plain", "padded"):
        out = train(
            TrainConfig(
                store=str(tiny_store),
                out=str(tmp_path / name),
                kd_teacher=str(teachers[name]),
                alpha=0.5,
                kd=KDConfig(loss="kld"),
                **FAST,
            )
        )
        losses[name] = [(r["lm_loss"], r["kd_loss"]) for r in metrics(out)]
    np.testing.assert_allclose(losses["padded"], losses["plain"], rtol=1e-6)


def test_a_padded_student_trains_like_its_unpadded_self(teachers, tiny_store, tmp_path):
    # offline KD from the padded teacher's store into a padded student (and LM loss): the student's
    # padded rows take no mass, so losses equal those of the same student unpadded
    store = TokenStore(tiny_store)
    logits = tmp_path / "logits"
    score(
        ScoreConfig(
            model=str(teachers["padded"]),
            store=str(tiny_store),
            out=str(tmp_path / "scores"),
            logits_out=str(logits),
            shard_size=64,
            progress=False,
        )
    )
    student, tokenizer = load_model("preset:tiny", store.tokenizer(), seed=0)
    student.save_pretrained(tmp_path / "student", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "student")
    save_padded_twin(student, tokenizer, tmp_path / "student-padded")
    losses = {}
    for name in ("student", "student-padded"):
        out = train(
            TrainConfig(
                store=str(tiny_store),
                out=str(tmp_path / f"run-{name}"),
                kd_logits=str(logits),
                alpha=0.5,
                **{**FAST, "model": str(tmp_path / name)},
            )
        )
        losses[name] = [(r["lm_loss"], r["kd_loss"]) for r in metrics(out)]
    np.testing.assert_allclose(losses["student-padded"], losses["student"], rtol=1e-5)


def test_minillm_never_samples_a_padding_row(teachers, tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    student, tokenizer = load_model("preset:tiny", store.tokenizer(), seed=0)
    save_padded_twin(student, tokenizer, tmp_path / "student-padded")
    student, _ = load_model(str(tmp_path / "student-padded"))
    source = MiniLLM(str(teachers["padded"]), store, KDConfig(loss="rkl"), "cpu", 64, student, seed=0, prefix_len=8)
    ids = np.arange(8)
    tokens, _ = store.batch(ids, max_len=33)
    samples = source.batch(ids, tokens[:, :-1])
    assert samples is not None and int(samples.max()) < store.vocab_size


def test_generation_from_a_padded_teacher_stays_in_the_vocabulary(teachers, tiny_store, tmp_path):
    out = generate(
        GenerateConfig(
            model=str(teachers["padded"]),
            store=str(tiny_store),
            out=str(tmp_path / "gen"),
            prefix_len=4,
            max_new_tokens=12,
            max_instances=8,
            progress=False,
        )
    )
    generated = TokenStore(out)
    assert all(int(generated[i].max()) < generated.vocab_size for i in range(len(generated)))
