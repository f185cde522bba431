"""The logits store: truncation, sampling, encoding, write/read, resume, store checks, real teacher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from predistill.core.artifacts import PredistillError
from predistill.formats.logits import (
    P_SLACK,
    Encoding,
    LogitsConfig,
    LogitsStore,
    LogitsStoreWriter,
    compute_entries,
    dequantize_logprobs,
    entries_to_targets,
    global_positions,
    pack_bits,
    quantize_logprobs,
    sample_entries,
    teacher_targets,
    truncate_top_p_k,
    unpack_bits,
)
from predistill.formats.store import TokenStore, TokenStoreWriter

VOCAB, HID = 300, 16  # 300 ids → 9-bit ids: exercises the generic bit packer


# ---------------------------------------------------------------------------------------------
# fixtures: a synthetic token store and a deterministic fake teacher
# ---------------------------------------------------------------------------------------------
def make_store(path: Path, seed: int, n_instances: int = 11) -> TokenStore:
    rng = np.random.default_rng(seed)
    writer = TokenStoreWriter(path, VOCAB)
    for i in range(n_instances):
        length = 1 if i == 5 else int(rng.integers(2, 30))  # instance 5 has no positions at all
        writer.append(rng.integers(0, VOCAB, length), domain=0)
    writer.finish({"tokenizer": {"hash": "tok-hash-1"}, "eos_id": 0, "domains": [{"name": "synthetic"}]})
    return TokenStore(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenStore:
    return make_store(tmp_path_factory.mktemp("lstore") / "store", seed=0)


LM_HEAD = torch.randn(VOCAB, HID, generator=torch.Generator().manual_seed(99))


def hidden_of(instance: int, length: int) -> torch.Tensor:
    """The fake teacher's final hidden states of an instance: a function of the instance only."""
    return torch.randn(length, HID, generator=torch.Generator().manual_seed(1000 + instance)) * 2.5


def feed(writer: LogitsStoreWriter, store: TokenStore, ids, batch_size: int = 3) -> None:
    for batch_ids, tokens, lengths in store.iter_batches(batch_size, ids=ids):
        hidden = torch.zeros(len(batch_ids), tokens.shape[1], HID)
        for b, i in enumerate(batch_ids):
            hidden[b, : lengths[b]] = hidden_of(int(i), int(lengths[b]))
        writer.add_hidden(batch_ids, hidden, LM_HEAD, tokens, lengths)


def write_store(out: Path, store: TokenStore, cfg: LogitsConfig, batch_size: int = 3) -> dict:
    writer = LogitsStoreWriter(out, store, cfg, vocab_size=VOCAB, teacher="fake")
    feed(writer, store, writer.todo_instances(), batch_size)
    return writer.finish()


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


TOPK = LogitsConfig(mode="topk", top_p=0.9, top_k=5, shard_instances=4)
SAMPLE = LogitsConfig(mode="sample", samples=6, shard_instances=4, seed=3)
# hot draws reach rare ids: a wider log-prob range so that nothing is clipped
SAMPLE_T2 = LogitsConfig(
    mode="sample", samples=6, sample_temperature=2.0, shard_instances=4, logprob_bits=12, logprob_min=-60.0
)


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------
def reference_top_p_k(logits: torch.Tensor, p: float, k: int):
    """Direct recomputation: stable descending sort, fp64 cumsum, cut at mass ≥ p, then ≤ k."""
    rows = []
    for lp in torch.log_softmax(logits.float(), -1):
        values, ids = torch.sort(lp, descending=True, stable=True)
        cum = torch.cumsum(values.double().exp(), 0)
        reached = torch.nonzero(cum >= p - P_SLACK).flatten()
        n = min(int(reached[0]) + 1 if len(reached) else len(lp), k)
        rows.append((ids[:n].tolist(), values[:n].tolist()))
    return rows


def edge_case_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(VOCAB, generator=g) * s for s in (0.1, 1.0, 3.0, 10.0) for _ in range(6)]
    rows.append(torch.zeros(VOCAB))  # uniform: ties everywhere
    tie = torch.randn(VOCAB, generator=g)
    tie[[7, 100, 250, 3]] = 9.0  # a four-way tie at the top: straddles every small k
    rows.append(tie)
    two = torch.full((VOCAB,), -5.0)
    two[[42, 17]] = 5.0  # two equal entries holding ~all the mass
    rows.append(two)
    one_hot = torch.full((VOCAB,), -50.0)
    one_hot[123] = 50.0
    rows.append(one_hot)
    return torch.stack(rows)


