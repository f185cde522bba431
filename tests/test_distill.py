"""KD sources in `predistill train`: offline logits (PD), online teacher (Vanilla KD), online logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from predistill.core.artifacts import PredistillError
from predistill.formats.logits import LogitsConfig, LogitsStore, LogitsStoreWriter, compute_entries
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model
from predistill.stages.train import TrainConfig, flops_per_token, run
from predistill.training.distill import forward_flops_per_token
from predistill.training.kd import KDConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(model="preset:tiny", steps=6, batch_size=4, seq_len=64, lr=3e-3, warmup=1, eval_instances=8)


@pytest.fixture(scope="module")
def teacher_dir(tiny_store, tmp_path_factory) -> Path:
    """A small teacher: preset:mini trained briefly on the store (its distributions are not uniform)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run(TrainConfig(store=str(tiny_store), out=str(out), **{**FAST, "model": "preset:mini", "steps": 20}))
    return out / "hf"


@pytest.fixture(scope="module")
def logits_dir(tiny_store, teacher_dir, tmp_path_factory) -> Path:
    store = TokenStore(tiny_store)
    teacher, _ = load_model(str(teacher_dir))
    out = tmp_path_factory.mktemp("logits") / "logits"
    writer = LogitsStoreWriter(
        out,
        store,
        LogitsConfig(mode="topk", top_k=8, shard_instances=64),
        vocab_size=teacher.get_output_embeddings().weight.shape[0],
        teacher=str(teacher_dir),
    )
    with torch.no_grad():
        for ids, tokens, lengths in store.iter_batches(16):
            hidden = teacher.model(input_ids=tokens).last_hidden_state
            writer.add_hidden(ids, hidden, teacher.lm_head.weight, tokens, lengths)
    writer.finish()
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_offline_kd_composes_lm_and_kd_losses_and_costs_no_teacher_flops(tiny_store, logits_dir, tmp_path):
    out = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "pd"),
            kd_logits=str(logits_dir),
            alpha=0.9,
            alpha_schedule="constant",
            kd=KDConfig(temperature=2.0),
            **FAST,
        )
    )
    rows = metrics(out)
    for r in rows:
        assert r["kd_loss"] is not None and r["kd_loss"] > 0
        assert r["loss"] == pytest.approx(0.1 * r["lm_loss"] + 0.9 * r["kd_loss"], rel=1e-6)
    m = manifest(out)
    assert m["method"] == "PD" and m["kd_logits"] == str(logits_dir)
    assert m["teacher_flops"] == pytest.approx(0) and m["flops_per_token"] == m["student_flops_per_token"]


def test_offline_kd_moves_the_student_towards_the_teacher(tiny_store, logits_dir, tmp_path):
    """Same seed, same data: with α = 1 the student's KD loss falls far more than without KD."""
    kd = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "kd"),
            kd_logits=str(logits_dir),
            alpha=1.0,
            alpha_schedule="constant",
            kd=KDConfig(loss="kld"),
            **{**FAST, "steps": 12},
        )
    )
    assert metrics(kd)[-1]["kd_loss"] < 0.6 * metrics(kd)[0]["kd_loss"]


def test_period_schedule_runs_kd_on_every_fourth_step_only(tiny_store, teacher_dir, tmp_path):
    out = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "vkd"),
            kd_teacher=str(teacher_dir),
            alpha=0.9,
            alpha_schedule="period",
            kd=KDConfig(loss="nll"),
            **{**FAST, "steps": 8},
        )
    )
    rows = metrics(out)
    assert [r["alpha"] for r in rows] == [0, 0, 0, 0.9] * 2
    assert [r["kd_loss"] is not None for r in rows] == [False, False, False, True] * 2
    m = manifest(out)
    teacher, _ = load_model(str(teacher_dir))
    student, _ = load_model("preset:tiny", TokenStore(tiny_store).tokenizer())
    kd_tokens = sum(rows[i]["tokens"] - rows[i - 1]["tokens"] for i in (3, 7))
    assert m["method"] == "Vanilla KD"
    assert m["teacher_flops"] == pytest.approx(forward_flops_per_token(teacher) * kd_tokens)
    assert m["flops"] == pytest.approx(flops_per_token(student) * m["tokens"] + m["teacher_flops"])


