"""`predistill eval`: held-out loss against a plain computation, cross-tokenizer re-tokenisation,
run directories, errors, and lm-eval on local tasks fully offline."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from predistill import cli
from predistill.core.artifacts import PredistillError, write_manifest
from predistill.formats.evalresults import average_accuracy
from predistill.formats.store import TokenStore
from predistill.formats.tasks import CONTINUATION, LASTWORD
from predistill.modeling.models import load_model, resolve_model
from predistill.stages.eval import (
    PAPER_TASKS,
    EvalConfig,
    fewshot_table,
    heldout_metrics,
    heldout_sequences,
    run,
    task_rows,
)
from predistill.stages.tokenizer import TokenizerConfig
from predistill.stages.tokenizer import run as train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A saved tiny Qwen2 with the test tokenizer, its (tied) embeddings scaled up so that its
    predictions are decisive instead of near-uniform (no near-ties between choices)."""
    model, tokenizer = load_model("preset:tiny", tokenizer=str(bpe_tokenizer), seed=3)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(5)
    out = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, source_specs):
    """A second BPE with another vocabulary: a 'cross-family' tokenizer for the same text."""
    return train_tokenizer(
        TokenizerConfig(sources=source_specs, out=str(tmp_path_factory.mktemp("tok2") / "bpe300"), vocab_size=300)
    )


def plain_heldout_loss(model, sequences) -> float:
    """Independent definition: full logits, log_softmax, per-instance mean NLL, mean over instances."""
    losses = []
    with torch.no_grad():
        for ids in sequences:
            ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, :-1]
            losses.append(-logprobs.gather(1, ids[0, 1:, None]).mean().item())
    return float(np.mean(losses))


def test_heldout_loss_equals_plain_computation(tiny_model_dir, tiny_store):
    model, tokenizer = load_model(str(tiny_model_dir))
    store = TokenStore(tiny_store / "val")
    result = heldout_metrics(model, tokenizer, store, batch_size=4, progress=False)
    sequences = [store[i] for i in range(len(store))]
    assert result["retokenized"] is False
    assert result["n_instances"] == len(store)
    assert result["n_tokens"] == int(store.lengths.sum()) - len(store)  # the first token has no prediction
    assert result["heldout_loss"] == pytest.approx(plain_heldout_loss(model, sequences), abs=1e-5)
    # the token-level mean weighs long instances more; it is a different number
    total = sum(len(s) - 1 for s in sequences)
    assert result["heldout_token_loss"] != pytest.approx(result["heldout_loss"], abs=1e-9)
    assert set(result["heldout_loss_by_domain"]) == {"prose", "code"}
    assert (
        min(result["heldout_loss_by_domain"].values())
        < result["heldout_loss"]
        < max(result["heldout_loss_by_domain"].values())
    )
    assert total == result["n_tokens"]


def test_cross_tokenizer_store_is_retokenised(tmp_path, tiny_store, other_tokenizer):
    store = TokenStore(tiny_store / "val")
    model, tokenizer = load_model("preset:tiny", tokenizer=str(other_tokenizer), seed=1)
    sequences, retokenized, truncated = heldout_sequences(store, tokenizer)
    assert retokenized and truncated == 0 and len(sequences) == len(store)
    eos_other, eos_store = tokenizer.eos_token_id, store.eos_id
    for i, seq in enumerate(sequences):
        # byte-level BPEs are lossless: the same text, the same document boundaries, other ids
        assert tokenizer.decode(seq.tolist()) == store.decode(i)
        assert (seq == eos_other).sum() == (np.asarray(store[i]) == eos_store).sum()
    assert any(len(seq) != len(store[i]) for i, seq in enumerate(sequences))
    result = heldout_metrics(model, tokenizer, store, batch_size=8, progress=False)
    assert result["retokenized"] is True
    assert result["heldout_loss"] == pytest.approx(plain_heldout_loss(model, sequences), abs=1e-5)

    # end to end: the JSON says so
    model_dir = tmp_path / "cross"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = run(EvalConfig(model=str(model_dir), store=str(tiny_store / "val"), out=str(tmp_path / "eval.json"), limit=5))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["retokenized"] is True and any("re-tokenised" in note for note in saved["notes"])
    assert saved["n_instances"] == 5 and out["heldout_loss"] == saved["heldout_loss"]