@pytest.mark.parametrize("p,k", [(0.95, 5), (1.0, 7), (0.5, 1), (0.9, VOCAB), (0.3, 2 * VOCAB), (1.0, VOCAB), (0.5, 3)])
def test_truncation_equals_direct_recomputation(p, k):
    logits = edge_case_logits()
    entries = truncate_top_p_k(logits, p, k)
    expected = reference_top_p_k(logits, p, k)
    offsets = entries.offsets
    assert entries.n.tolist() == [len(ids) for ids, _ in expected]
    for r, (ids, values) in enumerate(expected):
        a, b = offsets[r], offsets[r + 1]
        assert entries.ids[a:b].tolist() == ids, f"row {r}"
        assert np.array_equal(entries.logprobs[a:b], np.asarray(values, np.float32)), f"row {r}"
    assert (entries.n >= 1).all() and (entries.n <= min(k, VOCAB)).all()


def test_truncation_edge_semantics():
    logits = edge_case_logits()
    uniform, tie, two, one_hot = range(len(logits) - 4, len(logits))
    # p = 1 keeps k entries (nothing reaches the mass earlier); ties resolve to lower ids first
    e = truncate_top_p_k(logits, 1.0, 4)
    assert e.split([1] * len(logits))[uniform].ids.tolist() == [0, 1, 2, 3]
    assert e.split([1] * len(logits))[tie].ids.tolist() == [3, 7, 100, 250]
    # uniform at p = 0.5 over 300 ids keeps exactly 150 (the slack absorbs fp32 rounding)
    assert truncate_top_p_k(logits[uniform : uniform + 1], 0.5, VOCAB).n.tolist() == [150]
    # a top-2 pair with ~all the mass: p = 0.95 keeps both, p = 0.4 one; the one-hot row keeps one
    assert truncate_top_p_k(logits[two : two + 1], 0.95, 50).ids.tolist() == [17, 42]
    assert truncate_top_p_k(logits[two : two + 1], 0.4, 50).n.tolist() == [1]
    assert truncate_top_p_k(logits[one_hot : one_hot + 1], 0.99, 50).ids.tolist() == [123]


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_sampling_estimator_is_unbiased():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = torch.softmax(logits, 0).numpy()
    n_pos, n_draws = 6000, 4
    entries = sample_entries(logits.expand(n_pos, -1), n_draws, np.arange(n_pos), seed=11)
    estimate = np.zeros(len(p))
    np.add.at(estimate, entries.ids, entries.counts / n_draws)
    estimate /= n_pos
    sigma = np.sqrt(p * (1 - p) / (n_pos * n_draws))
    assert (np.abs(estimate - p) < 4 * sigma + 1e-9).all(), (estimate, p)
    assert (entries.counts >= 1).all() and (np.add.reduceat(entries.counts, entries.offsets[:-1]) == n_draws).all()