def test_online_teacher_nll_is_full_vocabulary_soft_cross_entropy(tiny_store, teacher_dir, tmp_path):
    """Vanilla KD's first-step loss equals −Σ_V p_T log q_S computed directly from both models."""
    from predistill.stages.train import DataOrder, make_batch

    out = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "vkd"),
            kd_teacher=str(teacher_dir),
            alpha=1.0,
            alpha_schedule="constant",
            kd=KDConfig(loss="nll"),
            **{**FAST, "steps": 1},
        )
    )
    store = TokenStore(tiny_store)
    student, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    teacher, _ = load_model(str(teacher_dir))
    ids = DataOrder(np.arange(len(store)), 0).global_batch(0, 4)
    inputs, _, mask = make_batch(store, ids, 64, "cpu")
    with torch.no_grad():
        p_t = torch.softmax(teacher(input_ids=inputs).logits, -1)
        log_q = torch.log_softmax(student(input_ids=inputs).logits, -1)
    expected = -(p_t * log_q).sum(-1)[mask].mean()
    assert metrics(out)[0]["kd_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_logits_from_another_store_are_refused_naming_both_hashes(
    tiny_store, logits_dir, tmp_path, source_specs, bpe_tokenizer
):
    from predistill.stages.prepare import PrepareConfig
    from predistill.stages.prepare import run as prepare

    other = prepare(
        PrepareConfig(sources=source_specs[:1], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "other"), max_len=64)
    )
    with pytest.raises(PredistillError) as e:
        run(TrainConfig(store=str(other), out=str(tmp_path / "x"), kd_logits=str(logits_dir), alpha=0.5, **FAST))
    assert TokenStore(tiny_store).hash[:12] in str(e.value) and TokenStore(other).hash[:12] in str(e.value)


def test_minillm_with_a_teacher_of_another_tokenizer_is_refused(tiny_store, tmp_path, corpus):
    # (Vanilla KD across tokenizers is aligned and mapped: tests/test_crosstok.py)
    from predistill.stages.tokenizer import TokenizerConfig
    from predistill.stages.tokenizer import run as train_tokenizer

    other_tok = train_tokenizer(
        TokenizerConfig(sources=[f"jsonl:{corpus['code']}"], out=str(tmp_path / "tok"), vocab_size=300)
    )
    teacher, tok = load_model("preset:tiny", str(other_tok))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    with pytest.raises(PredistillError, match="one shared vocabulary"):
        run(
            TrainConfig(
                store=str(tiny_store),
                out=str(tmp_path / "x"),
                kd_teacher=str(tmp_path / "teacher"),
                alpha=0.5,
                minillm=True,
                kd=KDConfig(loss="rkl"),
                **FAST,
            )
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.5), "needs a KD source"),
        (dict(kd_teacher="x", kd_logits="y", alpha=0.5), "not both"),
        (dict(kd_logits="y"), "--alpha 0 would be ignored"),
        (dict(kd_positions="student-entropy", kd_position_fraction=0.2), "needs --kd-logits or --kd-teacher"),
        (dict(kd_logits="y", alpha=0.5, kd_position_fraction=0.2), "needs --kd-positions student-entropy"),
    ],
)
def test_inconsistent_kd_settings_are_refused(tiny_store, tmp_path, kwargs, message):
    with pytest.raises(PredistillError, match=message):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "x"), **{**FAST, **kwargs}))


