"""Position-selected logits stores: a distribution kept at chosen positions only (format version 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_logits import HID, LM_HEAD, SAMPLE, TOPK, VOCAB, files_of, hidden_of, make_store, write_store

from predistill.core.artifacts import PredistillError
from predistill.formats.logits import LogitsStore, LogitsStoreWriter
from predistill.formats.store import TokenStore
from predistill.training.positions import PositionChoice, n_kept, top_positions

CHOICE = {"rule": "test", "fraction": 0.3}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TokenStore:
    return make_store(tmp_path_factory.mktemp("pstore") / "store", seed=4, n_instances=13)


def masks_of(store: TokenStore, fraction: float = 0.3, seed: int = 0) -> dict[int, np.ndarray]:
    """Some kept positions per instance: a seeded ⌈fraction · n⌉ of each."""
    out = {}
    for i in range(len(store)):
        n = max(int(store.lengths[i]) - 1, 0)
        keep = np.zeros(n, bool)
        keep[np.random.default_rng([seed, i]).permutation(n)[: n_kept(n, fraction)]] = True
        out[i] = keep
    return out


def feed_selected(writer: LogitsStoreWriter, store: TokenStore, ids, masks, batch_size: int = 3) -> None:
    for batch_ids, tokens, lengths in store.iter_batches(batch_size, ids=ids):
        hidden = torch.zeros(len(batch_ids), tokens.shape[1], HID)
        for b, i in enumerate(batch_ids):
            hidden[b, : lengths[b]] = hidden_of(int(i), int(lengths[b]))
        writer.add_hidden(batch_ids, hidden, LM_HEAD, tokens, lengths, kept=[masks[int(i)] for i in batch_ids])


def write_selected(out, store, cfg, masks, batch_size: int = 3, positions=CHOICE) -> dict:
    writer = LogitsStoreWriter(out, store, cfg, vocab_size=VOCAB, teacher="fake", positions=positions)
    feed_selected(writer, store, writer.todo_instances(), masks, batch_size)
    return writer.finish()


@pytest.mark.parametrize("cfg", [TOPK, SAMPLE], ids=["topk", "sample"])
def test_kept_positions_read_as_the_full_store_and_the_rest_as_not_distilled(tmp_path, store, cfg):
    write_store(tmp_path / "full", store, cfg)
    masks = masks_of(store)
    manifest = write_selected(tmp_path / "sel", store, cfg, masks)
    full, sel = LogitsStore(tmp_path / "full", store), LogitsStore(tmp_path / "sel", store)
    assert manifest["version"] == 3 and sel.positions == CHOICE and full.positions is None
    n_positions = int(np.maximum(store.lengths - 1, 0).sum())
    kept = sum(int(m.sum()) for m in masks.values())
    assert manifest["n_positions"] == n_positions and manifest["n_distilled_positions"] == kept
    assert manifest["bytes_per_token"] == pytest.approx(manifest["total_bytes"] / n_positions)  # over all positions
    assert manifest["total_bytes"] < full.manifest["total_bytes"]
    length = int(store.lengths.max())
    a, b = full.read_batch(np.arange(len(store)), length), sel.read_batch(np.arange(len(store)), length)
    for i, m in masks.items():
        here = np.zeros(length, bool)
        here[: len(m)] = m
        assert not b.mask[i, ~here].any()  # not kept: no entries, so the KD loss skips the position
        k = b.ids.shape[-1]
        assert torch.equal(b.mask[i, here], a.mask[i, here][:, :k]) and not a.mask[i, here][:, k:].any()
        assert torch.equal(b.ids[i, here][b.mask[i, here]], a.ids[i, here][a.mask[i, here]])
        assert torch.equal(b.logprobs[i, here][b.mask[i, here]], a.logprobs[i, here][a.mask[i, here]])
        assert np.array_equal(sel.instance_positions(i), np.flatnonzero(m))
        e = sel.instance_entries(i)
        assert len(e.n) == int(m.sum())


def test_selected_store_resumes_and_reruns_byte_identically(tmp_path, store):
    masks = masks_of(store)
    write_selected(tmp_path / "a", store, SAMPLE, masks, batch_size=3)
    write_selected(tmp_path / "b", store, SAMPLE, masks, batch_size=5)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    out = tmp_path / "resumed"
    writer = LogitsStoreWriter(out, store, SAMPLE, vocab_size=VOCAB, teacher="fake", positions=CHOICE)
    feed_selected(writer, store, np.arange(6), masks)  # shard 0 written, shard 1 half-buffered: "killed"
    del writer
    (out / "shards" / "00000.json").unlink()
    writer = LogitsStoreWriter(out, store, SAMPLE, vocab_size=VOCAB, teacher="fake", positions=CHOICE)
    assert writer.todo_instances()[0] == 0
    feed_selected(writer, store, writer.todo_instances(), masks)
    writer.finish()
    assert files_of(out) == files_of(tmp_path / "a")


def test_another_choice_of_positions_is_another_store(tmp_path, store):
    write_selected(tmp_path / "sel", store, SAMPLE, masks_of(store))
    with pytest.raises(PredistillError, match="other settings"):
        LogitsStoreWriter(tmp_path / "sel", store, SAMPLE, vocab_size=VOCAB, positions={"rule": "x", "fraction": 0.5})
    with pytest.raises(PredistillError, match="other settings"):
        LogitsStoreWriter(tmp_path / "sel", store, SAMPLE, vocab_size=VOCAB)  # every position: another store


def test_kept_masks_are_required_exactly_for_a_selected_store(tmp_path, store):
    ids, tokens, lengths = next(store.iter_batches(2))
    hidden = torch.zeros(2, tokens.shape[1], HID)
    selected = LogitsStoreWriter(tmp_path / "s", store, SAMPLE, vocab_size=VOCAB, positions=CHOICE)
    with pytest.raises(PredistillError, match="needs, for each batch row"):
        selected.add_hidden(ids, hidden, LM_HEAD, tokens, lengths)
    wrong = [np.ones(int(n), bool) for n in lengths]  # one position too many for each instance
    with pytest.raises(PredistillError, match="mask over its instance's positions"):
        selected.add_hidden(ids, hidden, LM_HEAD, tokens, lengths, kept=wrong)
    full = LogitsStoreWriter(tmp_path / "f", store, SAMPLE, vocab_size=VOCAB)
    with pytest.raises(PredistillError, match="keeps every position"):
        full.add_hidden(ids, hidden, LM_HEAD, tokens, lengths, kept=[np.ones(int(n) - 1, bool) for n in lengths])


def test_a_changed_kept_bit_is_refused_on_read(tmp_path, store):
    write_selected(tmp_path / "sel", store, SAMPLE, masks_of(store))
    shard = tmp_path / "sel" / "shards" / "00000.bin"
    marker = json.loads(shard.with_suffix(".json").read_text())
    offset = marker["sections"]["kept"][0]
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    reader = LogitsStore(tmp_path / "sel", store)
    with pytest.raises(PredistillError, match="sha256"):
        reader.read_batch([0], 4)


def test_a_manifest_without_its_choice_is_refused(tmp_path, store):
    write_selected(tmp_path / "sel", store, SAMPLE, masks_of(store))
    path = tmp_path / "sel" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["positions"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(PredistillError, match="positions"):
        LogitsStore(tmp_path / "sel", store)


# ---------------------------------------------------------------------------------------------
# the rules (predistill.training.positions.PositionChoice)
# ---------------------------------------------------------------------------------------------
def test_entropy_rule_keeps_the_most_uncertain_positions():
    teacher = np.array([[-1.0, 0.5], [-2.0, 3.0], [-0.1, 0.1], [-3.0, 2.0], [-1.0, 3.0]], np.float32)
    keep = PositionChoice("entropy", 0.4).keep(7, 5, teacher)
    assert keep.tolist() == [False, True, False, False, True]  # ⌈0.4·5⌉ = 2: entropies 3.0, 3.0 (ties: earlier first)
    assert PositionChoice("entropy", 0.6).keep(7, 5, teacher).tolist() == [False, True, False, True, True]


def test_random_rule_is_seeded_per_instance_and_needs_no_teacher():
    a = PositionChoice("random", 0.5, seed=3)
    assert not a.needs_teacher
    assert np.array_equal(a.keep(4, 20), a.keep(4, 20)) and a.keep(4, 20).sum() == 10
    assert not np.array_equal(a.keep(4, 20), PositionChoice("random", 0.5, seed=4).keep(4, 20))
    assert a.describe() == {"rule": "random", "fraction": 0.5, "seed": 3}


def test_difference_rule_keeps_where_the_teacher_beats_the_reference(tmp_path):
    class Reference:  # a TokenRecord's interface: instance(i) → (log-probs, entropies)
        manifest = {"model": {"spec": "ref"}, "shards": [{"sha256": "abc"}]}

        def instance(self, i):
            return np.array([-1.0, -5.0, -1.0, -4.0], np.float32), np.zeros(4, np.float32)

    teacher = np.array([[-1.0, 0], [-1.0, 0], [-3.0, 0], [-2.0, 0]], np.float32)  # differences 0, 4, −2, 2
    choice = PositionChoice("difference", 0.5, reference=Reference())  # type: ignore[arg-type]
    assert choice.keep(0, 4, teacher).tolist() == [False, True, False, True]
    assert np.array_equal(choice.keep(0, 4, teacher), top_positions(teacher[:, 0] - Reference().instance(0)[0], 2))
    assert choice.describe()["reference"] == {"model": {"spec": "ref"}, "shards_sha256": ["abc"]}


def test_rule_refusals():
    with pytest.raises(PredistillError, match="unknown position rule"):
        PositionChoice("loss", 0.5)
    with pytest.raises(PredistillError, match=r"\(0, 1\]"):
        PositionChoice("entropy", 0.0)
    with pytest.raises(PredistillError, match="reference model's token record"):
        PositionChoice("difference", 0.5)
    with pytest.raises(PredistillError, match="needs the teacher"):
        PositionChoice("entropy", 0.5).keep(0, 3, None)


# ---------------------------------------------------------------------------------------------
# score --logits-positions (in the teacher pass) and select-positions (afterwards) agree
# ---------------------------------------------------------------------------------------------
def _score(store_dir, out, **kw):
    from predistill.stages.score import ScoreConfig, run

    return run(ScoreConfig(model="preset:tiny", store=str(store_dir), out=str(out), progress=False,
                           shard_size=40, batch_size=5, **kw))  # fmt: skip


def _select(**kw):
    from predistill.stages.select_positions import SelectPositionsConfig, run

    return run(SelectPositionsConfig(**kw))


@pytest.fixture(scope="module")
def passes(tiny_store, tmp_path_factory):
    """One teacher pass (scores, the full store, the record) and a reference record; preset:tiny."""
    from conftest import single_thread

    root = tmp_path_factory.mktemp("ppass")
    with single_thread():
        _score(tiny_store, root / "t", logits_out=str(root / "full"), token_record=str(root / "trec"))
        _score(tiny_store, root / "r", token_record=str(root / "rrec"), seed=5)  # another preset: the reference
    return root


@pytest.mark.parametrize("rule", ["entropy", "random", "difference"])
def test_selecting_afterwards_writes_the_bytes_of_selecting_in_the_teacher_pass(tiny_store, passes, tmp_path, rule):
    from conftest import single_thread

    extra = {"logits_reference_record": str(passes / "rrec")} if rule == "difference" else {}
    with single_thread():
        _score(tiny_store, tmp_path / "t", logits_out=str(tmp_path / "inpass"), logits_positions=rule,
               logits_position_fraction=0.2, **extra)  # fmt: skip
    m = _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "after"), rule=rule,
                fraction=0.2, teacher_record=None if rule == "random" else str(passes / "trec"),
                reference_record=str(passes / "rrec") if rule == "difference" else None)  # fmt: skip
    inpass, after = files_of(tmp_path / "inpass"), files_of(tmp_path / "after")
    assert {k: v for k, v in inpass.items() if k != "manifest.json"} == {
        k: v for k, v in after.items() if k != "manifest.json"
    }
    a = json.loads(inpass["manifest.json"])
    assert {k: a[k] for k in ("positions", "n_distilled_positions", "total_bytes", "bytes_per_token")} == {
        k: m[k] for k in ("positions", "n_distilled_positions", "total_bytes", "bytes_per_token")
    }
    store = TokenStore(tiny_store)
    n = np.maximum(store.lengths - 1, 0)
    assert m["n_distilled_positions"] == sum(n_kept(int(k), 0.2) for k in n)
    full = json.loads((passes / "full" / "manifest.json").read_text())
    assert m["scored_with"] == full["scored_with"] and m["bytes_per_token"] < full["bytes_per_token"] * 0.4
    if rule == "entropy":  # the kept positions are each instance's most uncertain ones, by the record
        from predistill.formats.tokrecord import TokenRecord

        record, sel = TokenRecord(passes / "trec", store), LogitsStore(tmp_path / "after", store)
        for i in (0, 7, len(store) - 1):
            h = record.instance(i)[1]
            assert np.array_equal(sel.instance_positions(i), np.flatnonzero(top_positions(h, n_kept(len(h), 0.2))))
    # a rerun is a no-op
    before = files_of(tmp_path / "after")
    _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "after"), rule=rule, fraction=0.2,
            teacher_record=None if rule == "random" else str(passes / "trec"),
            reference_record=str(passes / "rrec") if rule == "difference" else None)  # fmt: skip
    assert files_of(tmp_path / "after") == before
    # killed between the store's manifest and its annotation: the rerun completes the annotation
    manifest = json.loads(before["manifest.json"])
    (tmp_path / "after" / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items()
                                                                   if k not in ("selected_from", "scored_with")}))  # fmt: skip
    _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "after"), rule=rule, fraction=0.2,
            teacher_record=None if rule == "random" else str(passes / "trec"),
            reference_record=str(passes / "rrec") if rule == "difference" else None)  # fmt: skip
    assert json.loads((tmp_path / "after" / "manifest.json").read_text()) == manifest


def test_select_positions_refusals(tiny_store, passes, tmp_path):
    base = {"logits": str(passes / "full"), "store": str(tiny_store), "out": str(tmp_path / "o")}
    with pytest.raises(PredistillError, match="add --teacher-record"):
        _select(**base, rule="entropy")
    with pytest.raises(PredistillError, match="drop --teacher-record"):
        _select(**base, rule="random", teacher_record=str(passes / "trec"))
    with pytest.raises(PredistillError, match="other weights"):  # the reference's record is not the teacher's
        _select(**base, rule="entropy", teacher_record=str(passes / "rrec"))
    with pytest.raises(PredistillError, match="reference model's token record"):
        _select(**base, rule="difference", teacher_record=str(passes / "trec"))
    with pytest.raises(PredistillError, match="is the --logits store itself"):
        _select(**{**base, "out": str(passes / "full")}, rule="random")
    _select(**base, rule="random", fraction=0.5)
    with pytest.raises(PredistillError, match="already position-selected"):
        _select(logits=str(tmp_path / "o"), store=str(tiny_store), out=str(tmp_path / "o2"), rule="random")
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------
# training on a position-selected store
# ---------------------------------------------------------------------------------------------
def test_the_kd_loss_on_a_selected_store_is_the_full_stores_at_the_kept_positions(tmp_path, store):
    from predistill.training.kd import KDConfig, kd_loss

    write_store(tmp_path / "full", store, SAMPLE)
    masks = masks_of(store, 0.4)
    write_selected(tmp_path / "sel", store, SAMPLE, masks)
    ids, length = np.arange(len(store)), int(store.lengths.max()) - 1
    full = LogitsStore(tmp_path / "full", store).read_batch(ids, length)
    sel = LogitsStore(tmp_path / "sel", store).read_batch(ids, length)
    hidden = torch.randn(len(ids), length, HID, generator=torch.Generator().manual_seed(3), requires_grad=True)
    cfg = KDConfig()
    mean, per_position = kd_loss(hidden, LM_HEAD, sel, cfg)
    _, full_per_position = kd_loss(hidden, LM_HEAD, full, cfg)
    kept = torch.zeros(len(ids), length, dtype=torch.bool)
    for i, m in masks.items():
        kept[i, : len(m)] = torch.from_numpy(m)
    assert torch.allclose(per_position[kept], full_per_position[kept]) and not per_position[~kept].any()
    assert torch.allclose(mean, full_per_position[kept].mean())
    (grad,) = torch.autograd.grad(mean, hidden)
    assert not grad[~kept].any() and grad[kept].abs().sum() > 0  # no signal where no distribution is kept


def test_train_on_a_selected_store_records_its_positions(tiny_store, passes, tmp_path):
    from predistill.stages.train import TrainConfig
    from predistill.stages.train import run as train

    _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "sel"), rule="entropy",
            fraction=0.2, teacher_record=str(passes / "trec"))  # fmt: skip
    out = train(TrainConfig(model="preset:tiny", store=str(tiny_store), out=str(tmp_path / "run"), steps=3, batch_size=4,
                            seq_len=32, lr=3e-3, eval_instances=8, kd_logits=str(tmp_path / "sel"), alpha=0.5))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kd_logits_positions"] == {"rule": "entropy", "fraction": 0.2}
    kd = [json.loads(line)["kd_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(k is not None and k > 0 for k in kd)  # α > 0 on some step (the default WSD α schedule)
    from predistill.stages.report import summarize_run

    summary = summarize_run(str(out))  # what `report` shows of the run
    assert summary.positions == {"store": {"rule": "entropy", "fraction": 0.2}}
    assert (
        summary.logits_bytes_per_token
        == json.loads((tmp_path / "sel" / "manifest.json").read_text())["bytes_per_token"]
    )


def test_the_positions_curve_names_each_run_by_its_rule_and_control():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "recipes" / "positions_curve.py"
    spec = importlib.util.spec_from_file_location("positions_curve", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = {"seed": 1, "heldout_loss": 5.0, "flops": 1e12, "kd_logits": None, "logits_bytes_per_token": None}
    report = {"runs": [
        run,
        run | {"kd_logits": "L", "logits_bytes_per_token": 7.5},
        run | {"kd_logits": "L", "logits_bytes_per_token": 1.6, "positions": {"store": {"rule": "entropy", "fraction": 0.2}}},
        run | {"kd_logits": "L", "logits_bytes_per_token": 1.6, "positions": {"store": {"rule": "random", "fraction": 0.2}}},
        run | {"positions": {"token": {"rule": "difference", "fraction": 0.5}}},
        run | {"positions": {"token": {"rule": "random", "fraction": 0.5}}},
        run | {"kd_logits": "L", "logits_bytes_per_token": 7.5, "positions": {"kd": {"rule": "student-entropy", "fraction": 0.2}}},
    ]}  # fmt: skip
    out = module.curve(report)
    assert [(r["rule"], r["fraction"], r["store_bytes_per_token"]) for r in out["runs"]] == [
        ("entropy", 0.2, 1.6),
        ("full", 1.0, 7.5),
        ("random-positions", 0.2, 1.6),
        ("random-tokens", 0.5, 0.0),
        ("student-entropy", 0.2, 7.5),
        ("token-difference", 0.5, 8.0),
    ]
    assert out["baseline"] == [{"seed": 1, "heldout_loss": 5.0, "flops": 1e12}]
    assert set(out["runs"][0]) >= {"rule", "fraction", "seed", "heldout_loss", "store_bytes_per_token", "flops"}


def test_where_a_selected_store_kept_no_distribution_the_kd_target_is_the_data(tiny_store, passes, tmp_path):
    """The KD source of a position-selected store: the teacher's entries where kept; elsewhere the
    data's next token with probability 1, so the KD term there is the NLL and every position keeps
    its weight (a store of every position is read as it is)."""
    from predistill.training.distill import OfflineLogits
    from predistill.training.kd import KDConfig

    _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "sel"), rule="random", fraction=0.3)
    store = TokenStore(tiny_store)
    ids, length = np.array([0, 3, 7]), 24
    inputs = torch.zeros(len(ids), length, dtype=torch.int64)
    tokens, lengths = store.batch(ids, max_len=length + 1)  # the step's targets and their mask
    next_tokens = torch.zeros(len(ids), length, dtype=torch.int64)
    next_tokens[:, : tokens.shape[1] - 1] = tokens[:, 1:]
    real = torch.arange(length)[None, :] < (lengths - 1)[:, None]
    source = OfflineLogits(str(tmp_path / "sel"), store, KDConfig())
    got = source.with_data(source.batch(ids, inputs), next_tokens, real)
    stored = LogitsStore(tmp_path / "sel", store).read_batch(ids, length)
    every = OfflineLogits(str(passes / "full"), store, KDConfig())
    full = every.with_data(every.batch(ids, inputs), next_tokens, real)
    assert torch.equal(full.mask, LogitsStore(passes / "full", store).read_batch(ids, length).mask)
    for row, i in enumerate(ids):
        tokens = np.asarray(store[int(i)])
        n = min(len(tokens) - 1, length)
        kept = stored.mask[row, :n].any(-1)
        assert 0 < int(kept.sum()) < n
        assert torch.equal(got.ids[row, :n][kept], stored.ids[row, :n][kept])
        assert torch.equal(got.mask[row, :n][kept], stored.mask[row, :n][kept])
        elsewhere = ~kept
        assert got.ids[row, :n][elsewhere][:, 0].tolist() == tokens[1 : n + 1][elsewhere.numpy()].tolist()
        assert got.mask[row, :n][elsewhere].sum(-1).tolist() == [1] * int(elsewhere.sum())
        assert not got.logprobs[row, :n][elsewhere].any()  # log 1
        assert not got.mask[row, n:].any()  # past the instance: padding


# ---------------------------------------------------------------------------------------------
# fewer draws: a uniform subsample of an RS-KD store's draws (select-positions --samples K)
# ---------------------------------------------------------------------------------------------
def test_thinning_keeps_k_of_the_draws_and_estimates_what_they_estimate():
    from predistill.formats.logits import Entries, thin_draws

    # one position's 8 draws: id 3 five times, id 9 twice, id 40 once; repeated at 4000 positions
    rows = 4000
    entries = Entries(np.full(rows, 3), np.tile([3, 9, 40], rows), None, np.tile([5, 2, 1], rows))
    thinned = thin_draws(entries, 8, 4, np.arange(rows), seed=7)
    ends = np.cumsum(thinned.n)
    assert np.all(np.add.reduceat(thinned.counts, ends - thinned.n) == 4)  # 4 draws per position
    assert set(thinned.ids.tolist()) <= {3, 9, 40}
    mean = {i: thinned.counts[thinned.ids == i].sum() / rows for i in (3, 9, 40)}
    # a draw without replacement keeps each draw with probability 4/8: E[count] = count / 2
    assert mean[3] == pytest.approx(2.5, abs=0.05) and mean[9] == pytest.approx(1.0, abs=0.05)
    assert mean[40] == pytest.approx(0.5, abs=0.05)
    again = thin_draws(entries, 8, 4, np.arange(rows), seed=7)
    assert np.array_equal(again.ids, thinned.ids) and np.array_equal(again.counts, thinned.counts)
    assert thin_draws(entries, 8, 8, np.arange(rows)) is entries
    with pytest.raises(PredistillError, match="cannot keep 9 of 8"):
        thin_draws(entries, 8, 9, np.arange(rows))


def test_select_positions_with_fewer_draws(tiny_store, passes, tmp_path):
    full = LogitsStore(passes / "full", TokenStore(tiny_store))
    assert full.cfg.mode == "sample" and full.cfg.samples == 8
    m = _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "thin"), rule="random",
                fraction=0.5, samples=3)  # fmt: skip
    same = _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "all"), rule="random",
                   fraction=0.5)  # fmt: skip
    assert m["config"]["samples"] == 3 and m["selected_from"]["samples"] == 8
    assert m["bytes_per_token"] < same["bytes_per_token"]
    thin, all_draws = (
        LogitsStore(tmp_path / "thin", TokenStore(tiny_store)),
        LogitsStore(tmp_path / "all", TokenStore(tiny_store)),
    )
    for i in (0, 5):
        assert np.array_equal(thin.instance_positions(i), all_draws.instance_positions(i))
        a, b = thin.instance_entries(i), all_draws.instance_entries(i)
        assert np.all(np.add.reduceat(a.counts, np.cumsum(a.n) - a.n) == 3)
        for p in range(len(a.n)):  # a subsample: each kept id is one of the position's 8 draws
            ida = a.ids[np.sum(a.n[:p]) : np.sum(a.n[: p + 1])]
            idb = b.ids[np.sum(b.n[:p]) : np.sum(b.n[: p + 1])]
            assert set(ida.tolist()) <= set(idb.tolist())
    with pytest.raises(PredistillError, match="only keep fewer of its own draws"):
        _select(logits=str(passes / "full"), store=str(tiny_store), out=str(tmp_path / "more"), rule="random",
                samples=9)  # fmt: skip


def test_the_positions_curve_reads_each_rule_against_its_control_paired_by_seed():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "positions_curve", Path(__file__).parents[1] / "recipes" / "positions_curve.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(seed, loss, rule=None):
        positions = {"store": {"rule": rule, "fraction": 0.2}} if rule else {}
        return {"seed": seed, "heldout_loss": loss, "flops": 1.0, "kd_logits": "L" if rule else None,
                "logits_bytes_per_token": 1.5 if rule else None, "positions": positions}  # fmt: skip

    report = {"runs": [run(1, 5.0), run(2, 6.0), run(1, 4.0, "entropy"), run(2, 5.5, "entropy"),
                       run(1, 4.5, "random"), run(2, 5.8, "random")]}  # fmt: skip
    out = module.curve(report)
    entropy = next(c for c in out["comparisons"] if c["rule"] == "entropy")
    # entropy − random: −0.5 and −0.3 → mean −0.4, s.e. = std(−0.5, −0.3)/√2 = 0.1
    assert entropy["vs_control"]["control"] == "random-positions"
    assert entropy["vs_control"]["delta"] == pytest.approx(-0.4) and entropy["vs_control"]["se"] == pytest.approx(0.1)
    assert entropy["vs_control"]["beyond_2se"] is True  # |−0.4| > 0.2
    assert entropy["vs_baseline"]["delta"] == pytest.approx(-0.75) and entropy["vs_full"] is None
    assert "| entropy | 0.2 |" in module.table(out)


@pytest.mark.slow  # subprocesses: two ranks started by hand
def test_two_ranks_write_the_same_position_selected_store_as_one(tiny_store, tmp_path):
    from conftest import run_ranks_by_hand, single_thread

    with single_thread():  # the subprocesses' reduction order
        _score(tiny_store, tmp_path / "t1", logits_out=str(tmp_path / "one"), logits_positions="entropy",
               logits_position_fraction=0.3)  # fmt: skip
    args = ["score", "--model", "preset:tiny", "--store", str(tiny_store), "--out", str(tmp_path / "t2"),
            "--logits-out", str(tmp_path / "two"), "--logits-positions", "entropy", "--logits-position-fraction", "0.3",
            "--shard-size", "40", "--batch-size", "5", "--no-progress"]  # fmt: skip
    run_ranks_by_hand(args)
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert {k: v for k, v in one.items() if k != "manifest.json"} == {
        k: v for k, v in two.items() if k != "manifest.json"
    }
    m1, m2 = (json.loads(d["manifest.json"]) for d in (one, two))
    assert {k: v for k, v in m1.items() if k != "scored_with"} == {k: v for k, v in m2.items() if k != "scored_with"}