def test_sampling_with_temperature_reweights_to_the_teacher():
    """Draws at T = 2 from q ∝ p^(1/2), self-normalised weights count·p/q: consistent for p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = torch.softmax(logits, 0).numpy()
    cfg = LogitsConfig(mode="sample", samples=32, sample_temperature=2.0)
    entries = sample_entries(logits.expand(3000, -1), cfg.samples, np.arange(3000), temperature=2.0, keep_logprobs=True)
    targets = entries_to_targets(entries, cfg)
    estimate = np.zeros(len(p))
    np.add.at(estimate, targets.ids[targets.mask].numpy(), targets.weights[targets.mask].numpy())
    assert np.abs(estimate / 3000 - p).max() < 0.01
    assert torch.allclose(targets.weights.sum(-1), torch.ones(3000), atol=1e-5)


def test_sampling_depends_only_on_seed_and_position():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, VOCAB, generator=g)
    keys = np.arange(500, 510)
    batched = sample_entries(logits, 8, keys, seed=5)
    single = [sample_entries(logits[r : r + 1], 8, keys[r : r + 1], seed=5) for r in range(10)]
    assert batched.ids.tolist() == sum((s.ids.tolist() for s in single), [])
    assert batched.counts.tolist() == sum((s.counts.tolist() for s in single), [])
    other_seed = sample_entries(logits, 8, keys, seed=6)
    assert other_seed.ids.tolist() != batched.ids.tolist()


# ---------------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 3, 7, 8, 9, 13, 16, 17, 18, 24, 31, 32])
def test_bit_packing_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, 1001, dtype=np.uint64)
    buf = np.frombuffer(pack_bits(values, bits), dtype=np.uint8)
    assert len(buf) == (1001 * bits + 7) // 8 + 8
    index = rng.permutation(1001)
    assert np.array_equal(unpack_bits(buf, bits, index), values[index].astype(np.int64))


@pytest.mark.parametrize("bits,lo", [(8, -12.0), (6, -12.0), (16, -30.0), (12, -20.0)])
def test_logprob_quantisation_within_stated_error(bits, lo):
    lp = np.concatenate([np.linspace(lo, 0, 10007), [lo - 5.0, 1e-7]]).astype(np.float32)
    decoded = dequantize_logprobs(quantize_logprobs(lp, bits, lo), bits, lo)
    step = -lo / ((1 << bits) - 1)
    inside = lp >= lo
    bound = Encoding.of(LogitsConfig(mode="topk", logprob_bits=bits, logprob_min=lo), VOCAB).describe()[
        "logprob_max_abs_error"
    ]
    assert step / 2 <= bound < step / 2 + 1e-5
    assert np.abs(decoded[inside] - np.minimum(lp[inside], 0)).max() <= bound
    assert decoded[~inside].tolist() == [lo]  # clipped, and counted by the writer


# ---------------------------------------------------------------------------------------------
# store write → read
# ---------------------------------------------------------------------------------------------
def direct_targets(store: TokenStore, cfg: LogitsConfig, i: int):
    n_pos = int(store.lengths[i]) - 1
    logits = hidden_of(i, n_pos + 1)[:n_pos] @ LM_HEAD.t()
    return entries_to_targets(
        compute_entries(logits, cfg, global_positions(store, np.full(n_pos, i), np.arange(n_pos))), cfg
    )


@pytest.mark.parametrize("cfg", [TOPK, SAMPLE, SAMPLE_T2], ids=["topk", "sample", "sample-T2"])
def test_store_round_trip(tmp_path, store, cfg):
    manifest = write_store(tmp_path / "logits", store, cfg)
    reader = LogitsStore(tmp_path / "logits", store)
    n_positions = int(np.maximum(store.lengths - 1, 0).sum())
    assert manifest["n_positions"] == reader.n_positions == n_positions
    # every byte on disk but the JSON files: shards and the id ranking of version 2
    shard_bytes = sum(p.stat().st_size for p in (tmp_path / "logits" / "shards").glob("*.bin"))
    shard_bytes += (tmp_path / "logits" / "id_order.bin").stat().st_size
    assert manifest["total_bytes"] == shard_bytes
    assert manifest["bytes_per_token"] == pytest.approx(shard_bytes / n_positions)
    err = manifest["encoding"].get("logprob_max_abs_error", 0.0)
    assert manifest["logprob_clipped"] == 0
    length = int(store.lengths.max())
    batch = reader.read_batch(np.arange(len(store)), length)
    for i in range(len(store)):
        n_pos = int(store.lengths[i]) - 1
        assert not batch.mask[i, max(n_pos, 0) :].any()  # positions an instance lacks are padding
        if n_pos <= 0:
            continue
        expected = direct_targets(store, cfg, i)
        k = expected.ids.shape[1]
        got_mask = batch.mask[i, :n_pos]
        assert torch.equal(got_mask[:, :k], expected.mask) and not got_mask[:, k:].any()
        assert torch.equal(batch.ids[i, :n_pos, :k][expected.mask], expected.ids[expected.mask])
        diff = (batch.logprobs[i, :n_pos, :k] - expected.logprobs)[expected.mask].abs().max().item()
        if cfg.mode == "sample" and cfg.sample_temperature == 1.0:
            assert diff < 1e-6  # counts are exact
        else:
            # log weights: quantisation of the log-probs (scaled by |1 − 1/T| and renormalised)
            assert diff <= 2 * err + 1e-5
    # random (instance, position) pairs read the same rows as the padded batch
    rng = np.random.default_rng(0)
    inst = rng.integers(0, len(store), 40)
    pos = rng.integers(0, length + 2, 40)
    pairs = reader.read(inst, pos)
    k = pairs.ids.shape[1]
    for r in range(40):
        in_range = pos[r] < length
        row_mask = batch.mask[inst[r], pos[r]] if in_range else torch.zeros(batch.mask.shape[-1], dtype=torch.bool)
        assert torch.equal(pairs.mask[r], row_mask[:k]) and not row_mask[k:].any()
        if row_mask.any():
            assert torch.equal(pairs.ids[r][pairs.mask[r]], batch.ids[inst[r], pos[r]][row_mask])
            assert torch.equal(pairs.logprobs[r][pairs.mask[r]], batch.logprobs[inst[r], pos[r]][row_mask])


def test_rerun_is_byte_identical_and_batching_does_not_matter(tmp_path, store):
    write_store(tmp_path / "a", store, SAMPLE, batch_size=3)
    write_store(tmp_path / "b", store, SAMPLE, batch_size=5)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    # a complete store is recognised, nothing is redone
    writer = LogitsStoreWriter(tmp_path / "a", store, SAMPLE, vocab_size=VOCAB, teacher="fake")
    assert writer.complete and len(writer.todo_instances()) == 0
    assert writer.finish()["bytes_per_token"] > 0


def test_resume_after_lost_marker_is_byte_identical(tmp_path, store):
    write_store(tmp_path / "full", store, TOPK)
    out = tmp_path / "resumed"
    writer = LogitsStoreWriter(out, store, TOPK, vocab_size=VOCAB, teacher="fake")
    feed(writer, store, np.arange(9))  # shards 0, 1 complete; shard 2 half-buffered, then "killed"
    del writer
    (out / "shards" / "00001.json").unlink()  # killed between a shard's rename and its marker
    writer = LogitsStoreWriter(out, store, TOPK, vocab_size=VOCAB, teacher="fake")
    assert writer.todo_instances().tolist() == [4, 5, 6, 7, 8, 9, 10]
    feed(writer, store, writer.todo_instances())
    writer.finish()
    assert files_of(out) == files_of(tmp_path / "full")


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_logits as t
    from predistill.formats.logits import LogitsStoreWriter
    from predistill.formats.store import TokenStore
    store = TokenStore({store!r})
    writer = LogitsStoreWriter({out!r}, store, t.TOPK, vocab_size=t.VOCAB, teacher="fake")
    original = writer._write_shard
    def write_then_die(s):
        if s == 1:  # die in the middle of shard 1's write: its .bin.tmp exists, no marker
            (writer.dir / "shards" / "00001.bin.tmp").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        original(s)
    writer._write_shard = write_then_die
    t.feed(writer, store, writer.todo_instances())
""")