def test_save_logits_writes_a_complete_aligned_store_a_student_can_use(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    saved = tmp_path / "online-logits"
    truncation = LogitsConfig(mode="topk", top_p=0.9, top_k=7)  # PD's top-p-k, as the run is told
    teacher_run = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "t"),
            save_logits=str(saved),
            save_logits_top_p=0.9,
            save_logits_top_k=7,
            **{**FAST, "steps": 3},
        )
    )
    logits = LogitsStore(saved, store)
    assert (logits.manifest["config"]["top_p"], logits.manifest["config"]["top_k"]) == (0.9, 7)
    assert logits.n_positions == int((store.lengths - 1).sum())
    assert manifest(teacher_run)["save_logits"] == str(saved)

    # instances the 3 steps never reached were written by the final model: check one directly
    from predistill.stages.train import DataOrder

    seen = set(np.concatenate([DataOrder(np.arange(len(store)), 0).global_batch(s, 4) for s in range(3)]).tolist())
    unseen = next(i for i in range(len(store)) if i not in seen)
    final, _ = load_model(str(teacher_run / "hf"))
    with torch.no_grad():
        logits_full = final(input_ids=torch.from_numpy(store[unseen].astype(np.int64))[None]).logits[0, :-1]
    direct = compute_entries(logits_full, truncation)
    stored = logits.instance_entries(unseen)
    np.testing.assert_array_equal(stored.ids, direct.ids)
    np.testing.assert_allclose(
        stored.logprobs, direct.logprobs, atol=logits.manifest["encoding"]["logprob_max_abs_error"]
    )

    student = run(
        TrainConfig(
            store=str(tiny_store), out=str(tmp_path / "s"), kd_logits=str(saved), alpha=0.5, **{**FAST, "steps": 2}
        )
    )
    assert manifest(student)["method"] == "PD"


def test_minillm_is_reverse_kl_on_the_students_own_samples(tiny_store, teacher_dir, tmp_path):
    """The first step's KD loss equals Σ KL(q_S ‖ p_T) over the generated positions of samples drawn
    from the initial student with the run's seed, over the corpus tokens of the batch."""
    from predistill.stages.train import DataOrder, make_batch

    prefix = 16
    out = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "minillm"),
            kd_teacher=str(teacher_dir),
            kd=KDConfig(loss="rkl"),
            minillm=True,
            minillm_prefix=prefix,
            alpha=0.5,
            alpha_schedule="constant",
            **{**FAST, "steps": 1},
        )
    )
    m = manifest(out)
    assert m["method"] == "MiniLLM"

    store = TokenStore(tiny_store)
    student, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    teacher, _ = load_model(str(teacher_dir))
    ids = DataOrder(np.arange(len(store)), 0).global_batch(0, 4)
    inputs, _, mask = make_batch(store, ids, 64, "cpu")
    lengths = torch.as_tensor(store.lengths[ids])
    keep = lengths > prefix + 1
    new = int(min(lengths[keep].max(), inputs.shape[1] + 1)) - prefix
    student.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((0, *map(int, ids))) % (1 << 63))
        samples = student.generate(
            inputs[keep][:, :prefix],
            attention_mask=torch.ones_like(inputs[keep][:, :prefix]),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=store.eos_id,
            use_model_defaults=False,
        )
        log_q = torch.log_softmax(student(input_ids=samples[:, :-1]).logits, -1)[:, prefix - 1 :]
        log_p = torch.log_softmax(teacher(input_ids=samples[:, :-1]).logits, -1)[:, prefix - 1 :]
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1).sum()
    assert metrics(out)[0]["kd_loss"] == pytest.approx(rkl.item() / mask.sum().item(), rel=1e-4)

    s_fpt = forward_flops_per_token(student)
    assert m["flops_per_token"] == flops_per_token(student) + 4 * s_fpt + forward_flops_per_token(teacher)


def test_minillm_needs_reverse_kl_and_a_teacher(tiny_store, teacher_dir, tmp_path):
    with pytest.raises(PredistillError, match="reverse KL"):
        run(
            TrainConfig(
                store=str(tiny_store),
                out=str(tmp_path / "a"),
                kd_teacher=str(teacher_dir),
                kd=KDConfig(loss="kld"),
                minillm=True,
                alpha=0.5,
                **FAST,
            )
        )
    with pytest.raises(PredistillError, match="needs an online teacher"):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "b"), minillm=True, **FAST))


