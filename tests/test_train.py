"""`predistill train`: the loop, honest compute, exact resume, DDP/FSDP equivalence, HF export."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_train_at_checkpoint, torchrun_train

from predistill.cli import main as cli_main
from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.modeling.models import count_params, load_model
from predistill.stages.train import DataOrder, LossModel, TrainConfig, flops_per_token, make_batch, run

FAST = dict(model="preset:tiny", steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_instances=16)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_cmd(store: Path, out: Path, **overrides) -> list[str]:
    cfg = {**FAST, **overrides}
    args = ["--store", str(store), "--out", str(out)]
    for key, value in cfg.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_chunked_loss_equals_plain_hf_loss_in_values_and_gradients(tiny_store):
    store = TokenStore(tiny_store)
    model, _ = load_model("preset:tiny", store.tokenizer(), seed=0)
    inputs, targets, mask = make_batch(store, [0, 1, int(np.argmin(store.lengths)), 5], seq_len=32, device="cpu")
    assert not mask.all(), "the batch should contain padding to exercise the mask"

    lm_sum, _, nll, _ = LossModel(model, chunk_size=7)(inputs, targets, mask)
    (lm_sum / mask.sum()).backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    labels = torch.where(mask, targets, torch.full_like(targets, -100))
    logits = model(input_ids=inputs).logits
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain.backward()

    torch.testing.assert_close(lm_sum / mask.sum(), plain, atol=1e-5, rtol=1e-5)
    assert torch.all(nll[~mask] == 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_lowers_heldout_loss_and_exports_a_loadable_hf_model(tiny_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **{**FAST, "steps": 30}, eval_every=10))
    rows = metrics(out)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    chance = np.log(TokenStore(tiny_store).vocab_size)  # an untrained model's loss is about this
    assert len(val) == 3 and val[-1] < val[0] and val[-1] < chance - 1.5, val

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["format"] == "run"
    assert manifest["final_val_loss"] == pytest.approx(val[-1])

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    prompt = tokenizer("The king", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > prompt.input_ids.shape[1]


def test_heldout_sets_are_scored_on_all_their_instances_after_the_last_step(tiny_store, tmp_path):
    from transformers import AutoModelForCausalLM

    from predistill.stages.eval import heldout_metrics

    # the sets are scored whole, whatever --eval-instances caps the curve's evaluations at
    out = run(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "run"),
            **{**FAST, "seq_len": 64},
            heldout=[f"pool={tiny_store / 'val'}", f"train={tiny_store}"],
        )
    )
    losses = json.loads((out / "manifest.json").read_text())["heldout_losses"]
    assert list(losses) == ["pool", "train"]
    model = AutoModelForCausalLM.from_pretrained(out / "hf")  # the oracle: eval's reading of the export
    for name, store in (("pool", TokenStore(tiny_store / "val")), ("train", TokenStore(tiny_store))):
        assert len(store) > FAST["eval_instances"] or name == "pool"
        expected = heldout_metrics(model, store.tokenizer(), store, progress=False)["heldout_loss"]
        assert losses[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "specs,message",
    [
        (["pool"], "write NAME=DIR"),
        (["a={val}", "a={val}"], "names the set 'a' twice"),
        (["a={missing}"], "not a token store"),
    ],
)
def test_bad_heldout_sets_are_refused_before_training(tiny_store, tmp_path, specs, message):
    fill = {"val": tiny_store / "val", "missing": tmp_path / "nowhere"}
    with pytest.raises(PredistillError, match=message):
        run(
            TrainConfig(
                store=str(tiny_store),
                out=str(tmp_path / "run"),
                **FAST,
                heldout=[spec.format(**fill) for spec in specs],
            )
        )
    assert not (tmp_path / "run").exists()


def test_run_records_params_tokens_and_flops_as_6ND(tiny_store, tmp_path):
    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **FAST))
    manifest = json.loads((out / "manifest.json").read_text())
    store = TokenStore(tiny_store)
    model, _ = load_model("preset:tiny", store.tokenizer())
    counts = count_params(model)
    assert manifest["params"] == counts
    assert 1e5 < counts["non_embedding"] < 1e6
    head = model.get_output_embeddings().weight.numel()
    assert manifest["flops_per_token"] == 6 * (counts["non_embedding"] + head) == flops_per_token(model)
    rows = metrics(out)
    assert (
        manifest["tokens"]
        == rows[-1]["tokens"]
        == sum(
            int(
                np.maximum(
                    np.minimum(store.lengths[DataOrder(np.arange(len(store)), 0).global_batch(s, 4)], 33) - 1, 0
                ).sum()
            )
            for s in range(8)
        )
    )
    assert manifest["flops"] == pytest.approx(manifest["flops_per_token"] * manifest["tokens"])
    assert manifest["teacher_flops"] == pytest.approx(0)


def test_flops_budget_sets_the_number_of_steps(tiny_store, tmp_path):
    store = TokenStore(tiny_store)
    model, _ = load_model("preset:tiny", store.tokenizer())
    mean_targets = float(np.mean(np.minimum(store.lengths, 33) - 1))
    budget = 5.5 * flops_per_token(model) * 4 * mean_targets
    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **FAST, flops_budget=budget))
    assert json.loads((out / "manifest.json").read_text())["steps"] == 5


def test_epochs_set_the_steps_and_the_manifest_counts_the_passes_over_the_data(tiny_store, tmp_path):
    """The data-limited regime: a selection of 14 instances repeated 3 times, every instance seen 3 times."""
    from predistill.core.artifacts import sha256_file, write_manifest

    store = TokenStore(tiny_store)
    ids = np.arange(0, 28, 2, dtype=np.int64)
    sel = tmp_path / "sel"
    sel.mkdir()
    np.save(sel / "selection.npy", ids)
    write_manifest(
        sel, {"format": "selection", "store_hash": store.hash, "selection_sha256": sha256_file(sel / "selection.npy")}
    )
    out = run(
        TrainConfig(
            store=str(tiny_store), out=str(tmp_path / "run"), selection=str(sel), **{**FAST, "batch_size": 6}, epochs=3
        )
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 7  # ⌈3 · 14 / 6⌉
    assert manifest["train_instances"] == 14 and manifest["epochs"] == 7 * 6 / 14
    seen = np.concatenate([DataOrder(ids, 0).global_batch(s, 6) for s in range(7)])
    assert (np.bincount(seen, minlength=28)[ids] == 3).all()
    plain = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "plain"), **FAST))
    assert json.loads((plain / "manifest.json").read_text())["epochs"] == 8 * 4 / len(store)


def test_data_order_is_deterministic_reshuffles_each_epoch_and_respects_a_selection():
    ids = np.array([3, 5, 8, 13, 21])
    order = DataOrder(ids, seed=7)
    batches = [order.global_batch(s, 2) for s in range(5)]  # 10 items = 2 epochs
    stream = np.concatenate(batches)
    assert sorted(stream[:5]) == sorted(ids) and sorted(stream[5:]) == sorted(ids)
    assert not np.array_equal(stream[:5], stream[5:])
    again = DataOrder(ids, seed=7)
    assert all(np.array_equal(again.global_batch(s, 2), batches[s]) for s in (4, 0, 2))  # random access
    assert not np.array_equal(DataOrder(ids, seed=8).global_batch(0, 5), stream[:5])


@pytest.mark.slow
def test_killed_run_resumes_to_byte_identical_weights(tiny_store, tmp_path):
    """Killed at its step-6 checkpoint (exports every 2 steps: 2, 4, 6 and maybe 8 already written),
    rerun: the same weights, losses and exports as a run never killed — and exports do not change
    the training (the same weights as a run without them)."""
    plain = tmp_path / "plain"
    subprocess.run(
        [sys.executable, "-m", "predistill", "train", *train_cmd(tiny_store, plain, steps=12, save_every=3)],
        check=True,
        capture_output=True,
    )
    ref = tmp_path / "ref"
    args = train_cmd(tiny_store, ref, steps=12, save_every=3, export_every=2)
    subprocess.run([sys.executable, "-m", "predistill", "train", *args], check=True, capture_output=True)

    killed = tmp_path / "killed"
    args = train_cmd(tiny_store, killed, steps=12, save_every=3, export_every=2)
    kill_train_at_checkpoint(args, killed, 6)
    assert (killed / "exports" / "step-00000006").is_dir()  # written before the checkpoint of its step
    subprocess.run([sys.executable, "-m", "predistill", "train", *args], check=True, capture_output=True)

    for run_dir in (ref, plain):
        assert sha256(killed / "hf" / "model.safetensors") == sha256(run_dir / "hf" / "model.safetensors")
        assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(run_dir)]
    exports = sorted(p.relative_to(killed).as_posix() for p in (killed / "exports").rglob("*") if p.is_file())
    assert {e.split("/")[1] for e in exports} == {f"step-{k:08d}" for k in (2, 4, 6, 8, 10)}  # 12 is hf/
    assert exports == sorted(p.relative_to(ref).as_posix() for p in (ref / "exports").rglob("*") if p.is_file())
    assert all(sha256(killed / e) == sha256(ref / e) for e in exports)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c, run: (c / "trainer_state.json").write_text("[1]"), "not a JSON object"),
        (lambda c, run: (c / "trainer_state.json").write_text('{"step": "2", "tokens": 1, "flops": 1.0}'), "step = "),
        (
            lambda c, run: (c / "trainer_state.json").write_text('{"step": 999, "tokens": 1, "flops": 1.0}'),
            "not this checkpoint's step",
        ),
        (lambda c, run: (c / "optimizer.pt").write_bytes(b"not a tensor file"), "unreadable checkpoint"),
        (
            lambda c, run: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
            "unreadable checkpoint",
        ),
        (lambda c, run: (c / "rng.pt").unlink(), "unreadable checkpoint"),
        (lambda c, run: (run / "config.json").write_text("{" * 3), "is not a run; refusing to overwrite it"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_on_resume(tiny_store, tmp_path, damage, message):
    run_dir = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **{**FAST, "steps": 4}, save_every=2))
    (run_dir / "manifest.json").unlink()  # an unfinished run: it resumes from its step-2 checkpoint
    damage(run_dir / "checkpoints" / "step-00000002", run_dir)
    with pytest.raises(PredistillError, match=message) as info:
        run(TrainConfig(store=str(tiny_store), out=str(run_dir), **{**FAST, "steps": 4}, save_every=2))
    assert "\n" not in str(info.value) and not (run_dir / "manifest.json").exists()


def test_a_second_trainer_of_one_run_directory_is_refused_while_the_first_holds_it(tiny_store, tmp_path):
    import os

    from predistill.core.artifacts import lock_dir

    out = tmp_path / "run"
    out.mkdir()
    held = lock_dir(out, out)  # what a running `train --out run` holds
    try:
        with pytest.raises(PredistillError, match="being written by another predistill process"):
            run(TrainConfig(store=str(tiny_store), out=str(out), **FAST))
    finally:
        os.close(held)
    run(TrainConfig(store=str(tiny_store), out=str(out), **FAST))
    assert (out / "manifest.json").is_file()


def test_a_run_that_fails_before_writing_leaves_no_directory(tiny_store, tmp_path):
    with pytest.raises(PredistillError, match="must split evenly"):
        run(
            TrainConfig(
                store=str(tiny_store), out=str(tmp_path / "run"), **{**FAST, "batch_size": 3}, micro_batch_size=2
            )
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a run with exports, each evaluated
def test_exports_during_training_give_accuracy_over_training(tiny_store, tmp_path):
    """PD's Fig. 5: `train --export-every`, `eval --exports`, and the report's accuracy-over-training."""
    from predistill.stages.eval import EvalConfig
    from predistill.stages.eval import run as evaluate
    from predistill.stages.report import ReportConfig
    from predistill.stages.report import run as report

    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **FAST, export_every=3))
    for step in (3, 6):
        export = out / "exports" / f"step-{step:08d}"
        info = json.loads((export / "export.json").read_text())
        assert info["step"] == step and info["tokens"] == metrics(out)[step - 1]["tokens"]
        assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    settings = dict(store=str(tiny_store / "val"), tasks=["local"], local_items=4, limit=4, batch_size=4)
    evaluate(EvalConfig(model=str(out), out=str(out / "eval.json"), exports=True, **settings))
    first = json.loads((out / "exports" / "step-00000003" / "eval.json").read_text())
    assert first["results"] and first["model"]["hf"] == str(out / "exports" / "step-00000003")
    stamp = (out / "exports" / "step-00000003" / "eval.json").stat().st_mtime_ns
    evaluate(EvalConfig(model=str(out), out=str(out / "eval.json"), exports=True, **settings))
    assert (out / "exports" / "step-00000003" / "eval.json").stat().st_mtime_ns == stamp  # kept, not redone

    data = json.loads((report(ReportConfig(runs=[str(out)], out=str(tmp_path / "report"))) / "report.json").read_text())
    points = data["runs"][0]["over_training"]
    assert [p["step"] for p in points] == [3, 6, 8]
    assert points[0]["avg_acc"] == first["avg_acc"] and points[0]["heldout_loss"] == first["heldout_loss"]
    assert "plots/accuracy_over_training.png" in data["plots"]
    # another setting that changes what is measured: evaluated again
    evaluate(EvalConfig(model=str(out), out=str(out / "eval.json"), exports=True, **{**settings, "limit": 3}))
    assert json.loads((out / "exports" / "step-00000003" / "eval.json").read_text())["config"]["limit"] == 3


def test_kd_settings_do_not_tell_lm_only_runs_apart():
    from predistill.training.config import result_identity
    from predistill.training.kd import KDConfig

    plain = TrainConfig(store="s", out="o")
    assert result_identity(plain) == result_identity(TrainConfig(store="s", out="o", kd=KDConfig(vocab_map="exact")))
    distilled = dict(store="s", out="o", kd_logits="l", alpha=0.5)
    assert result_identity(TrainConfig(**distilled)) != result_identity(
        TrainConfig(**distilled, kd=KDConfig(vocab_map="exact"))
    )


def test_rerunning_a_finished_run_is_a_noop_and_another_config_is_refused(tiny_store, tmp_path, capsys):
    cfg = TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **FAST)
    out = run(cfg)
    before = sha256(out / "hf" / "model.safetensors")
    run(cfg)
    assert "already complete" in capsys.readouterr().err
    assert sha256(out / "hf" / "model.safetensors") == before
    with pytest.raises(PredistillError, match="another config"):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **{**FAST, "lr": 1e-3}))


def test_config_file_flags_override_it_and_print_config_round_trips(tiny_store, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'store = "{tiny_store}"\nsteps = 5\nlr = 0.01\nlr_schedule = "cosine"\n')
    cli_main(["train", "--config", str(toml), "--lr", "0.002", "--out", str(tmp_path / "x"), "--print-config"])
    printed = capsys.readouterr().out
    assert 'lr = 0.002' in printed and 'steps = 5' in printed and 'lr_schedule = "cosine"' in printed
    assert '# selection = (unset)' in printed
    again = tmp_path / "again.toml"
    again.write_text(printed)
    cli_main(["train", "--config", str(again), "--print-config"])
    assert capsys.readouterr().out == printed


def test_a_runs_config_json_reproduces_it(tiny_store, tmp_path, capsys):
    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), **FAST))
    cli_main(["train", "--config", str(out / "config.json"), "--print-config"])
    printed = capsys.readouterr().out
    assert f'out = "{out}"' in printed and "steps = 8" in printed and "lr = 0.003" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "3"], "needs --store"),
        (["--store", "STORE", "--out", "OUT", "--alpha", "0.5"], "needs a KD source"),
        (["--store", "STORE", "--out", "OUT", "--batch-size", "6", "--micro-batch-size", "4"], "split evenly"),
        (["--store", "/nonexistent", "--out", "OUT"], "not a token store"),
        (["--store", "STORE", "--out", "OUT", "--selection", "/nonexistent"], "not a selection"),
        (["--store", "STORE", "--out", "OUT", "--lr", "inf"], "--lr must be finite and in (0, inf)"),
        (["--store", "STORE", "--out", "OUT", "--weight-decay", "nan"], "--weight-decay must be finite"),
        (["--store", "STORE", "--out", "OUT", "--beta2", "1"], "--beta2 must be finite and in [0, 1)"),
        (["--store", "STORE", "--out", "OUT", "--eps", "0"], "--eps must be finite and in (0, inf)"),
        (["--store", "STORE", "--out", "OUT", "--grad-clip", "-1"], "--grad-clip must be finite"),
        (["--store", "STORE", "--out", "OUT", "--flops-budget", "0"], "--flops-budget must be finite and in (0, inf)"),
        (["--store", "STORE", "--out", "OUT", "--epochs", "nan"], "--epochs must be finite and in (0, inf)"),
        (["--store", "STORE", "--out", "OUT", "--epochs", "2", "--flops-budget", "1e12"], "not both"),
        (["--store", "STORE", "--out", "OUT", "--warmup-ratio", "1.5"], "--warmup-ratio must be finite and in [0, 1]"),
    ],
)
def test_bad_input_is_one_line_error(tiny_store, tmp_path, capsys, args, message):
    args = [a.replace("STORE", str(tiny_store)).replace("OUT", str(tmp_path / "o")) for a in args]
    with pytest.raises(SystemExit) as e:
        cli_main(["train", *args, "--seq-len", "32"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_selection_trains_only_on_the_selected_instances(tiny_store, tmp_path):
    from predistill.core.artifacts import sha256_file, write_manifest

    store = TokenStore(tiny_store)
    sel = tmp_path / "sel"
    sel.mkdir()
    np.save(sel / "selection.npy", np.arange(0, len(store), 3, dtype=np.int64))
    write_manifest(
        sel, {"format": "selection", "store_hash": store.hash, "selection_sha256": sha256_file(sel / "selection.npy")}
    )
    order_ids = DataOrder(np.load(sel / "selection.npy"), 0)
    seen = np.concatenate([order_ids.global_batch(s, 4) for s in range(8)])
    assert set(seen) <= set(range(0, len(store), 3))
    out = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run"), selection=str(sel), **FAST))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "MiniPLM" and manifest["selection"] == str(sel)
    assert manifest["tokens"] == sum(
        int((np.minimum(store.lengths[DataOrder(np.load(sel / "selection.npy"), 0).global_batch(s, 4)], 33) - 1).sum())
        for s in range(8)
    )

    write_manifest(
        sel, {"format": "selection", "store_hash": "0" * 64, "selection_sha256": sha256_file(sel / "selection.npy")}
    )
    with pytest.raises(PredistillError, match="made from token store 000000000000"):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "run2"), selection=str(sel), **FAST))


@pytest.mark.slow
def test_ddp_two_ranks_match_one_rank(tiny_store, tmp_path):
    one = tmp_path / "one"
    torchrun_train(1, train_cmd(tiny_store, one, steps=5, micro_batch_size=2))
    two = tmp_path / "two"
    torchrun_train(2, train_cmd(tiny_store, two, steps=5, micro_batch_size=1))
    np.testing.assert_allclose([r["loss"] for r in metrics(two)], [r["loss"] for r in metrics(one)], rtol=1e-5)
    assert metrics(two)[-1]["val_loss"] == pytest.approx(metrics(one)[-1]["val_loss"], rel=1e-5)
    assert (
        json.loads((two / "manifest.json").read_text())["tokens"]
        == json.loads((one / "manifest.json").read_text())["tokens"]
    )


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_rank_and_resume_from_dcp(tiny_store, tmp_path):
    import shutil

    from safetensors.torch import load_file

    one = tmp_path / "one"
    torchrun_train(1, train_cmd(tiny_store, one, steps=6, export_every=2))
    fsdp = tmp_path / "fsdp"
    torchrun_train(2, train_cmd(tiny_store, fsdp, steps=6, save_every=3, fsdp=True, export_every=2))
    np.testing.assert_allclose([r["loss"] for r in metrics(fsdp)], [r["loss"] for r in metrics(one)], rtol=1e-5)
    assert (fsdp / "checkpoints" / "step-00000003" / "dcp").is_dir()
    # a step export gathers the sharded weights: the same model as one rank's at that step
    for step in ("step-00000002", "step-00000004"):
        ours, ref = (load_file(d / "exports" / step / "model.safetensors") for d in (fsdp, one))
        assert ours.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)

    # an interrupted FSDP run (everything after the step-3 checkpoint lost) resumes from DCP
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "hf")
    (resumed / "manifest.json").unlink()
    torchrun_train(2, train_cmd(tiny_store, resumed, steps=6, save_every=3, fsdp=True))
    assert sha256(resumed / "hf" / "model.safetensors") == sha256(fsdp / "hf" / "model.safetensors")
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(fsdp)]


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_claims_nothing(tiny_store, tmp_path):
    # a finite but absurd learning rate: the first update blows the weights up
    cfg = TrainConfig(
        store=str(tiny_store), out=str(tmp_path / "run"), **{**FAST, "lr": 1e30, "warmup": 0, "save_every": 1}
    )
    with pytest.raises(PredistillError, match=r"step \d+: non-finite loss or gradient norm"):
        run(cfg)
    assert not (tmp_path / "run" / "manifest.json").exists() and not (tmp_path / "run" / "hf").exists()
    for checkpoint in (tmp_path / "run" / "checkpoints").glob("step-*"):  # only states before the blow-up
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_two_identical_runs_write_identical_checkpoints(tiny_store, tmp_path):
    # the RNG state saved in a checkpoint is seeded too, so a checkpoint is a function of the config
    for name in ("a", "b"):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / name), **{**FAST, "steps": 4, "save_every": 2}))
    files = {
        name: {
            p.relative_to(tmp_path / name).as_posix(): sha256(p)
            for p in sorted((tmp_path / name / "checkpoints").rglob("*"))
            if p.is_file()
        }
        for name in ("a", "b")
    }
    assert files["a"] == files["b"] and any(k.endswith("rng.pt") for k in files["a"])


def test_a_number_given_as_temperature_is_static_even_over_a_files_adaptive_mode(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('temperature_mode = "normkd"\nnormkd_t = 2.0\n')
    cli_main(["train", "--config", str(tmp_path / "c.toml"), "--temperature", "2.0", "--print-config"])
    printed = capsys.readouterr().out
    assert 'temperature_mode = "static"' in printed and "temperature = 2.0" in printed
    cli_main(["train", "--temperature", "adakd-h", "--print-config"])
    assert 'temperature_mode = "adakd-h"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags", [dict(activation_checkpointing=True), dict(attn_impl="eager"), dict(fused_kernels=False, loss_chunk=64)]
)
def test_speed_paths_train_the_same_model(tiny_store, tmp_path, flags):
    # recomputed activations, another attention kernel, the model's own norm/MLP forwards and another
    # head chunking change speed and memory, not the numbers
    base = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "base"), **{**FAST, "steps": 3}))
    other = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "other"), **{**FAST, "steps": 3}, **flags))
    losses = [[r["loss"] for r in metrics(d)] for d in (base, other)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_bf16_precision_trains_deterministically_and_close_to_fp32(tiny_store, tmp_path):
    """--precision bf16 (autocast; a GPU's default): the same weights twice, losses within bf16
    rounding of fp32's; the setting is part of what a run is (no resume across it)."""
    fp32 = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "fp32"), **{**FAST, "steps": 4}))
    bf16 = [
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / name), precision="bf16", **{**FAST, "steps": 4}))
        for name in ("a", "b")
    ]
    assert sha256(bf16[0] / "hf" / "model.safetensors") == sha256(bf16[1] / "hf" / "model.safetensors")
    losses = [[r["loss"] for r in metrics(d)] for d in (fp32, bf16[0])]
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)
    assert losses[1] != losses[0]  # it did compute in bf16
    with pytest.raises(PredistillError, match="another config"):
        run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "fp32"), precision="bf16", **{**FAST, "steps": 4}))


