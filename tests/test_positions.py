"""Token-level selection (`train --token-rule`): which positions of an instance the loss trains on,
pinned against written-out references; per instance, so it does not depend on how a batch is split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import single_thread

from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import TokenRecord
from predistill.stages.score import ScoreConfig
from predistill.stages.score import run as score
from predistill.stages.train import TrainConfig, cpu_batch, n_targets, run
from predistill.training.positions import TokenSelection, excess_mask, n_kept, top_positions

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(model="preset:tiny", steps=3, batch_size=4, seq_len=32, lr=3e-3, eval_instances=8)


@pytest.fixture(scope="module")
def records(tiny_store, tmp_path_factory):
    """Token records of two differently seeded tiny models: a 'teacher' and a 'reference'."""
    root = tmp_path_factory.mktemp("records")
    with single_thread():
        for role, seed in (("teacher", 1), ("reference", 2)):
            score(ScoreConfig(model="preset:tiny", seed=seed, store=str(tiny_store), out=str(root / f"{role}-scores"),
                              token_record=str(root / role), shard_size=64, progress=False))  # fmt: skip
    return {role: root / role for role in ("teacher", "reference")}


def test_kept_counts_round_up_and_keep_at_least_one():
    assert [n_kept(n, 0.2) for n in (0, 1, 4, 5, 6, 10, 11)] == [0, 1, 1, 1, 2, 2, 3]
    assert n_kept(7, 1.0) == 7 and n_kept(3, 0.5) == 2


def test_top_positions_breaks_ties_to_the_earlier_and_ranks_nan_last():
    score = np.array([0.5, 2.0, np.nan, 2.0, -1.0, 0.5], dtype=np.float32)
    assert top_positions(score, 1).tolist() == [False, True, False, False, False, False]
    assert np.flatnonzero(top_positions(score, 3)).tolist() == [0, 1, 3]
    assert np.flatnonzero(top_positions(score, 6)).tolist() == [0, 1, 2, 3, 4, 5]
    assert np.flatnonzero(top_positions(score, 5)).tolist() == [0, 1, 3, 4, 5]  # NaN last


def test_difference_keeps_the_tokens_the_teacher_predicts_best_relative_to_the_reference(tiny_store, records):
    store = TokenStore(tiny_store)
    selection = TokenSelection("difference", 0.3, 0, store, str(records["teacher"]), str(records["reference"]))
    teacher, reference = TokenRecord(records["teacher"], store), TokenRecord(records["reference"], store)
    for i in (0, 5, len(store) - 1):
        n = len(store[i]) - 1
        diff = [float(a) - float(b) for a, b in zip(teacher.instance(i)[0], reference.instance(i)[0])]
        k = math.ceil(0.3 * n)
        expected = sorted(sorted(range(n), key=lambda t: (-diff[t], t))[:k])
        assert np.flatnonzero(selection.keep(i, n)).tolist() == expected
    assert selection.keep(0, 10).sum() == 3  # a truncated instance: the first n positions only


def test_random_is_the_same_count_seeded_per_instance(tiny_store):
    store = TokenStore(tiny_store)
    a, b = TokenSelection("random", 0.25, 7, store), TokenSelection("random", 0.25, 7, store)
    assert a.keep(3, 40).tolist() == b.keep(3, 40).tolist() and a.keep(3, 40).sum() == 10
    assert a.keep(3, 40).tolist() != a.keep(4, 40).tolist()
    assert a.keep(3, 40).tolist() != TokenSelection("random", 0.25, 8, store).keep(3, 40).tolist()


def test_the_batch_mask_and_the_target_count_agree_however_the_batch_is_split(tiny_store, records):
    store = TokenStore(tiny_store)
    selection = TokenSelection("difference", 0.5, 0, store, str(records["teacher"]), str(records["reference"]))
    ids = np.array([3, 17, 0, 42])
    whole = cpu_batch(store, ids, 32, tokens_kept=selection)[2]
    halves = [
        cpu_batch(store, ids[:2], 32, tokens_kept=selection)[2],
        cpu_batch(store, ids[2:], 32, tokens_kept=selection)[2],
    ]
    assert int(whole.sum()) == n_targets(store, ids, 32, selection) == sum(int(h.sum()) for h in halves)
    lengths = np.minimum(store.lengths[ids], 33) - 1
    assert int(whole.sum()) == sum(n_kept(int(n), 0.5) for n in lengths)
    assert torch.equal(whole[:2, : halves[0].shape[1]], halves[0])


def test_a_run_records_its_selection_and_trains_on_the_kept_tokens_only(tiny_store, records, tmp_path):
    base = dict(store=str(tiny_store), **FAST)
    selected = run(TrainConfig(out=str(tmp_path / "sel"), token_rule="difference", token_fraction=0.25,
                               teacher_record=str(records["teacher"]), reference_record=str(records["reference"]),
                               **base))  # fmt: skip
    manifest = json.loads((selected / "manifest.json").read_text())
    assert manifest["token_selection"]["rule"] == "difference" and manifest["token_selection"]["fraction"] == 0.25
    assert manifest["method"] == "Pre-Train w/o KD + tokens (difference, 0.25)"
    plain = run(TrainConfig(out=str(tmp_path / "plain"), **base))
    # the same steps over the same batches: the same compute, whatever the loss averages over
    plain_manifest = json.loads((plain / "manifest.json").read_text())
    assert (manifest["tokens"], manifest["flops"]) == (plain_manifest["tokens"], plain_manifest["flops"])
    random = run(TrainConfig(out=str(tmp_path / "random"), token_rule="random", token_fraction=0.25, **base))
    losses = {d.name: [json.loads(line)["lm_loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (selected, plain, random)}  # fmt: skip
    assert losses["sel"][0] != losses["plain"][0] != losses["random"][0]  # other tokens, other mean
    # the same tokens however the batch is split into micro-batches
    split = run(TrainConfig(out=str(tmp_path / "split"), token_rule="random", token_fraction=0.25,
                            micro_batch_size=1, **base))  # fmt: skip
    np.testing.assert_allclose(
        [json.loads(line)["lm_loss"] for line in (split / "metrics.jsonl").read_text().splitlines()],
        losses["random"],
        rtol=1e-5,
    )


def test_selections_that_cannot_run_are_refused_in_one_line(tiny_store, records, tmp_path, source_specs):
    base = dict(store=str(tiny_store), out=str(tmp_path / "r"), **FAST)
    with pytest.raises(PredistillError, match="needs a --token-rule"):
        run(TrainConfig(token_fraction=0.5, **base))
    with pytest.raises(PredistillError, match="needs --teacher-record and --reference-record"):
        run(TrainConfig(token_rule="difference", token_fraction=0.5, teacher_record=str(records["teacher"]), **base))
    with pytest.raises(PredistillError, match="read by --token-rule difference only"):
        run(TrainConfig(token_rule="random", teacher_record=str(records["teacher"]), **base))
    with pytest.raises(PredistillError, match="excess needs --reference-record"):
        run(TrainConfig(token_rule="excess", token_fraction=0.5, **base))
    with pytest.raises(PredistillError, match="read by --token-rule difference only"):
        run(TrainConfig(token_rule="excess", teacher_record=str(records["teacher"]),
                        reference_record=str(records["reference"]), **base))  # fmt: skip
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# RHO-1's excess loss (`--token-rule excess`): chosen in the step from the student's own loss
# ---------------------------------------------------------------------------------------------
def test_excess_mask_is_top_positions_of_each_rows_masked_positions():
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(6, 13, generator=g) * 5
    nll[0, 3] = nll[0, 5] = 2.0  # a tie
    reference = -torch.rand(6, 13, generator=g) * 5
    reference[0, 3] = reference[0, 5] = -1.0
    reference[1, 2] = float("nan")  # ranks last
    mask = torch.rand(6, 13, generator=g) < 0.7
    mask[2] = False  # a row with nothing to train on
    mask[0, 3] = mask[0, 5] = True
    for fraction in (0.1, 0.3, 0.5, 1.0):
        got = excess_mask(nll, reference, mask, fraction)
        for row in range(6):
            where = np.flatnonzero(mask[row].numpy())
            score = (nll[row] + reference[row]).numpy()[where]
            expected = where[top_positions(score, n_kept(len(where), fraction))]
            assert np.flatnonzero(got[row].numpy()).tolist() == sorted(expected.tolist()), (fraction, row)
    # a tie for the one place: the earlier position wins
    tie = excess_mask(torch.tensor([[1.0, 3.0, 2.0, 3.0]]), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), 0.25)
    assert tie.tolist() == [[False, True, False, False]]


def test_excess_trains_on_the_highest_excess_loss_tokens_and_counts_the_extra_head_pass(tiny_store, records, tmp_path):
    base = dict(store=str(tiny_store), **FAST)
    plain = run(TrainConfig(out=str(tmp_path / "plain"), **base))
    rho = run(TrainConfig(out=str(tmp_path / "rho"), token_rule="excess", token_fraction=0.3,
                          reference_record=str(records["reference"]), **base))  # fmt: skip
    m, p = (json.loads((d / "manifest.json").read_text()) for d in (rho, plain))
    assert m["token_selection"]["rule"] == "excess" and "reference" in m["token_selection"]["records"]
    store = TokenStore(tiny_store)
    from predistill.modeling.models import load_model

    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    head = model.get_output_embeddings().weight[: store.vocab_size].numel()
    assert m["flops_per_token"] == p["flops_per_token"] + 2 * head  # the no-grad head pass, every position
    assert m["tokens"] == p["tokens"] and m["flops"] > p["flops"]
    # the same tokens however the batch is split: per instance, and the target count is known ahead
    split = run(TrainConfig(out=str(tmp_path / "split"), token_rule="excess", token_fraction=0.3, micro_batch_size=1,
                            reference_record=str(records["reference"]), **base))  # fmt: skip
    np.testing.assert_allclose(
        [json.loads(line)["lm_loss"] for line in (split / "metrics.jsonl").read_text().splitlines()],
        [json.loads(line)["lm_loss"] for line in (rho / "metrics.jsonl").read_text().splitlines()],
        rtol=1e-5,
    )
    # the first step's loss is the mean NLL over exactly the chosen tokens of the first batch
    from predistill.stages.train import DataOrder, LossModel

    selection = TokenSelection("excess", 0.3, 0, store, None, str(records["reference"]))
    ids = DataOrder(np.arange(len(store)), seed=0).global_batch(0, 4)
    inputs, targets, mask, reference = cpu_batch(store, ids, 32, tokens_kept=selection)
    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    with torch.no_grad():
        lm_sum, _, nll, _ = LossModel(model, 256, store.vocab_size, 0.3)(
            inputs, targets, mask, None, None, 0.0, reference
        )
    kept = int((nll > 0).sum())  # the NLL is reported where the loss trained
    assert kept == n_targets(store, ids, 32, selection) == sum(n_kept(int(n), 0.3) for n in mask.sum(dim=1))
    first = json.loads((rho / "metrics.jsonl").read_text().splitlines()[0])["lm_loss"]
    assert first == pytest.approx(float(lm_sum) / kept, rel=1e-4)