def test_resume_after_sigkill_is_byte_identical(tmp_path, store):
    write_store(tmp_path / "full", store, TOPK)
    out = tmp_path / "killed"
    script = KILLER.format(tests=str(Path(__file__).parent), store=str(store.dir), out=str(out))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "shards" / "00000.json").is_file() and not (out / "shards" / "00001.json").exists()
    assert not (out / "manifest.json").exists()
    writer = LogitsStoreWriter(out, store, TOPK, vocab_size=VOCAB, teacher="fake")
    assert writer.todo_instances()[0] == 4
    feed(writer, store, writer.todo_instances())
    writer.finish()
    assert not (out / "shards" / "00001.bin.tmp").exists()  # the dead writer's leftover was rewritten
    assert files_of(out) == files_of(tmp_path / "full")


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def test_logits_store_from_another_token_store_is_refused(tmp_path, store):
    write_store(tmp_path / "logits", store, TOPK)
    other = make_store(tmp_path / "other", seed=1)
    with pytest.raises(PredistillError) as info:
        LogitsStore(tmp_path / "logits", other)
    assert store.hash[:12] in str(info.value) and other.hash[:12] in str(info.value)
    with pytest.raises(PredistillError, match="other settings or another token store"):
        LogitsStoreWriter(tmp_path / "logits", other, TOPK, vocab_size=VOCAB)


def test_writer_refuses_bad_input(tmp_path, store):
    writer = LogitsStoreWriter(tmp_path / "w", store, TOPK, vocab_size=VOCAB)
    ids, tokens, lengths = next(store.iter_batches(2))
    hidden = torch.zeros(2, tokens.shape[1], HID)
    with pytest.raises(PredistillError, match="needs every position"):
        writer.add_hidden(ids, hidden, LM_HEAD, tokens, lengths - 1)
    with pytest.raises(PredistillError, match="does not hold the tokens"):
        writer.add_hidden(ids, hidden, LM_HEAD, (tokens + 1) % VOCAB, lengths)
    with pytest.raises(PredistillError, match="have no entries yet"):
        writer.finish()
    with pytest.raises(PredistillError, match="interrupted logits store with other settings"):
        LogitsStoreWriter(tmp_path / "w", store, SAMPLE, vocab_size=VOCAB)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(PredistillError, match="not a logits store"):
        LogitsStoreWriter(tmp_path / "junk", store, TOPK, vocab_size=VOCAB)
    with pytest.raises(PredistillError, match="top-k"):
        LogitsConfig(mode="topk", top_k=0).validate()