@pytest.mark.slow  # torch.compile on CPU compiles C++ kernels
def test_compiled_layers_train_the_same_model(tiny_store, tmp_path):
    base = run(TrainConfig(store=str(tiny_store), out=str(tmp_path / "base"), **{**FAST, "steps": 2}))
    compiled = run(
        TrainConfig(store=str(tiny_store), out=str(tmp_path / "compiled"), **{**FAST, "steps": 2}, compile=True)
    )
    np.testing.assert_allclose([r["loss"] for r in metrics(compiled)], [r["loss"] for r in metrics(base)], rtol=1e-4)


@pytest.mark.slow  # torchrun: one and two gloo ranks
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_online_logits_from_two_ranks_match_one_rank(tiny_store, tmp_path, sharding):
    """PD's online logits (--save-logits) from two DDP or FSDP ranks: the store one rank writes.
    FSDP is how a 9B teacher trains; its head is gathered for the entries, and the instances no step
    saw go through the final model on both ranks."""
    from predistill.formats.logits import LogitsStore

    # the same micro-batch compositions on one rank (2 × 4) and on two ranks (1 × 4 each); 4 steps of 8
    # leave some instances unseen, for the final model
    for name, nproc in (("one", 1), ("two", 2)):
        torchrun_train(
            nproc,
            train_cmd(
                tiny_store,
                tmp_path / name,
                steps=4,
                seq_len=64,
                batch_size=8,
                micro_batch_size=4,
                save_logits=str(tmp_path / name / "logits"),
                fsdp=sharding == "fsdp" and nproc == 2,
            ),
        )
    stores = {name: LogitsStore(tmp_path / name / "logits", TokenStore(tiny_store)) for name in ("one", "two")}
    assert stores["two"].manifest["n_positions"] == stores["one"].manifest["n_positions"]
    assert len(TokenStore(tiny_store)) > 4 * 8  # the final model's pass had work
    same = total = 0
    step = stores["one"].manifest["encoding"]["logprob_max_abs_error"] * 2
    for i in range(len(TokenStore(tiny_store))):
        a, b = stores["one"].instance_entries(i), stores["two"].instance_entries(i)
        total += 1
        if a.ids.tolist() == b.ids.tolist():  # summed gradients over ranks differ from one rank's in rounding only
            same += 1
            assert np.abs(a.logprobs - b.logprobs).max() <= step + 1e-6
    # rounding swaps near-tied entries of this barely trained model: more under FSDP, whose
    # reduce-scatter sums in another order than DDP's all-reduce (93% and 96% in two runs)
    assert same >= (0.95 if sharding == "ddp" else 0.9) * total
