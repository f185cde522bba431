"""predistill/training/proxy.py: MiniPLM_prx — a proxy predicts the difference score from a scored subset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from predistill.cli import main as cli_main
from predistill.formats.scores import ScoreTable
from predistill.formats.selection import load_selection, top_fraction
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model
from predistill.stages.score import ScoreConfig
from predistill.stages.score import run as score
from predistill.training.proxy import ProxyConfig, rankdata, run_proxy, spearman

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_store, tmp_path_factory) -> dict[str, str]:
    """A (tiny, randomly initialised) teacher and reference saved as HF directories."""
    root = tmp_path_factory.mktemp("proxy-models")
    tokenizer = TokenStore(tiny_store).tokenizer()
    specs = {}
    for role, seed in (("teacher", 11), ("reference", 12)):
        model, _ = load_model("preset:tiny", tokenizer, seed=seed)
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        specs[role] = str(root / role)
    return specs


def test_rankdata_and_spearman_match_known_values():
    assert rankdata(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic
    assert spearman(np.array([1, 2, 3, 4, 5.0]), np.array([5, 6, 7, 8, 7.0])) == pytest.approx(0.8207826816681233)
    assert spearman(np.arange(6.0), -np.arange(6.0)) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, np.nan, 3.0, 4.0]), np.array([2.0, 0.0, 5.0, 9.0])) == pytest.approx(1.0)


def test_proxy_runs_end_to_end_and_reports_cost_and_agreement(tiny_store, models):
    store = TokenStore(tiny_store)
    cfg = ProxyConfig(
        teacher_model=models["teacher"],
        reference_model=models["reference"],
        fraction=0.1,
        check_fraction=0.1,
        epochs=2,
        batch_size=8,
        progress=False,
    )
    result = run_proxy(cfg, store, ratio=0.5)
    n = len(store)
    s = result.stats
    assert result.predicted.shape == (n,) and np.isfinite(result.predicted).all()
    assert s["n_train"] == math.ceil(0.1 * n) and s["n_check"] == math.ceil(0.1 * n)
    assert not np.intersect1d(result.train_ids, result.check_ids).size  # disjoint subsets
    assert len(s["epoch_mse"]) == 2 and all(np.isfinite(s["epoch_mse"]))
    # cost: the proxy path spends less than scoring everything with teacher and reference
    f = s["flops"]
    assert s["flops_spent"] == pytest.approx(
        f["teacher_subset"] + f["reference_subset"] + f["proxy_train"] + f["proxy_predict"]
    )
    assert s["flops_spent"] < s["flops_full_scoring"]
    assert s["teacher_flops_ratio_full_over_spent"] == pytest.approx(f["teacher_full"] / f["teacher_subset"])
    assert 8 < s["teacher_flops_ratio_full_over_spent"] < 12  # ≈ 1/fraction of the tokens
    # agreement numbers are what they claim to be
    assert s["spearman"] == pytest.approx(spearman(result.predicted[result.check_ids], result.check_difference))
    k_true = top_fraction(result.check_difference, 0.5)
    k_proxy = top_fraction(result.predicted[result.check_ids], 0.5)
    assert s["selection_overlap"] == pytest.approx(len(np.intersect1d(k_true, k_proxy)) / len(k_true))


@pytest.mark.slow  # two full score tables plus the proxy path
def test_sample_method_proxy_against_full_difference_sampling(tiny_store, models, tmp_path):
    tables = {
        role: score(
            ScoreConfig(model=spec, store=str(tiny_store), out=str(tmp_path / f"{role}-scores"), progress=False)
        )
        for role, spec in models.items()
    }
    out = tmp_path / "sel"
    cli_main(
        [
            "sample",
            "--method",
            "proxy",
            "--teacher-model",
            models["teacher"],
            "--reference-model",
            models["reference"],
            "--teacher",
            str(tables["teacher"]),
            "--reference",
            str(tables["reference"]),
            "--ratio",
            "0.5",
            "--proxy-fraction",
            "0.2",
            "--proxy-epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    store = TokenStore(tiny_store)
    selection = load_selection(out, store)
    assert len(selection) == len(store) // 2
    m = json.loads((out / "manifest.json").read_text())
    proxy = m["proxy"]
    assert proxy["check_on"].startswith("full score tables") and proxy["n_check"] == len(store)
    t, r = ScoreTable(tables["teacher"]).logprob, ScoreTable(tables["reference"]).logprob
    full = top_fraction(t - r, 0.5)
    assert proxy["selection_overlap"] == pytest.approx(len(np.intersect1d(full, selection)) / len(full))
    # the subset the proxy learnt from was scored exactly as `score` scores it
    subset = np.load(out / "proxy_subset.npy")
    np.testing.assert_allclose(subset["teacher"], t[subset["id"]], atol=1e-5)
    np.testing.assert_allclose(subset["reference"], r[subset["id"]], atol=1e-5)
    report = (out / "report.md").read_text()
    assert "Spearman" in report and "FLOPs spent" in report and "selection overlap" in report
    assert (out / "difference_hist.png").is_file()


def test_proxy_refuses_a_store_too_small_for_its_subsets(tiny_store, models):
    from predistill.core.artifacts import PredistillError

    cfg = ProxyConfig(
        teacher_model=models["teacher"],
        reference_model=models["reference"],
        fraction=0.6,
        check_fraction=0.6,
        progress=False,
    )
    with pytest.raises(PredistillError, match="too few for a proxy subset"):
        run_proxy(cfg, TokenStore(tiny_store), ratio=0.5)


@pytest.mark.slow  # three proxy selections in subprocesses
def test_a_killed_proxy_selection_reruns_to_the_same_bytes(tiny_store, models, tmp_path):
    """MiniPLM_prx killed mid-way (SIGKILL while it works in OUT.partial) and rerun writes what a
    run never killed writes, byte for byte (no clock in the artifact)."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out):
        return [
            sys.executable,
            "-m",
            "predistill",
            "sample",
            "--method",
            "proxy",
            "--store",
            str(tiny_store),
            "--teacher-model",
            models["teacher"],
            "--reference-model",
            models["reference"],
            "--ratio",
            "0.5",
            "--proxy-fraction",
            "0.2",
            "--proxy-epochs",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]

    def files(out):
        return {
            p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "clean"), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "killed.partial").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()  # nothing claims completion
    subprocess.run(command(killed), check=True, capture_output=True, env=env)
    assert files(killed) == files(tmp_path / "clean")