# ---------------------------------------------------------------------------------------------
# online logits and online truncated teachers
# ---------------------------------------------------------------------------------------------
def test_online_logits_saving_first_sighting_wins(tmp_path, store):
    """A model saving its own logits while training: batches in any order, repeats ignored."""
    write_store(tmp_path / "ref", store, TOPK)
    writer = LogitsStoreWriter(tmp_path / "online", store, TOPK, vocab_size=VOCAB, teacher="fake")
    order = np.random.default_rng(0).permutation(len(store))
    for step, start in enumerate(range(0, len(store), 4)):
        ids = np.concatenate([order[start : start + 4], order[:1]])  # instance order[0] comes back each step
        tokens, lengths = store.batch(ids)
        logits = (
            torch.stack(
                [
                    torch.nn.functional.pad(hidden_of(int(i), int(n)), (0, 0, 0, tokens.shape[1] - int(n)))
                    for i, n in zip(ids, lengths)
                ]
            )
            @ LM_HEAD.t()
        )
        if step:
            logits[-1] = torch.randn_like(logits[-1])  # a later sighting differs: it must be ignored
        writer.add_logits(ids, logits, lengths, tokens)
    writer.finish()
    ref, online = LogitsStore(tmp_path / "ref", store), LogitsStore(tmp_path / "online", store)
    for i in range(len(store)):
        a, b = ref.instance_entries(i), online.instance_entries(i)
        assert (
            a.ids.tolist() == b.ids.tolist() and np.abs(a.logprobs - b.logprobs).max(initial=0) <= ref.cfg.logprob_step
        )


