"""Distillation across tokenizers (predistill.text.crosstok, distill's cross-tokenizer sources, `prepare
--source store:`): alignment on hand-made spellings, spellings of real tokenizers, the vocabulary
map, the mapped loss and ULD against direct references, and the whole path through `train`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_train_at_checkpoint, torchrun_train

from predistill.cli import main as cli_main
from predistill.core.artifacts import STAGING_MARK, PredistillError
from predistill.formats.logits import TeacherTargets
from predistill.formats.store import TokenStore
from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer
from predistill.text.crosstok import EOS_BYTES, MappingStats, Speller, VocabMap, align, map_targets, token_spellings
from predistill.training.kd import KDConfig, fused_lm_kd_loss, fused_lm_uld_loss

EOS = 0


def speller(*pieces: str | bytes | None) -> Speller:
    """A vocabulary written out: id 0 is EOS, then one id per piece (str: its UTF-8 bytes)."""
    spellings = [EOS_BYTES] + [p.encode() if isinstance(p, str) else p for p in pieces]
    return Speller(spellings, EOS)


def ids_of(sp: Speller, *pieces: str | bytes) -> np.ndarray:
    index = {s: i for i, s in enumerate(sp.spellings)}
    return np.array([EOS if p == "<eos>" else index[p.encode() if isinstance(p, str) else p] for p in pieces])


# ---------------------------------------------------------------------------------------------
# alignment: student position i ↔ teacher position j that has read exactly the same bytes
# ---------------------------------------------------------------------------------------------
def test_merges_that_split_differently_align_where_both_have_read_the_same_prefix():
    student = speller("Hel", "lo", " wor", "ld", "!")
    teacher = speller("He", "llo", " world", "!")
    s = ids_of(student, "Hel", "lo", " wor", "ld", "!")
    t = ids_of(teacher, "He", "llo", " world", "!")
    # "Hel" ends inside "llo"; "Hello" = teacher 0..1; "Hello wor" inside " world"; "Hello world" = 0..2
    assert align(s, t, student, teacher).tolist() == [-1, 1, -1, 2, -1]  # teacher's last token predicts nothing
    assert align(s, t, student, teacher, teacher_positions=len(t)).tolist() == [-1, 1, -1, 2, 3]


def test_multibyte_characters_split_into_byte_tokens_align_only_after_the_whole_character():
    student = speller("caf", "é", " au")
    teacher = speller("ca", "f", b"\xc3", b"\xa9", " au", " lait")
    s = ids_of(student, "caf", "é", " au")
    t = ids_of(teacher, "ca", "f", b"\xc3", b"\xa9", " au", " lait")
    assert align(s, t, student, teacher).tolist() == [1, 3, 4]
    # and the other way round: the byte halfway through "é" has no student position
    assert align(t, s, teacher, student, teacher_positions=len(s)).tolist() == [-1, 0, -1, 1, 2, -1]


def test_whitespace_runs_tokenised_differently():
    student = speller("x", "  ", " y", "   ", "z")
    teacher = speller("x", " ", "  y", "  ", " z")
    s = ids_of(student, "x", "  ", " y", "   ", "z")
    t = ids_of(teacher, "x", " ", "  y", "  ", " z")
    # "x" | "x  " (teacher: "x ", then "x   y") | "x   y" = teacher 0..2 | "x   y   " (teacher: 7 bytes,
    # then 9) | the whole text
    assert align(s, t, student, teacher, teacher_positions=len(t)).tolist() == [0, -1, 2, -1, 4]


def test_eos_between_documents_aligns_with_eos_only():
    student = speller("a", "b", "ab")
    teacher = speller("ab", "a", "b")
    s = ids_of(student, "ab", "<eos>", "a", "b", "<eos>")
    t = ids_of(teacher, "ab", "<eos>", "ab", "<eos>")
    assert align(s, t, student, teacher, teacher_positions=len(t)).tolist() == [0, 1, -1, 2, 3]
    # a text that happens to spell like the byte after "ab" is not an EOS: nothing aligns past it
    odd = speller("ab", "\u00ff")
    assert align(ids_of(odd, "ab", "\u00ff"), t, odd, teacher).tolist() == [0, -1]


def test_a_dummy_prefix_space_at_each_document_start_is_not_read():
    student = speller(" Hi", " there", " Yo")  # SentencePiece: "▁Hi" for a document "Hi"
    teacher = speller("Hi", " there", "Yo")
    s = ids_of(student, " Hi", " there", "<eos>", " Yo")
    t = ids_of(teacher, "Hi", " there", "<eos>", "Yo")
    assert align(s, t, student, teacher, teacher_positions=len(t)).tolist() == [0, 1, 2, 3]


def test_nothing_aligns_past_the_first_byte_where_the_two_texts_differ():
    student = speller("ab", "c", "d")
    teacher = speller("ab", "x", "d")
    s, t = ids_of(student, "ab", "c", "d"), ids_of(teacher, "ab", "x", "d")
    assert align(s, t, student, teacher, teacher_positions=3).tolist() == [0, -1, -1]


# ---------------------------------------------------------------------------------------------
# spellings of real tokenizers
# ---------------------------------------------------------------------------------------------
TEXTS = [
    "Hello wörld, naïve café — 東京 is   big.\n\n  def f(x):\n\treturn x  ",
    "To be, or not to be: that is the question.",
    "emoji 🙂 and tabs\t\tend",
]


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory, source_specs) -> Path:
    """A second byte-level BPE on the test corpus, with another vocabulary than `bpe_tokenizer`."""
    out = tmp_path_factory.mktemp("tok300") / "bpe"
    return train_tokenizer(TokenizerConfig(sources=source_specs, out=str(out), vocab_size=300))


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A Metaspace BPE with byte fallback and a dummy prefix, as Llama 2 / Gemma tokenizers are built."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", *bytes_alphabet])
    bpe.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def test_byte_level_spellings_spell_the_text_exactly(bpe_tokenizer):
    from predistill.modeling.models import load_tokenizer

    tok = load_tokenizer(str(bpe_tokenizer))
    sp = Speller.of(tok)
    for text in TEXTS:
        data, lengths = sp.spell(np.array(tok.encode(text, add_special_tokens=False)))
        assert data.tobytes() == text.encode() and lengths.sum() == len(text.encode())
    assert sp.spellings[tok.eos_token_id] == EOS_BYTES


def test_sentencepiece_spellings_map_the_space_marker_and_byte_fallback(sentencepiece_like):
    spellings = token_spellings(sentencepiece_like)
    assert spellings[sentencepiece_like.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    sp = Speller.of(sentencepiece_like)
    text = "東京 and the fox"  # 東京 is not in the training text: byte fallback
    data, _ = sp.spell(np.array(sentencepiece_like.encode(text, add_special_tokens=False)))
    assert data.tobytes() == b" " + text.encode()  # the dummy prefix, which `align` takes off


@pytest.mark.parametrize("pair", ["bpe-small", "bpe-sentencepiece"])
def test_every_aligned_pair_of_real_tokenisations_has_read_the_same_text(
    pair, bpe_tokenizer, small_bpe, sentencepiece_like
):
    from predistill.modeling.models import load_tokenizer

    a = load_tokenizer(str(bpe_tokenizer))
    b = load_tokenizer(str(small_bpe)) if pair == "bpe-small" else sentencepiece_like

    def encode(tok, docs):
        out = []
        for doc in docs:
            out += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
        return np.array(out)

    def read(tok, ids):  # the text read after `ids`, documents joined by "|" (decode drops a dummy prefix)
        docs = [[]]
        for i in ids.tolist():
            docs.append([]) if i == tok.eos_token_id else docs[-1].append(i)
        return "|".join(tok.decode(doc) for doc in docs)

    s, t = encode(a, TEXTS), encode(b, TEXTS)
    where = align(s, t, Speller.of(a), Speller.of(b), teacher_positions=len(t))
    assert (where >= 0).mean() > 0.3
    for i in np.flatnonzero(where >= 0):
        assert read(a, s[: i + 1]) == read(b, t[: where[i] + 1])


# ---------------------------------------------------------------------------------------------
# the vocabulary map and the mapped targets
# ---------------------------------------------------------------------------------------------
def test_vocab_map_rules():
    student = speller("the", " the", " th", " t", "re", None)
    # the student's tokenizer splits " there" as " th|ere" and "zz" as bytes it has no token for
    student.first_token = {" there": 3, "zz": None, "the": 1, " the": 2}.get
    teacher = speller(" the", " there", "zz", None, "the", b"\xe2\x80")
    maps = {rule: VocabMap(teacher, student, rule) for rule in ("exact", "first", "prefix")}
    # teacher ids: 0 EOS, 1 " the", 2 " there", 3 "zz", 4 special, 5 "the", 6 half a character
    assert maps["exact"].to_student.tolist() == [0, 2, -1, -1, -1, 1, -1]
    assert maps["first"].to_student.tolist() == [0, 2, 3, -1, -1, 1, -1]  # " there" → " th", as the student reads it
    assert maps["prefix"].to_student.tolist() == [0, 2, 2, -1, -1, 1, -1]  # " there" → the longest prefix " the"
    assert maps["first"].exact.tolist() == [True, True, False, False, False, True, False]
    with pytest.raises(PredistillError, match="--kd-vocab-map"):
        VocabMap(teacher, student, "spread")


def test_first_falls_back_to_the_longest_prefix_where_the_students_first_token_is_not_a_prefix():
    student = speller("ab", "a", "x")
    student.first_token = {"abc": 3}.get  # a tokenizer that normalises: "abc" → "x…"
    teacher = speller("abc")
    assert VocabMap(teacher, student, "first").to_student.tolist() == [0, 1]


def test_mapped_targets_sum_entries_that_land_on_one_student_token_and_drop_unmapped_ones():
    student = speller("a", "ab", "c")
    teacher = speller("a", "ab", "abc", "zz", "c")
    vocab = VocabMap(teacher, student, "prefix")  # "abc" → "ab", "zz" unmapped
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.25, 0.0, 0.0]])
    ids = torch.tensor([[2, 3, 4, 1], [5, 1, 0, 0]])  # "ab", "abc", "zz", "a" | "c", "a"
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    mapped, retained, kept = map_targets(TeacherTargets(ids, torch.where(mask, p.log(), 0), mask), vocab)
    got = [
        {int(i): round(float(w), 6) for i, w, m in zip(*row) if m}
        for row in zip(mapped.ids, mapped.logprobs.exp(), mapped.mask)
    ]
    assert got == [{2: 0.7, 1: 0.1}, {3: 0.5, 1: 0.25}]
    assert retained == pytest.approx(1.75) and kept == pytest.approx(1.55)


def _dense_reference_kd(hidden, weight, t_probs, to_student, next_tokens, alpha, tail):
    """Direct: per row, the teacher's mass moved onto the student's vocabulary with a dense matrix,
    KL(F ‖ q) over the student tokens it reaches (renormalised; `bucket`: plus the tail class)."""
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    logq = torch.log_softmax(hidden @ weight.T, -1)
    move = torch.zeros(t_probs.shape[1], weight.shape[0], dtype=torch.float64)
    for t, s in enumerate(to_student.tolist()):
        if s >= 0:
            move[t, s] = 1.0
    p = t_probs.double() @ move  # [rows, V_student]
    lm = -logq.gather(1, next_tokens[:, None])[:, 0]
    kd = []
    for r in range(len(p)):
        on = p[r] > 0
        if tail == "drop":
            f = p[r][on] / p[r][on].sum()
            kd.append((f * (f.log() - logq[r][on])).sum())
        else:
            f = torch.cat([p[r][on], (1 - p[r][on].sum()).clamp(min=1e-8)[None]])
            q = torch.cat([logq[r][on], torch.log1p(-logq[r][on].exp().sum())[None]])
            kd.append((f * (f.log() - q)).sum())
    kd = torch.stack(kd)
    ((1 - alpha) * lm.sum() + alpha * kd.sum()).backward()
    return lm.detach(), kd.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("rule, tail", [("prefix", "drop"), ("exact", "bucket"), ("exact", "drop"), ("first", "drop")])
def test_mapped_kd_loss_equals_a_direct_dense_implementation(rule, tail):
    from predistill.training.distill import _AcrossTokenizers

    student = speller("a", "b", "ab", " ", " a", "ba")
    student.first_token = {" ab": 5, "bab": 3, "aa": 1}.get  # " a|b", "ab|ab", "a|a"
    teacher = speller("a", "b", "ab", " ab", " a", "bab", "aa", " ")
    g = torch.Generator().manual_seed(0)
    rows, h = 6, 8
    t_probs = torch.softmax(torch.randn(rows, len(teacher.spellings), generator=g) * 2, -1)
    t_probs[:, 0] *= 0.1  # little mass on EOS
    t_probs /= t_probs.sum(-1, keepdim=True)
    k = 5  # each row keeps its 5 most probable teacher ids (a top-k store)
    top = t_probs.topk(k, -1)
    targets = TeacherTargets(top.indices, top.values.log(), torch.ones(rows, k, dtype=torch.bool))
    source = _AcrossTokenizers.__new__(_AcrossTokenizers)
    source.kd_cfg = KDConfig(loss="kld", tail=tail, vocab_map=rule).validate()
    source.vocab = VocabMap(teacher, student, rule)
    source.counts = MappingStats()
    batch_rows, positions = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 2, 3, 0, 1, 3])
    laid = source._layout(targets, batch_rows, positions, (2, 4))
    hidden = torch.randn(2, 4, h, generator=g, requires_grad=True)
    weight = (torch.randn(len(student.spellings), h, generator=g) * 0.5).requires_grad_()
    next_tokens = torch.randint(0, len(student.spellings), (2, 4), generator=g)
    alpha = 0.7
    lm_sum, kd_sum, _, kd_pp = fused_lm_kd_loss(
        hidden, weight, next_tokens, laid, source.kd_cfg, weights=(1 - alpha, alpha)
    )
    ((1 - alpha) * lm_sum + alpha * kd_sum).backward()

    dense = torch.zeros(rows, len(teacher.spellings)).scatter_(1, top.indices, top.values)
    flat = batch_rows * 4 + positions
    ref_lm, ref_kd, ref_gh, ref_gw = _dense_reference_kd(
        hidden.reshape(8, h)[flat], weight, dense, source.vocab.to_student, next_tokens.reshape(-1)[flat], alpha, tail
    )
    assert kd_pp.reshape(-1)[flat].double().numpy() == pytest.approx(ref_kd.numpy(), abs=1e-5)
    # positions without teacher entries (1 of row 0, 2 of row 1) get the LM loss only
    assert kd_pp.reshape(-1)[[1, 6]].tolist() == [0.0, 0.0]
    grad_h = hidden.grad.reshape(8, h)
    # the reference covers the distilled rows only; their LM terms are in both
    np.testing.assert_allclose(grad_h[flat].numpy(), ref_gh.numpy(), atol=1e-5)
    mapped_mass = source.take_counts()[3]
    assert mapped_mass == pytest.approx(float((dense @ _move(source.vocab, len(student.spellings))).sum()), rel=1e-5)


def _move(vocab: VocabMap, v_student: int) -> torch.Tensor:
    move = torch.zeros(len(vocab.to_student), v_student)
    for t, s in enumerate(vocab.to_student.tolist()):
        if s >= 0:
            move[t, s] = 1.0
    return move


@pytest.mark.parametrize("sampled", [False, True])
def test_uld_equals_sorted_probability_distance_written_out(sampled):
    g = torch.Generator().manual_seed(1)
    rows, h, v, k = 7, 6, 30, 5
    hidden = torch.randn(rows, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.7).requires_grad_()
    t_probs = torch.softmax(torch.randn(rows, 50, generator=g) * 2, -1)  # a teacher with 50 ids
    top = t_probs.topk(k, -1)
    n = torch.tensor([5, 1, 3, 5, 2, 4, 0])  # row 6: no teacher entries (no KD)
    mask = torch.arange(k)[None, :] < n[:, None]
    kept = top.values * mask
    probs = kept / kept.sum(-1, keepdim=True).clamp(min=1e-12) if sampled else kept  # sampled: weights sum to 1
    targets = TeacherTargets(top.indices, torch.where(mask, probs.log(), 0), mask)
    next_tokens = torch.randint(0, v, (rows,), generator=g)
    cfg = KDConfig(loss="uld").validate()
    lm_sum, kd_sum, _, kd_pp = fused_lm_uld_loss(hidden, weight, next_tokens, targets, cfg, weights=(0.4, 0.6))
    (0.4 * lm_sum + 0.6 * kd_sum).backward()

    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    q = torch.softmax(hd @ wd.T, -1)
    ref = []
    for r in range(rows):
        m = int(n[r])
        if m == 0:
            ref.append(torch.zeros((), dtype=torch.float64))
            continue
        p = probs[r, :m].double()
        q_sorted = q[r].sort(descending=True).values[:m]
        p_rest = (1 - p.sum()).clamp(min=0)
        ref.append((p.sort(descending=True).values - q_sorted).abs().sum() + (p_rest - (1 - q_sorted.sum())).abs())
    ref = torch.stack(ref)
    lm = -torch.log_softmax(hd @ wd.T, -1).gather(1, next_tokens[:, None])[:, 0]
    (0.4 * lm.sum() + 0.6 * ref.sum()).backward()
    np.testing.assert_allclose(kd_pp.double().numpy(), ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(hidden.grad.numpy(), hd.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(weight.grad.numpy(), wd.grad.numpy(), atol=1e-5)


def test_uld_refuses_a_temperature():
    with pytest.raises(PredistillError, match="τ = 1"):
        fused_lm_uld_loss(
            torch.zeros(1, 2),
            torch.zeros(3, 2),
            torch.zeros(1, dtype=torch.long),
            TeacherTargets(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)),
            KDConfig.from_temperature("2.0", loss="uld"),
        )


# ---------------------------------------------------------------------------------------------
# `prepare --source store:DIR`: one instance per instance, the val split carried over
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def derived_store(tmp_path_factory, tiny_store, small_bpe) -> Path:
    out = tmp_path_factory.mktemp("derived") / "store"
    return prepare(PrepareConfig(sources=[f"store:{tiny_store}"], tokenizer=str(small_bpe), out=str(out)))


def test_derived_store_holds_the_same_text_instance_by_instance(tiny_store, derived_store):
    src, dst = TokenStore(tiny_store), TokenStore(derived_store)
    assert len(dst) == len(src) and dst.tokenizer_hash != src.tokenizer_hash
    assert [dst.decode(i) for i in range(len(dst))] == [src.decode(i) for i in range(len(src))]
    assert dst.manifest["derived_from"]["hash"] == src.hash
    src_val, dst_val = TokenStore(Path(tiny_store) / "val"), TokenStore(derived_store / "val")
    assert [dst_val.decode(i) for i in range(len(dst_val))] == [src_val.decode(i) for i in range(len(src_val))]
    assert dst_val.manifest["derived_from"]["hash"] == src_val.hash
    assert dst.domain_ids.tolist() == src.domain_ids.tolist()


def test_derived_store_is_deterministic_and_a_rerun_is_a_noop(tiny_store, small_bpe, derived_store, tmp_path, capsys):
    again = prepare(PrepareConfig(sources=[f"store:{tiny_store}"], tokenizer=str(small_bpe), out=str(tmp_path / "s")))
    for name in ("tokens.bin", "offsets.npy", "val/tokens.bin"):
        assert (again / name).read_bytes() == (derived_store / name).read_bytes()
    prepare(PrepareConfig(sources=[f"store:{tiny_store}"], tokenizer=str(small_bpe), out=str(again)))
    assert "already complete" in capsys.readouterr().err


def test_a_derived_store_killed_midway_is_redone_to_the_same_bytes(tiny_store, small_bpe, derived_store, tmp_path):
    out = tmp_path / "s"
    partial = tmp_path / "s.partial"  # what SIGKILL leaves: a half-written staging directory, no OUT
    (partial / "val").mkdir(parents=True)
    (partial / "tokens.bin").write_bytes(b"\x00" * 10)
    (partial / "val" / "manifest.json").write_text("{}")
    (partial / STAGING_MARK).write_text("token_store")  # written first, when the staging directory is made
    prepare(PrepareConfig(sources=[f"store:{tiny_store}"], tokenizer=str(small_bpe), out=str(out)))
    assert not partial.exists()
    for name in ("tokens.bin", "offsets.npy", "manifest.json", "val/tokens.bin", "val/manifest.json"):
        assert (out / name).read_bytes() == (derived_store / name).read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "builtin:python"], "cannot be mixed"),
        (["--val-fraction", "0.1"], "drop --val-fraction"),
        (["--max-tokens-per-domain", "100"], "drop --max-tokens-per-domain"),
    ],
)
def test_derived_store_refusals(tiny_store, small_bpe, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "prepare",
                "--source",
                f"store:{tiny_store}",
                "--tokenizer",
                str(small_bpe),
                "--out",
                str(tmp_path / "o"),
                *extra,
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# train: offline logits of the teacher's store, and an online teacher, across tokenizers
# ---------------------------------------------------------------------------------------------
# α held constant: these tests check the KD term from the first step (the default WSD-α starts at 0)
FAST = [
    "--model",
    "preset:tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "48",
    "--lr",
    "3e-3",
    "--eval-instances",
    "8",
    "--alpha",
    "0.5",
    "--alpha-schedule",
    "constant",
]


@pytest.fixture(scope="module")
def teacher_logits(tmp_path_factory, tiny_store) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    cli_main(
        [
            "score",
            "--model",
            "preset:tiny",
            "--store",
            str(tiny_store),
            "--out",
            str(out / "scores"),
            "--logits-out",
            str(out / "logits"),
            "--logits-mode",
            "topk",
            "--top-k",
            "8",
            "--no-progress",
        ]
    )
    return out / "logits"


def _run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "predistill", "train", *args], check=True, capture_output=True)


def test_offline_logits_teach_a_student_with_another_tokenizer(derived_store, teacher_logits, tmp_path):
    out = tmp_path / "run"
    cli_main(
        [
            "train",
            "--store",
            str(derived_store),
            "--out",
            str(out),
            "--kd-logits",
            str(teacher_logits),
            "--steps",
            "3",
            *FAST,
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    alignment = manifest["kd_alignment"]
    assert 0.3 < alignment["aligned_fraction"] <= 1 and 0.5 < alignment["mapped_mass"] <= 1 + 1e-9
    assert alignment["positions"] == manifest["tokens"]  # every step distilled (constant α)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["kd_aligned_fraction"] <= 1 and r["kd_loss"] > 0 for r in rows)
    assert manifest["teacher_flops"] == 0  # the teacher pass was paid offline


@pytest.mark.slow
def test_killed_cross_tokenizer_run_resumes_to_the_same_manifest(derived_store, teacher_logits, tmp_path):
    args = [
        "--store",
        str(derived_store),
        "--kd-logits",
        str(teacher_logits),
        "--steps",
        "10",
        "--save-every",
        "2",
        "--kd-vocab-map",
        "exact",
        "--kd-tail",
        "bucket",
        *FAST,
    ]
    _run(["--out", str(tmp_path / "ref"), *args])
    killed = tmp_path / "killed"
    kill_train_at_checkpoint(["--out", str(killed), *args], killed, 4)
    _run(["--out", str(killed), *args])
    ref, got = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "ref", killed))
    assert got["kd_alignment"] == ref["kd_alignment"]
    assert (killed / "hf" / "model.safetensors").read_bytes() == (
        tmp_path / "ref" / "hf" / "model.safetensors"
    ).read_bytes()


def test_uld_trains_across_tokenizers(derived_store, teacher_logits, tmp_path):
    out = tmp_path / "uld"
    cli_main(
        [
            "train",
            "--store",
            str(derived_store),
            "--out",
            str(out),
            "--kd-logits",
            str(teacher_logits),
            "--kd-loss",
            "uld",
            "--steps",
            "2",
            *FAST,
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kd_alignment"]["aligned_fraction"] > 0.3 and manifest["kd_alignment"]["mapped_mass"] is None


def test_a_store_not_derived_from_the_logits_store_is_refused_naming_both_hashes(
    tiny_store, small_bpe, teacher_logits, tmp_path, capsys
):
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text(json.dumps({"text": "a text the teacher never saw. " * 20}) + "\n")
    other = prepare(
        PrepareConfig(sources=[f"jsonl:{fresh}"], tokenizer=str(small_bpe), out=str(tmp_path / "other"), max_len=32)
    )
    with pytest.raises(SystemExit) as e:
        cli_main(
            [
                "train",
                "--store",
                str(other),
                "--out",
                str(tmp_path / "r"),
                "--kd-logits",
                str(teacher_logits),
                "--steps",
                "1",
                *FAST,
            ]
        )
    err = capsys.readouterr().err
    made_from = json.loads((teacher_logits / "manifest.json").read_text())["store_hash"]
    assert e.value.code != 0 and made_from[:12] in err and TokenStore(other).hash[:12] in err
    assert "prepare --source store:" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_store) -> Path:
    """A trained tiny model with the 512-token BPE: an HF teacher of another tokenizer than `small_bpe`."""
    out = tmp_path_factory.mktemp("teacher_run") / "run"
    cli_main(
        [
            "train",
            "--store",
            str(tiny_store),
            "--out",
            str(out),
            "--model",
            "preset:tiny",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--eval-instances",
            "4",
        ]
    )
    return out


def test_an_online_teacher_with_another_tokenizer_is_aligned_and_its_flops_counted(
    derived_store, teacher_run, tmp_path
):
    out = tmp_path / "online"
    cli_main(
        [
            "train",
            "--store",
            str(derived_store),
            "--out",
            str(out),
            "--kd-teacher",
            str(teacher_run),
            "--steps",
            "2",
            *FAST,
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    teacher_params = json.loads((teacher_run / "manifest.json").read_text())["params"]["total"]
    # 2·N_teacher per teacher token; the teacher's tokens are longer (512 vs 300 ids): fewer of them
    ratio = manifest["teacher_flops"] / manifest["tokens"] / (2 * teacher_params)
    assert 0.3 < ratio < 1.0
    assert manifest["kd_alignment"]["aligned_fraction"] > 0.3 and manifest["kd_alignment"]["mapped_mass"] > 0.5


def test_uld_with_a_same_vocabulary_online_teacher_is_refused(tiny_store, teacher_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(
            [
                "train",
                "--store",
                str(tiny_store),
                "--out",
                str(tmp_path / "r"),
                "--kd-teacher",
                str(teacher_run),
                "--kd-loss",
                "uld",
                "--steps",
                "1",
                *FAST,
            ]
        )
    assert "uld" in capsys.readouterr().err


@pytest.mark.slow  # torchrun: one and two gloo ranks
def test_two_ranks_align_and_count_like_one(derived_store, teacher_logits, tmp_path):
    args = [
        "--store",
        str(derived_store),
        "--kd-logits",
        str(teacher_logits),
        "--steps",
        "3",
        *FAST,
        "--batch-size",
        "4",
    ]
    torchrun_train(1, ["--out", str(tmp_path / "one"), *args, "--micro-batch-size", "2"])
    torchrun_train(2, ["--out", str(tmp_path / "two"), *args, "--micro-batch-size", "1"])
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    counts = ("positions", "aligned_positions", "teacher_mass", "mapped_mass_sum")
    assert [two["kd_alignment"][k] for k in counts] == pytest.approx([one["kd_alignment"][k] for k in counts], rel=1e-9)
    rows = [
        [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    ]
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5)