def make_run_dir(root, model_dir, complete=True):
    run_dir = root / "run"
    shutil.copytree(model_dir, run_dir / "hf")
    write_manifest(
        run_dir,
        {
            "format": "run",
            "method": "MiniPLM",
            "model": "preset:tiny",
            "params": {"total": 1, "non_embedding": 1},
            "steps": 3,
            "tokens": 10,
            "flops": 1e9,
            "store_hash": "x",
            "selection": None,
            "kd_logits": None,
            "kd_teacher": None,
            "final_val_loss": 5.0,
        },
    )
    if not complete:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        (run_dir / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    return run_dir


def test_run_directory_is_evaluated_through_its_hf_export(tmp_path, tiny_model_dir, tiny_store):
    run_dir = make_run_dir(tmp_path, tiny_model_dir)
    assert resolve_model(str(run_dir)).hf == str(run_dir / "hf")
    # a training store with a val/ split is evaluated on that split
    result = run(EvalConfig(model=str(run_dir), store=str(tiny_store), out=str(run_dir / "eval.json"), limit=4))
    assert result["model"]["run"] == str(run_dir) and result["model"]["method"] == "MiniPLM"
    assert result["store"]["path"] == str(tiny_store / "val")
    assert result["store"]["store_hash"] == TokenStore(tiny_store / "val").hash
    assert result["results"] == {} and result["tasks"]["requested"] == [] and result["avg_acc"] is None
    assert json.loads((run_dir / "eval.json").read_text())["heldout_loss"] == result["heldout_loss"]


def test_clear_errors(tmp_path, tiny_model_dir, tiny_store, monkeypatch, capsys):
    val = str(tiny_store / "val")
    with pytest.raises(PredistillError, match="no such model"):
        run(EvalConfig(model=str(tmp_path / "missing"), store=val, out=str(tmp_path / "e.json")))
    with pytest.raises(PredistillError, match="no such token store"):
        run(EvalConfig(model=str(tiny_model_dir), store=str(tmp_path / "nostore"), out=str(tmp_path / "e.json")))
    with pytest.raises(PredistillError, match="incomplete"):
        run(
            EvalConfig(
                model=str(make_run_dir(tmp_path, tiny_model_dir, complete=False)),
                store=val,
                out=str(tmp_path / "e.json"),
            )
        )
    # unknown names would make lm-eval index all its tasks (30 s); the local folder is enough to say no
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(
        lm_eval.tasks,
        "TaskManager",
        lambda include_path=None, include_defaults=True: real(include_path=include_path, include_defaults=False),
    )
    with pytest.raises(PredistillError, match="unknown task.*hellaswagg"):
        run(
            EvalConfig(
                model=str(tiny_model_dir),
                store=val,
                out=str(tmp_path / "e.json"),
                tasks=["hellaswagg", "local"],
                tasks_dir=str(tmp_path / "tasks"),
            )
        )
    # the CLI prints one line and exits 1
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(tmp_path / "missing"), "--store", val, "--out", str(tmp_path / "e.json")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("predistill eval: error:") and "\n" not in err


def test_fewshot_flags_name_evaluated_tasks_once_with_a_count():
    assert fewshot_table(["gsm8k=8", "mmlu=5"], ["mmlu", "gsm8k"]) == {"gsm8k": 8, "mmlu": 5}
    for specs, match in (
        (["gsm8k"], "TASK=N"),
        (["gsm8k=-1"], "TASK=N"),
        (["gsm8k=x"], "TASK=N"),
        (["arc_easy=5"], "not among"),
        (["gsm8k=5", "gsm8k=8"], "twice"),
    ):
        with pytest.raises(PredistillError, match=match):
            fewshot_table(specs, ["gsm8k"])


def lm_eval_results(
    leaves: dict[str, tuple[dict, int]],
    groups: dict[str, list[str]],
    aggregates: dict[str, dict] | None = None,
    shots: int = 0,
) -> dict:
    """The parts of `lm_eval.simple_evaluate`'s return value that eval reads (as lm-eval 0.4.13
    writes them: `metric,filter` keys, a group's own entry holds only its declared aggregate)."""
    results = {t: {"alias": t, **metrics} for t, (metrics, _) in leaves.items()}
    results |= {g: {"alias": g, **(aggregates or {}).get(g, {})} for g in groups}
    return {
        "results": results,
        "group_subtasks": groups,
        "n-samples": {t: {"original": n, "effective": n} for t, (_, n) in leaves.items()},
        "n-shot": {t: shots for t in [*leaves, *groups]},
    }


def test_a_group_gets_its_item_weighted_aggregate_and_a_row_per_subtask():
    leaves = {
        "sub_a": ({"acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25}, 10),
        "sub_b": ({"acc,none": 0.8, "acc_norm,none": 0.5, "perplexity,none": 12.0}, 30),
        "sub_c": ({"acc,none": 0.2}, 20),
    }
    # a nested group: outer = [inner, sub_c], inner = [sub_a, sub_b]; no declared aggregate
    rows = task_rows(
        lm_eval_results(leaves, {"outer": ["inner", "sub_c"], "inner": ["sub_a", "sub_b"]}), ["outer", "sub_b"]
    )
    outer = rows["outer"]
    assert outer["n"] == 60 and outer["aggregate"] == "item-weighted mean of the subtasks"
    assert outer["acc"] == pytest.approx((0.5 * 10 + 0.8 * 30 + 0.2 * 20) / 60)
    assert outer["acc_norm"] == pytest.approx((0.25 * 10 + 0.5 * 30) / 40)  # over the subtasks that have it
    assert outer["perplexity"] is None  # perplexities do not average
    assert list(outer["subtasks"]) == ["sub_a", "sub_b", "sub_c"]
    assert outer["subtasks"]["sub_b"] == rows["sub_b"] and rows["sub_b"]["perplexity"] == 12.0
    assert rows["sub_b"]["acc_stderr"] == pytest.approx((0.8 * 0.2 / 29) ** 0.5)
    # an aggregate the group's YAML declares is lm-eval's, taken as it is
    declared = task_rows(lm_eval_results(leaves, {"g": ["sub_a", "sub_b"]}, {"g": {"acc,none": 0.123}}), ["g"])["g"]
    assert declared["acc"] == 0.123 and declared["aggregate"] == "lm-eval" and declared["acc_norm"] is None


def test_generation_metrics_are_collected_and_count_in_the_average():
    gsm8k = {
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5,
    }
    rows = task_rows(lm_eval_results({"gsm8k": (gsm8k, 8)}, {}, shots=8), ["gsm8k"])
    row = rows["gsm8k"]
    assert row["metrics"] == {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}
    assert row["exact_match"] == 0.25 and row["acc"] is None and row["num_fewshot"] == 8
    assert average_accuracy(rows | {"arc": {"acc": 0.5, "acc_norm": 0.75}}) == pytest.approx((0.25 + 0.75) / 2)


@pytest.mark.slow
def test_a_local_group_task_and_per_task_shots_through_lm_eval(tmp_path, tiny_model_dir, tiny_store):
    import yaml

    groups = tmp_path / "groups"
    groups.mkdir()
    (groups / "both.yaml").write_text(yaml.safe_dump({"group": "local_both", "task": [LASTWORD, CONTINUATION]}))
    common = dict(
        model=str(tiny_model_dir),
        store=str(tiny_store / "val"),
        local_items=8,
        batch_size=8,
        limit=4,
        tasks_dir=str(tmp_path / "tasks"),
    )
    alone = run(EvalConfig(out=str(tmp_path / "alone.json"), tasks=["local"], **common))["results"]
    grouped = run(EvalConfig(out=str(tmp_path / "group.json"), tasks=["local_both"], task_path=[str(groups)], **common))
    both = grouped["results"]["local_both"]
    assert grouped["tasks"]["evaluated"] == ["local_both"] and both["n"] == 8
    for task in (LASTWORD, CONTINUATION):  # the subtasks score as they do alone
        assert {k: both["subtasks"][task][k] for k in ("acc", "acc_norm", "n")} == {
            k: alone[task][k] for k in ("acc", "acc_norm", "n")
        }
    assert both["acc"] == pytest.approx((alone[LASTWORD]["acc"] + alone[CONTINUATION]["acc"]) / 2)
    assert both["acc_norm"] == alone[CONTINUATION]["acc_norm"]
    # per-task shots: each task records the examples its prompts had
    shot = run(EvalConfig(out=str(tmp_path / "shots.json"), tasks=["local"], fewshot=[f"{LASTWORD}=2"], **common))
    assert shot["results"][LASTWORD]["num_fewshot"] == 2 and shot["results"][CONTINUATION]["num_fewshot"] == 0
    assert shot["results"][CONTINUATION]["acc"] == alone[CONTINUATION]["acc"]
    with pytest.raises(PredistillError, match="--task-path"):
        run(
            EvalConfig(out=str(tmp_path / "x.json"), tasks=["local_both"], task_path=[str(tmp_path / "nope")], **common)
        )


def lm_eval_pair_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's HFLM loglikelihood, redone by hand: trailing context whitespace moves to the
    continuation, the pair is encoded whole and split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    ids = torch.tensor(whole)[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    positions = torch.arange(n_context - 1, len(whole) - 1)
    targets = ids[0, n_context:]
    picked = logprobs[positions].gather(1, targets[:, None]).squeeze(1)
    return float(picked.sum()), bool((logprobs[positions].argmax(-1) == targets).all())


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_offline_and_matches_a_hand_computation(tmp_path, tiny_model_dir, tiny_store):
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    result = run(
        EvalConfig(
            model=str(tiny_model_dir),
            store=str(tiny_store / "val"),
            out=str(tmp_path / "eval.json"),
            tasks=["default"],
            local_items=8,
            batch_size=8,
            limit=4,
        )
    )
    assert {k: os.environ.get(k) for k in env_before} == env_before  # offline mode is scoped to the run
    assert result["tasks"]["evaluated"] == [LASTWORD, CONTINUATION]
    # the paper's nine are not in this machine's HF cache: skipped with the reason, not failed
    assert set(result["tasks"]["skipped"]) == set(PAPER_TASKS)
    assert all("not reachable offline" in why for why in result["tasks"]["skipped"].values())

    model, tokenizer = load_model(str(tiny_model_dir))
    tasks_dir = tmp_path / "tasks"
    lastword = [json.loads(line) for line in (tasks_dir / f"{LASTWORD}.jsonl").read_text().splitlines()][:4]
    greedy = [lm_eval_pair_loglikelihood(model, tokenizer, d["context"], d["target"])[1] for d in lastword]
    choice = [json.loads(line) for line in (tasks_dir / f"{CONTINUATION}.jsonl").read_text().splitlines()][:4]
    acc, acc_norm = [], []
    for d in choice:
        lls = np.array([lm_eval_pair_loglikelihood(model, tokenizer, d["context"], c)[0] for c in d["choices"]])
        acc.append(int(np.argmax(lls)) == d["label"])
        acc_norm.append(int(np.argmax(lls / np.array([len(c) for c in d["choices"]]))) == d["label"])

    r = result["results"]
    assert r[LASTWORD]["n"] == 4 and r[CONTINUATION]["n"] == 4
    assert r[LASTWORD]["acc"] == pytest.approx(np.mean(greedy)) and r[LASTWORD]["acc_norm"] is None
    assert r[LASTWORD]["perplexity"] > 1
    assert r[CONTINUATION]["acc"] == pytest.approx(np.mean(acc))
    assert r[CONTINUATION]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert result["avg_acc"] == pytest.approx((np.mean(greedy) + np.mean(acc_norm)) / 2)
    assert result["local_tasks"]["n_items"] == {LASTWORD: 8, CONTINUATION: 8}


def test_a_model_with_non_finite_weights_is_an_error_not_a_nan_result(tiny_model_dir, tiny_store, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "broken")
    with pytest.raises(PredistillError, match="held-out loss is not finite"):
        run(
            EvalConfig(
                model=str(tmp_path / "broken"), store=str(tiny_store / "val"), out=str(tmp_path / "e.json"), limit=4
            )
        )
    assert not (tmp_path / "e.json").exists()


@pytest.mark.slow  # torchrun: two gloo ranks
def test_two_ranks_give_the_same_heldout_loss_as_one(tiny_model_dir, tiny_store, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    def evaluate(out, launcher):
        args = [
            "-m",
            "predistill",
            "eval",
            "--model",
            str(tiny_model_dir),
            "--store",
            str(tiny_store / "val"),
            "--out",
            str(out),
        ]
        subprocess.run([sys.executable, *launcher, *args], env=subprocess_env(), check=True, capture_output=True)
        return json.loads(out.read_text())

    one = evaluate(tmp_path / "one.json", [])
    two = evaluate(tmp_path / "two.json", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"])
    keys = ("heldout_loss", "heldout_token_loss", "heldout_loss_by_domain", "n_instances", "n_tokens")
    assert {k: two[k] for k in keys} == {k: one[k] for k in keys}