def test_teacher_targets_for_an_online_truncated_teacher():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(13, HID, generator=g) * 2
    cfg = LogitsConfig(mode="topk", top_p=0.8, top_k=6)
    targets = teacher_targets(hidden, LM_HEAD, cfg, chunk_rows=4)
    expected = entries_to_targets(truncate_top_p_k(hidden @ LM_HEAD.t(), 0.8, 6), cfg, 6)
    assert torch.equal(targets.ids, expected.ids) and torch.equal(targets.mask, expected.mask)
    assert torch.allclose(targets.logprobs, expected.logprobs, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the real teacher
# ---------------------------------------------------------------------------------------------
@pytest.mark.teacher
@pytest.mark.slow
def test_stored_entries_equal_smollm2_top_p_k(tmp_path, smollm2_tiny_store):
    from predistill.modeling.models import load_model

    store = TokenStore(smollm2_tiny_store)
    model, _ = load_model("smollm2-135m")
    model.eval()
    cfg = LogitsConfig(mode="topk", top_p=0.95, top_k=8, shard_instances=2)
    writer = LogitsStoreWriter(
        tmp_path / "logits", store, cfg, vocab_size=model.lm_head.weight.shape[0], teacher="smollm2-135m"
    )
    with torch.no_grad():
        for ids, tokens, lengths in store.iter_batches(2):
            mask = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            hidden = model.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
            writer.add_hidden(ids, hidden, model.lm_head.weight, tokens, lengths)
    manifest = writer.finish()
    reader = LogitsStore(tmp_path / "logits", store)
    err = manifest["encoding"]["logprob_max_abs_error"]
    n_checked = n_exact = 0
    with torch.no_grad():
        for i in range(len(store)):
            tokens = torch.from_numpy(store[i].astype(np.int64))[None]
            ref_lp = torch.log_softmax(model(input_ids=tokens).logits[0, :-1].float(), -1)  # plain HF forward
            got = reader.instance_entries(i)
            for t, (lp_row, part) in enumerate(zip(ref_lp, got.split([1] * len(ref_lp)))):
                values, order = torch.sort(lp_row, descending=True, stable=True)
                cum = torch.cumsum(values.double().exp(), 0)
                n_ref = min(int(torch.nonzero(cum >= cfg.top_p - P_SLACK)[0]) + 1, cfg.top_k)
                # every stored log-prob is the teacher's own at that id, within the stated error
                stored = torch.from_numpy(part.logprobs.astype(np.float32))
                teacher_at = lp_row[torch.from_numpy(part.ids)]
                unclipped = teacher_at >= cfg.logprob_min
                assert (stored - teacher_at)[unclipped].abs().max() <= err + 1e-4, (i, t)
                assert (stored[~unclipped] == cfg.logprob_min).all()
                # and the entries are the teacher's top-p-k, up to near-ties/near-cuts (|Δ| < 1e-4)
                same = part.n[0] == n_ref and part.ids.tolist() == order[:n_ref].tolist()
                if not same:
                    boundary = values[min(part.n[0], n_ref) - 1]
                    assert abs(cum[n_ref - 1] - cfg.top_p) < 1e-4 or (teacher_at - boundary).abs().min() < 1e-4, (
                        i,
                        t,
                        part.ids,
                        order[:n_ref],
                    )
                n_checked += 1
                n_exact += same
    assert n_checked == manifest["n_positions"] > 40
    assert n_exact >= 0.97 * n_checked


def test_a_shard_changed_after_writing_is_refused_when_read(tmp_path, store):
    write_store(tmp_path / "logits", store, TOPK)
    shard = tmp_path / "logits" / "shards" / "00001.bin"
    data = bytearray(shard.read_bytes())
    data[:16] = bytes(b ^ 0xFF for b in data[:16])  # changed in place: same size
    shard.write_bytes(bytes(data))
    reader = LogitsStore(tmp_path / "logits", store)
    reader.instance_entries(0)  # shard 0 is intact
    with pytest.raises(PredistillError, match="changed since the logits store was written"):
        reader.instance_entries(5)


def test_a_truncated_shard_is_refused_at_open(tmp_path, store):
    write_store(tmp_path / "logits", store, TOPK)
    shard = tmp_path / "logits" / "shards" / "00001.bin"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(PredistillError, match="missing or truncated"):
        LogitsStore(tmp_path / "logits", store)


@pytest.mark.parametrize("cfg", [TOPK, SAMPLE], ids=["topk", "sample"])
def test_version_1_stores_stay_readable(tmp_path, store, cfg, monkeypatch):
    """A store written before entropy coding (version 1: fixed-width ids and counts, no id ranking)
    reads back the same entries as today's version 2 (whose size is measured by
    bench/bench_logits_bytes.py: at this toy size the per-shard code tables dominate)."""
    v2 = write_store(tmp_path / "v2", store, cfg)
    import predistill.formats.logits as logits_module

    current = logits_module.Encoding.of
    monkeypatch.setattr(logits_module, "VERSION", 1)
    monkeypatch.setattr(
        logits_module.Encoding,
        "of",
        staticmethod(
            lambda c, v: Encoding(
                **{
                    k: getattr(current(c, v), k)
                    for k in ("id_bits", "n_bits", "count_bits", "logprob_bits", "logprob_min")
                }
            )
        ),
    )
    v1 = write_store(tmp_path / "v1", store, cfg)
    monkeypatch.undo()
    assert (v1["version"], v2["version"]) == (1, 2)
    assert "entropy_coded" not in {k for k, v in v1["encoding"].items() if v}
    assert not (tmp_path / "v1" / "id_order.bin").exists()
    old, new = LogitsStore(tmp_path / "v1", store), LogitsStore(tmp_path / "v2", store)
    for i in range(len(store)):
        a, b = old.instance_entries(i), new.instance_entries(i)
        for field in ("n", "ids", "logprobs", "counts"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or np.array_equal(x, y), (i, field)
    length = int(store.lengths.max())
    x, y = old.read_batch(np.arange(len(store)), length), new.read_batch(np.arange(len(store)), length)
    assert torch.equal(x.ids, y.ids) and torch.equal(x.logprobs, y.logprobs) and torch.equal(x.mask, y.mask)


def test_version_2_needs_its_token_store_and_its_id_ranking(tmp_path, store):
    write_store(tmp_path / "logits", store, SAMPLE)
    with pytest.raises(PredistillError, match="open it with its token store"):
        LogitsStore(tmp_path / "logits").instance_entries(0)
    order = tmp_path / "logits" / "id_order.bin"
    data = bytearray(order.read_bytes())
    data[0] ^= 1
    order.write_bytes(bytes(data))
    with pytest.raises(PredistillError, match="id_order.bin: changed since"):
        LogitsStore(tmp_path / "logits", store)