@pytest.mark.slow  # torchrun: one and two gloo ranks
def test_an_online_teacher_beside_an_fsdp_student_is_sharded_and_trains_the_same_run(tiny_store, teacher_dir, tmp_path):
    """Vanilla KD under --fsdp: the teacher's layers are sharded over the ranks too (a 9B/32B teacher
    fits only that way) and two ranks train what one rank does."""
    from conftest import torchrun_train

    args = [
        "--store",
        str(tiny_store),
        "--model",
        "preset:tiny",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--eval-instances",
        "8",
        "--kd-teacher",
        str(teacher_dir),
        "--kd-loss",
        "kld",
        "--alpha",
        "0.5",
        "--alpha-schedule",
        "constant",
    ]
    torchrun_train(1, [*args, "--out", str(tmp_path / "one")])
    torchrun_train(2, [*args, "--out", str(tmp_path / "two"), "--fsdp"])
    losses = [
        [json.loads(line)["kd_loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_sharding_for_inference_keeps_the_teachers_outputs(teacher_dir, tmp_path, monkeypatch):
    """One gloo rank: the sharded teacher's hidden states are the whole teacher's, its head untouched."""
    import socket

    import torch.distributed as dist

    from predistill.modeling.models import final_hidden, model_body
    from predistill.training.distill import shard_for_inference

    with socket.socket() as s:  # a free port; the environment is restored after the test (other tests spawn ranks)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        whole, _ = load_model(str(teacher_dir))
        sharded, _ = load_model(str(teacher_dir))
        shard_for_inference(sharded)
        ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(final_hidden(model_body(sharded), ids), final_hidden(model_body(whole), ids))
        assert type(sharded.get_output_embeddings().weight) is torch.nn.Parameter  # not a DTensor
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# SE-KD (`--kd-positions student-entropy`): the KD term where the student's entropy is highest
# ---------------------------------------------------------------------------------------------
def _chosen_by_student_entropy(student, inputs, mask, fraction):
    """Written out: per row, the ⌈fraction · m⌉ masked positions of highest entropy of the student's
    full-vocabulary distribution (ties to the earlier position)."""
    from predistill.training.positions import n_kept, top_positions

    with torch.no_grad():
        logp = torch.log_softmax(student(input_ids=inputs).logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    chosen = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        where = torch.nonzero(mask[row]).flatten().numpy()
        keep = top_positions(entropy[row].numpy()[where], n_kept(len(where), fraction))
        chosen[row, where[keep]] = True
    return chosen, logp


@pytest.mark.parametrize("source", ["online", "offline"])
def test_se_kd_first_step_is_the_teachers_kd_at_the_students_most_uncertain_positions_and_the_data_elsewhere(
    tiny_store, teacher_dir, logits_dir, tmp_path, source
):
    from predistill.stages.train import DataOrder, make_batch
    from predistill.training.kd import kd_loss

    kd_source = {"kd_teacher": str(teacher_dir)} if source == "online" else {"kd_logits": str(logits_dir)}
    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "sekd"), alpha=0.5, alpha_schedule="constant",
                          kd=KDConfig(loss="nll"), kd_positions="student-entropy", kd_position_fraction=0.25,
                          **kd_source, **{**FAST, "steps": 1}))  # fmt: skip
    store = TokenStore(tiny_store)
    student, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    ids = DataOrder(np.arange(len(store)), 0).global_batch(0, 4)
    inputs, targets, mask = make_batch(store, ids, 64, "cpu")
    chosen, log_q = _chosen_by_student_entropy(student, inputs, mask, 0.25)
    nll = -log_q.gather(-1, targets[..., None]).squeeze(-1)
    elsewhere = float(nll[mask & ~chosen].sum())  # the data's next token as the target: the NLL
    if source == "online":
        teacher, _ = load_model(str(teacher_dir))
        with torch.no_grad():
            p_t = torch.softmax(teacher(input_ids=inputs).logits.float(), -1)
        kd_sum = float(-(p_t * log_q).sum(-1)[chosen].sum()) + elsewhere
    else:
        stored = LogitsStore(logits_dir, store).read_batch(ids, inputs.shape[1])
        with torch.no_grad():
            hidden = student.model(input_ids=inputs).last_hidden_state
        only = type(stored)(stored.ids, stored.logprobs, stored.mask & chosen[..., None])
        _, per_position = kd_loss(hidden, student.lm_head.weight, only, KDConfig(loss="nll"), mask)
        kd_sum = float(per_position.detach().sum()) + elsewhere
    row = metrics(out)[0]
    assert row["lm_loss"] == pytest.approx(float(nll[mask].mean()), rel=1e-4)  # the LM term at every position
    assert row["kd_loss"] == pytest.approx(kd_sum / int(mask.sum()), rel=1e-4)
    m = manifest(out)
    head = 2 * student.get_output_embeddings().weight[: store.vocab_size].numel()
    teacher_fpt = forward_flops_per_token(load_model(str(teacher_dir))[0]) if source == "online" else 0
    assert m["flops_per_token"] == flops_per_token(student, store.vocab_size) + teacher_fpt + head
    assert m["method"].endswith("at student-entropy positions (0.25)")


def test_se_kd_online_gradient_is_lm_everywhere_and_kd_at_the_chosen_positions(tiny_store, teacher_dir):
    """The online source's split (LM + KD on the chosen rows, the NLL at full weight on the rest) has
    the gradient of (1 − α)·Σ NLL + α·(Σ KD(chosen) + Σ NLL(rest)), written out with plain autograd."""
    from predistill.stages.train import make_batch
    from predistill.training.distill import OnlineTeacher

    store = TokenStore(tiny_store)
    teacher = OnlineTeacher(str(teacher_dir), store, KDConfig(loss="kld"), torch.device("cpu"), 64)
    student, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    inputs, targets, mask = make_batch(store, [0, 1, 2], 64, "cpu")
    chosen, _ = _chosen_by_student_entropy(student, inputs, mask, 0.3)
    with torch.no_grad():
        hidden0 = student.model(input_ids=inputs).last_hidden_state
        p_t = torch.softmax(load_model(str(teacher_dir))[0](input_ids=inputs).logits.float(), -1)
    weight = student.lm_head.weight.detach()
    alpha = 0.7
    h = hidden0.clone().requires_grad_()
    lm_sum, kd_sum, _, _ = teacher.losses(
        h, weight, inputs, targets, mask, teacher.only_at(None, chosen, targets), alpha
    )
    ((1 - alpha) * lm_sum + alpha * kd_sum).backward()
    ref = hidden0.clone().requires_grad_()
    log_q = torch.log_softmax(ref @ weight.t(), -1)
    per_nll = -log_q.gather(-1, targets[..., None]).squeeze(-1)
    nll = per_nll[mask].sum()
    kld = (p_t * (torch.log(p_t.clamp_min(1e-30)) - log_q)).sum(-1)[chosen].sum() + per_nll[mask & ~chosen].sum()
    ((1 - alpha) * nll + alpha * kld).backward()
    assert float(lm_sum.detach()) == pytest.approx(float(nll.detach()), rel=1e-4)
    assert float(kd_sum.detach()) == pytest.approx(float(kld.detach()), rel=1e-3)
    torch.testing.assert_close(h.grad, ref.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_in_step_choices_on_two_gloo_ranks_match_one_rank(tiny_store, logits_dir, tmp_path):
    """RHO-1 and SE-KD choose inside the step, per instance: 2 DDP ranks (gloo) train on the same
    tokens and distil at the same positions as 1 rank, so the losses agree."""
    from conftest import torchrun_train

    from predistill.stages.score import ScoreConfig
    from predistill.stages.score import run as score

    score(ScoreConfig(model="preset:tiny", seed=2, store=str(tiny_store), out=str(tmp_path / "ref-scores"),
                      token_record=str(tmp_path / "ref"), shard_size=64, progress=False))  # fmt: skip
    args = ["--store", str(tiny_store), "--model", "preset:tiny", "--steps", "4", "--batch-size", "4",
            "--seq-len", "64", "--lr", "3e-3", "--eval-instances", "8", "--kd-logits", str(logits_dir),
            "--alpha", "0.5", "--alpha-schedule", "constant", "--kd-positions", "student-entropy",
            "--kd-position-fraction", "0.3", "--token-rule", "excess", "--token-fraction", "0.6",
            "--reference-record", str(tmp_path / "ref")]  # fmt: skip
    torchrun_train(1, [*args, "--out", str(tmp_path / "one"), "--micro-batch-size", "2"])
    torchrun_train(2, [*args, "--out", str(tmp_path / "two"), "--micro-batch-size", "1"])
    rows = {name: metrics(tmp_path / name) for name in ("one", "two")}
    for key in ("lm_loss", "kd_loss"):
        np.testing.assert_allclose([r[key] for r in rows["two"]], [r[key] for r in rows["one"]], rtol=1e-5)
    assert manifest(tmp_path / "two")["flops"] == manifest(tmp_path / "one")["flops"]
    # one no-grad head pass serves both choices: counted once, in the student's FLOPs
    m, student = manifest(tmp_path / "one"), load_model("preset:tiny", TokenStore(tiny_store).tokenizer())[0]
    head = 2 * student.get_output_embeddings().weight[: TokenStore(tiny_store).vocab_size].numel()
    assert m["student_flops_per_token"] == flops_per_token(student, TokenStore(tiny_store).vocab_size) + head
    assert m["flops_per_token"] == m["student_flops_per_token"]  # offline: no teacher at training time


def test_a_new_kd_source_is_one_subclass_and_one_branch(tiny_store, tmp_path, monkeypatch):
    # docs/architecture.md's recipe, followed: a KDSource subclass (flops_per_token, batch, losses) that
    # build_kd_source returns (here patched in for its new branch); train does the rest
    from predistill.formats.logits import TeacherTargets
    from predistill.stages import train as train_stage
    from predistill.training import distill

    class UnigramTeacher(distill.KDSource):
        """A 'teacher' that predicts the store's 8 most frequent tokens, by frequency, at every position."""

        flops_per_token = 3  # what the run's FLOPs must count per trained token

        def __init__(self, store: TokenStore, kd_cfg: KDConfig):
            counts = np.bincount(np.concatenate([store[i] for i in range(len(store))]), minlength=store.vocab_size)
            top = np.argsort(-counts, kind="stable")[:8]
            self.ids = torch.from_numpy(top.astype(np.int64))
            self.logprobs = torch.log(torch.from_numpy(counts[top] / counts[top].sum()).float())
            self.kd_cfg, self.batches = kd_cfg, 0

        def batch(self, ids, inputs):
            self.batches += 1
            shape = (*inputs.shape, len(self.ids))
            ones = torch.ones(shape, dtype=torch.bool, device=inputs.device)
            return TeacherTargets(self.ids.expand(shape).to(inputs.device), self.logprobs.expand(shape), ones)

        def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
            return distill.offline_losses(hidden, weight, targets, kd_batch, self.kd_cfg, mask, alpha)

    sources: list[UnigramTeacher] = []

    def build(cfg, store, model, device):
        sources.append(UnigramTeacher(store, cfg.kd))
        return sources[-1]

    monkeypatch.setattr(train_stage, "build_kd_source", build)
    cfg = TrainConfig(
        store=str(tiny_store),
        out=str(tmp_path / "unigram"),
        kd_teacher="preset:tiny",  # selects a KD source; the patched branch decides which
        alpha=1.0,
        alpha_schedule="constant",
        kd=KDConfig(loss="kld"),
        **{**FAST, "steps": 12},
    )
    out = run(cfg)
    rows, m = metrics(out), manifest(out)
    assert sources[0].batches == 12  # one micro-batch a step
    # the student moves towards the unigram: its KL to it falls
    assert rows[-1]["kd_loss"] < 0.6 * rows[0]["kd_loss"]
    assert m["flops_per_token"] == m["student_flops_per_token"] + 3
    assert m["teacher_flops"] == pytest.approx(3 * m["tokens"])
