"""`predistill report`: tables, plots and commands from fabricated run directories; the power law."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from predistill import cli
from predistill.core.artifacts import PredistillError, write_manifest
from predistill.stages.report import (
    ReportConfig,
    fit_power_law,
    flops_to_reach,
    reconstruct_command,
    run,
    scaling_fits,
    seed_groups,
    summarize_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.hist([1, 2, 2, 3])
    fig.savefig(path)
    plt.close(fig)


def fabricate_run(
    root,
    name,
    *,
    method,
    flops,
    tokens,
    final_val_loss,
    params=400_000,
    eval_json=None,
    selection=None,
    kd_logits=None,
    command=None,
    loss0=6.0,
    model="preset:tiny",
    seed=None,
    student_flops_per_token=None,
    settings=None,
    heldout_losses=None,
):
    """A run directory following `predistill train`'s contract (manifest, metrics, config, [eval])."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    steps = 10
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            frac = step / steps
            row = {
                "step": step,
                "loss": loss0 * frac**-0.1,
                "lm_loss": loss0,
                "kd_loss": 0.0,
                "lr": 1e-3,
                "alpha": 0.0,
                "tokens": tokens * frac,
                "flops": flops * frac,
                "tokens_per_s": 1000.0,
            }
            if step % 2 == 0:
                row["val_loss"] = final_val_loss * frac**-0.08  # a clean power law in compute
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 11, "loss": ')  # a line cut by a kill: must be skipped
    config = {"store": "store", "model": model} | ({"command": command} if command else {})
    config |= ({"seed": seed} if seed is not None else {}) | (settings or {})
    (run_dir / "config.json").write_text(json.dumps(config))
    write_manifest(
        run_dir,
        {
            "format": "run",
            "config": config,
            "method": method,
            "model": model,
            "params": {"total": params, "non_embedding": params // 4},
            "steps": steps,
            "tokens": tokens,
            "flops": flops,
            "store_hash": "h",
            "student_flops_per_token": student_flops_per_token,
            "selection": str(selection) if selection else None,
            "kd_logits": str(kd_logits) if kd_logits else None,
            "kd_teacher": None,
            "final_val_loss": final_val_loss,
            "heldout_losses": heldout_losses or {},
        },
    )
    if eval_json is not None:
        (run_dir / "eval.json").write_text(json.dumps(eval_json))
    return run_dir


@pytest.fixture()
def runs(tmp_path):
    # a selection that names its two score tables (which state their teacher/reference FLOPs)
    teacher = tmp_path / "scores_teacher"
    reference = tmp_path / "scores_ref"
    teacher.mkdir()
    reference.mkdir()
    write_manifest(teacher, {"format": "score_table", "flops": 3e12})
    write_manifest(reference, {"format": "score_table", "flops": 1e11})
    selection = tmp_path / "selection"
    selection.mkdir()
    np.save(selection / "ids.npy", np.arange(10))
    write_png(selection / "score_hist.png")
    write_manifest(
        selection, {"format": "selection", "score_tables": {"teacher": str(teacher), "reference": str(reference)}}
    )
    logits = tmp_path / "logits"
    logits.mkdir()
    write_manifest(logits, {"format": "logits_store", "bytes_per_token": 12.5, "flops": 2e12})

    def eval_json(loss, acc, acc_norm):
        # as eval writes it: keys sorted, the task order in tasks.evaluated
        return {
            "heldout_loss": loss,
            "tasks": {"evaluated": ["local_lastword", "local_continuation"]},
            "results": {
                "local_continuation": {"acc": acc, "acc_norm": acc_norm},
                "local_lastword": {"acc": acc, "acc_norm": None},
            },
        }

    return [
        fabricate_run(
            tmp_path / "runs",
            "baseline",
            method="Pre-Train w/o KD",
            flops=1e13,
            tokens=2e5,
            final_val_loss=4.0,
            eval_json=eval_json(4.1, 0.25, 0.30),
            command="predistill train --store store --out runs/baseline",
        ),
        fabricate_run(
            tmp_path / "runs",
            "miniplm",
            method="MiniPLM",
            flops=1e13,
            tokens=2e5,
            final_val_loss=3.8,
            eval_json=eval_json(3.9, 0.35, 0.40),
            selection=selection,
        ),
        fabricate_run(
            tmp_path / "runs",
            "pd",
            method="PD (offline KD)",
            flops=2e13,
            tokens=4e5,
            final_val_loss=3.7,
            kd_logits=logits,
        ),
    ]


def table_row(md: str, name: str, section: str = "") -> list[str]:
    """The cells of the first table row named `name`, after the first heading that starts with `section`."""
    lines = md.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith(f"## {section}")) if section else 0
    line = next(line for line in lines[start:] if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_writes_table_plots_and_commands(tmp_path, runs):
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "report")))
    md = (out / "report.md").read_text()
    header = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| run |")).strip("|").split("|")]
    assert header[:6] == ["run", "method", "params (non-emb.)", "training FLOPs", "tokens", "held-out loss"]
    assert header[6:8] == ["local_lastword", "local_continuation"]
    col = {name: k for k, name in enumerate(header)}

    base, mini, pd = (table_row(md, n) for n in ("baseline", "miniplm", "pd"))
    assert base[col["method"]] == "Pre-Train w/o KD" and base[col["params (non-emb.)"]] == "400K (100K)"
    assert base[col["training FLOPs"]] == "1.00e+13" and base[col["tokens"]] == "200K"
    assert base[col["held-out loss"]] == "4.1000"  # from eval.json, not the manifest's 4.0
    assert base[col["local_lastword"]] == "25.0" and base[col["local_continuation"]] == "30.0"  # acc_norm preferred
    assert base[col["avg acc"]] == "27.5"
    assert base[col["teacher FLOPs offline"]] == "–" and base[col["logits B/token"]] == "–"
    assert mini[col["teacher FLOPs offline"]] == "3.10e+12"  # teacher + reference score tables
    assert pd[col["held-out loss"]] == "3.7000†"  # no eval.json: the run's final validation loss
    assert pd[col["local_lastword"]] == "–" and pd[col["avg acc"]] == "–"
    assert pd[col["logits B/token"]] == "12.5" and pd[col["teacher FLOPs offline"]] == "2.00e+12"

    # each row's command: stored in config.json, or reconstructed
    assert "predistill train --store store --out runs/baseline" in md
    assert "predistill train --store store --model preset:tiny\n" in md  # rebuilt from config.json

    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert {"loss_vs_tokens.png", "loss_vs_flops.png", "scaling.png", "selection-selection-score_hist.png"} <= set(
        plots
    )
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"](plots/{name})" in md  # linked relatively from the Markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots) and 'src="plots/' not in page  # self-contained
    assert "<td>3.7000†</td>" in page and "MiniPLM" in page

    summary = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["baseline", "miniplm", "pd"]
    assert sorted(summary["runs"][1]["teacher_flops_sources"]) == sorted(
        str(p.resolve()) for p in (tmp_path / "scores_teacher", tmp_path / "scores_ref")
    )
    # each run's validation curve is an exact power law: its fit recovers the exponent 0.08
    curve_fits = {f["label"]: f for f in summary["fits"] if f["kind"] == "curve"}
    assert curve_fits["run: baseline"]["b"] == pytest.approx(0.08, rel=1e-6)
    assert curve_fits["run: baseline"]["c"] == pytest.approx(0.0, abs=1e-6)
    assert curve_fits["run: baseline"]["r2"] == pytest.approx(1.0)


def test_report_never_crashes_on_missing_pieces(tmp_path, runs):
    bare = tmp_path / "runs" / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{not json")
    broken_sel = fabricate_run(
        tmp_path / "runs",
        "dangling",
        method="MiniPLM",
        flops=5e12,
        tokens=1e5,
        final_val_loss=4.5,
        selection=tmp_path / "gone",
    )
    out = run(ReportConfig(runs=[str(bare), str(broken_sel), str(runs[0])], out=str(tmp_path / "r")))
    md = (out / "report.md").read_text()
    row = table_row(md, "bare")
    assert row[1:6] == ["–"] * 5 and row[-1] == "–"
    assert "Incomplete or unreadable run manifests (partial rows): bare." in md
    assert table_row(md, "dangling")[-2] == "–"  # a selection that is not there: no FLOPs, no crash
    assert f"– (no readable {bare / 'config.json'})" in md
    with pytest.raises(PredistillError, match="no such run directory"):
        run(ReportConfig(runs=[str(tmp_path / "nope")], out=str(tmp_path / "r2")))


def test_selection_score_data_without_png_is_histogrammed(tmp_path):
    selection = tmp_path / "sel"
    selection.mkdir()
    np.save(selection / "difference.npy", np.random.default_rng(0).normal(size=200).astype(np.float32))
    np.save(selection / "selection.npy", np.arange(100, dtype=np.int64))  # ids: not a score
    write_manifest(selection, {"format": "selection", "flops": 7e12})
    r = fabricate_run(
        tmp_path, "run", method="MiniPLM", flops=1e13, tokens=1e5, final_val_loss=4.0, selection=selection
    )
    out = run(ReportConfig(runs=[str(r)], out=str(tmp_path / "rep")))
    assert (out / "plots" / "selection-sel-scores.png").read_bytes()[:8] == PNG_MAGIC
    assert "histogram of difference" in (out / "report.md").read_text()
    assert summarize_run(str(r)).teacher_flops_offline == 7e12  # the selection's own total


def test_proxy_selection_counts_what_it_spent(tmp_path):
    table = tmp_path / "teacher_table"  # named in the selection's config, as `predistill sample` writes it
    table.mkdir()
    write_manifest(table, {"format": "score_table", "flops": 5e15})
    proxy_sel = tmp_path / "prx"
    proxy_sel.mkdir()
    write_manifest(
        proxy_sel,
        {
            "format": "selection",
            "config": {"teacher": None, "method": "proxy"},
            "proxy": {"flops_spent": 2.5e14, "flops_full_scoring": 5e15},
        },
    )
    full_sel = tmp_path / "full"
    full_sel.mkdir()
    write_manifest(full_sel, {"format": "selection", "config": {"teacher": "teacher_table", "store": None}})
    r1 = fabricate_run(
        tmp_path, "r1", method="MiniPLM_prx", flops=1e13, tokens=1, final_val_loss=4.0, selection=proxy_sel
    )
    r2 = fabricate_run(tmp_path, "r2", method="MiniPLM", flops=1e13, tokens=1, final_val_loss=4.0, selection=full_sel)
    assert summarize_run(str(r1)).teacher_flops_offline == 2.5e14
    # a bare name is resolved as written (from the cwd) or relative to the selection: neither exists yet
    assert summarize_run(str(r2)).teacher_flops_offline is None
    (full_sel / "teacher_table").symlink_to(table)
    assert summarize_run(str(r2)).teacher_flops_offline == 5e15


def test_logits_from_a_scoring_pass_count_that_pass_once(tmp_path):
    table = tmp_path / "scores"
    table.mkdir()
    write_manifest(table, {"format": "score_table", "flops": 3e15})
    logits = tmp_path / "logits"  # written in the same teacher pass: no flops of its own, names the table
    logits.mkdir()
    write_manifest(
        logits,
        {
            "format": "logits_store",
            "bytes_per_token": 11.8,
            "scored_with": {"score_table": str(table), "teacher_pass": "shared"},
        },
    )
    selection = tmp_path / "sel"
    selection.mkdir()
    write_manifest(selection, {"format": "selection", "config": {"teacher": str(table)}})
    pd = fabricate_run(tmp_path, "pd", method="PD", flops=1e13, tokens=1, final_val_loss=4.0, kd_logits=logits)
    both = fabricate_run(
        tmp_path,
        "both",
        method="MiniPLM + PD",
        flops=1e13,
        tokens=1,
        final_val_loss=4.0,
        kd_logits=logits,
        selection=selection,
    )
    assert summarize_run(str(pd)).teacher_flops_offline == 3e15
    assert summarize_run(str(both)).teacher_flops_offline == 3e15  # one pass, counted once


def test_seqkd_counts_the_teachers_generation_and_a_plain_corpus_counts_nothing(tmp_path):
    generated = tmp_path / "seqkd_data"  # `predistill generate`: a token store that states its teacher FLOPs
    generated.mkdir()
    write_manifest(generated, {"format": "token_store", "generation": {"max_new_tokens": 64}, "flops": 7e14})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest(corpus, {"format": "token_store", "flops": 1.0})  # not teacher inference
    seqkd = fabricate_run(
        tmp_path, "seqkd", method="SeqKD", flops=1e13, tokens=1, final_val_loss=4.0, settings={"store": str(generated)}
    )
    plain = fabricate_run(
        tmp_path,
        "plain",
        method="Pre-Train w/o KD",
        flops=1e13,
        tokens=1,
        final_val_loss=4.0,
        settings={"store": str(corpus)},
    )
    s = summarize_run(str(seqkd))
    assert s.teacher_flops_offline == 7e14 and s.teacher_flops_sources == [str(generated.resolve())]
    assert summarize_run(str(plain)).teacher_flops_offline is None

    # in another family's tokenizer: re-tokenised from the generated store (`prepare --source store:`)
    retokenized = tmp_path / "seqkd_data_llama"
    retokenized.mkdir()
    write_manifest(retokenized, {"format": "token_store", "derived_from": {"path": str(generated), "hash": "h"}})
    llama = fabricate_run(
        tmp_path,
        "seqkd_llama",
        method="SeqKD",
        flops=1e13,
        tokens=1,
        final_val_loss=4.0,
        settings={"store": str(retokenized)},
    )
    assert summarize_run(str(llama)).teacher_flops_offline == 7e14


def test_a_materialised_selection_counts_the_scoring_behind_it(tmp_path):
    """MiniPLM for another family trains on `sample --materialize`'s store, without --selection."""
    tables = []
    for role, flops in (("teacher", 3e12), ("reference", 1e11)):
        tables.append(tmp_path / role)
        tables[-1].mkdir()
        write_manifest(tables[-1], {"format": "score_table", "flops": flops})
    selection = tmp_path / "selection"
    selection.mkdir()
    write_manifest(
        selection, {"format": "selection", "score_tables": {"teacher": str(tables[0]), "reference": str(tables[1])}}
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest(corpus, {"format": "token_store"})
    materialised = tmp_path / "selection_llama"
    materialised.mkdir()
    write_manifest(
        materialised, {"format": "token_store", "source": {"selection_dir": str(selection), "store_dir": str(corpus)}}
    )
    run_dir = fabricate_run(
        tmp_path,
        "miniplm_llama",
        method="MiniPLM",
        flops=1e13,
        tokens=1,
        final_val_loss=4.0,
        settings={"store": str(materialised)},
    )
    assert summarize_run(str(run_dir)).teacher_flops_offline == pytest.approx(3.1e12)


def test_command_is_rebuilt_from_config_settings():
    config = {"store": "my store", "steps": 10, "fsdp": False, "selection": None, "tags": ["a", "b"], "command": None}
    assert (
        reconstruct_command(config) == "predistill train --store 'my store' --steps 10 --fsdp false --tags a --tags b"
    )


def test_power_law_fit_recovers_parameters():
    compute = np.geomspace(1e15, 1e19, 8)
    law = fit_power_law(compute, 50.0 * compute**-0.1)
    assert law.a == pytest.approx(50.0, rel=1e-8) and law.b == pytest.approx(0.1, rel=1e-8)
    assert law.c == 0 and law.r2 == pytest.approx(1.0)
    with_floor = fit_power_law(compute, 300.0 * compute**-0.15 + 1.8, irreducible=True)
    assert with_floor.c == pytest.approx(1.8, rel=1e-3)
    assert with_floor.a == pytest.approx(300.0, rel=2e-2) and with_floor.b == pytest.approx(0.15, rel=5e-3)
    assert with_floor.compute_for(float(with_floor(3e17))) == pytest.approx(3e17, rel=1e-6)
    assert with_floor.compute_for(1.0) is None  # below the irreducible loss: never reached
    with pytest.raises(ValueError):
        fit_power_law([1e15, 1e15], [3.0, 3.1])


def test_scaling_fits_are_per_exact_configuration_never_pooled_by_method(tmp_path):
    """One law per configuration across its budgets (steps and seeds are budget, not identity): the
    same method at another size, or with another learning rate, is another configuration."""
    runs = []
    for size, a in (("tiny", 20.0), ("mini", 16.0)):
        for lr, shift in ((0.001, 1.0), (0.01, 1.1)):
            for k, c in enumerate([1e12, 1e13, 1e14]):
                runs.append(
                    fabricate_run(
                        tmp_path,
                        f"m-{size}-{lr}-{k}",
                        method="MiniPLM",
                        flops=c,
                        tokens=1e5,
                        final_val_loss=shift * a * c**-0.05,
                        model=f"preset:{size}",
                        seed=k,
                        settings={"steps": 10**k, "lr": lr},
                    )
                )
    runs.append(fabricate_run(tmp_path, "base", method="baseline", flops=1e13, tokens=1e5, final_val_loss=3.0))
    fits = {f["label"]: f for f in scaling_fits([summarize_run(str(r)) for r in runs], "off") if f["kind"] == "config"}
    assert sorted(fits) == [
        "config: MiniPLM (mini): lr=0.001",
        "config: MiniPLM (mini): lr=0.01",
        "config: MiniPLM (tiny): lr=0.001",
        "config: MiniPLM (tiny): lr=0.01",
    ]
    assert fits["config: MiniPLM (tiny): lr=0.001"]["a"] == pytest.approx(20, rel=1e-6)
    assert fits["config: MiniPLM (mini): lr=0.01"]["a"] == pytest.approx(16 * 1.1, rel=1e-6)
    assert all(f["b"] == pytest.approx(0.05, rel=1e-6) and f["n_points"] == 3 for f in fits.values())
    # the baseline has one compute budget: nothing to fit


def test_extrapolation_reads_each_fit_at_1T_and_10T_tokens_and_the_compute_to_reach_the_baseline(tmp_path):
    """MiniPLM's L(1T), L(10T): each configuration's fit at C(D) = 6·N·D, and how much of that
    compute a method needs to reach the baseline's extrapolated loss."""
    fpt = 6e6  # a student with N = 1e6
    laws = {
        "Pre-Train w/o KD": lambda c: 20 * c**-0.05,
        "MiniPLM": lambda c: 19 * c**-0.05,
        "Vanilla KD": lambda c: 21 * c**-0.04,
    }
    runs = [
        fabricate_run(
            tmp_path / "runs",
            f"{method.split()[0]}-{k}",
            method=method,
            flops=c,
            tokens=c / fpt,
            final_val_loss=law(c),
            student_flops_per_token=fpt,
            settings={"steps": k, "lr": 0.001},
        )
        for method, law in laws.items()
        for k, c in enumerate([1e13, 1e14, 1e15])
    ]
    # the same method at another learning rate: no baseline was trained with it, so no ratio
    runs += [
        fabricate_run(
            tmp_path / "runs",
            f"MiniPLM-lr-{k}",
            method="MiniPLM",
            flops=c,
            tokens=c / fpt,
            final_val_loss=laws["MiniPLM"](c),
            student_flops_per_token=fpt,
            settings={"steps": k, "lr": 0.01},
        )
        for k, c in enumerate([1e13, 1e14, 1e15])
    ]
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "r"), irreducible="off"))
    data = json.loads((out / "report.json").read_text())
    assert all(g["n_seeds"] == 1 for g in data["seed_groups"])  # budgets of one method are not its seeds
    rows = {e["label"]: e for e in data["extrapolations"]}
    base, miniplm, vanilla = (rows[f"config: {m} (tiny)" + (": lr=0.001" if m == "MiniPLM" else "")] for m in laws)
    assert rows["config: MiniPLM (tiny): lr=0.01"]["1T"]["compute_ratio_to_baseline"] is None
    # a run's own curve is read against the baseline run of the same budget: each final loss is 0.95× the
    # baseline's at equal compute, so with the curves' slope of 0.08 the ratio is 0.95^(1/0.08) at every budget
    for k in range(3):
        assert rows[f"run: MiniPLM-{k}"]["1T"]["compute_ratio_to_baseline"] == pytest.approx(0.95**12.5, rel=1e-4)
    for name, tokens in (("1T", 1e12), ("10T", 1e13)):
        c = fpt * tokens
        assert miniplm[name]["compute"] == pytest.approx(c)
        assert base[name]["loss"] == pytest.approx(laws["Pre-Train w/o KD"](c), rel=1e-6)
        assert miniplm[name]["loss"] == pytest.approx(laws["MiniPLM"](c), rel=1e-6)
        # 19·C'^-0.05 = 20·C^-0.05  ⇒  C'/C = 0.95^20, at every D
        assert miniplm[name]["compute_ratio_to_baseline"] == pytest.approx(0.95**20, rel=1e-5)
        needed = (21 / laws["Pre-Train w/o KD"](c)) ** (1 / 0.04)
        assert vanilla[name]["compute_ratio_to_baseline"] == pytest.approx(needed / c, rel=1e-5) and needed > c
        assert base[name]["compute_ratio_to_baseline"] is None
    md = (out / "report.md").read_text()
    assert "L(1T)" in md and "L(10T)" in md
    extrapolated = md[md.index("## Extrapolated as MiniPLM does") :]
    line = next(row for row in extrapolated.splitlines() if row.startswith("| config: MiniPLM (tiny): lr=0.001 |"))
    assert line.count(f"{0.95**20:.2f}×") == 2  # at 1T and at 10T


def test_cli_report(tmp_path, runs, capsys):
    cli.main(["report", *map(str, runs), "--out", str(tmp_path / "cli"), "--title", "demo", "--irreducible", "off"])
    assert re.search(r"wrote .*report\.md and .*report\.html", capsys.readouterr().out)
    assert (tmp_path / "cli" / "report.md").read_text().startswith("# demo\n")


def test_a_diverged_run_is_shown_as_such_not_as_missing(tmp_path, capsys):
    diverged = fabricate_run(tmp_path, "nan", method="PD", flops=1e12, tokens=1e6, final_val_loss=float("nan"))
    fine = fabricate_run(tmp_path, "ok", method="Pre-Train w/o KD", flops=1e12, tokens=1e6, final_val_loss=5.0)
    from predistill.stages.report import ReportConfig
    from predistill.stages.report import run as report

    out = report(ReportConfig(runs=[str(diverged), str(fine)], out=str(tmp_path / "report")))
    assert "non-finite (diverged)" in table_row((out / "report.md").read_text(), "nan")
    assert "not finite" in capsys.readouterr().err


def test_flops_to_reach_interpolates_between_evaluations():
    curve = [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]
    assert flops_to_reach(curve, 3.5) == pytest.approx(3.0)
    assert flops_to_reach(curve, 6.0) == 1.0  # reached at the first evaluation
    assert flops_to_reach(curve, 2.0) is None  # never reached


def seed_sweep(root):
    """Two sizes × 3 seeds of the baseline, of PD (better by ≈ 0.1 every seed) and of MiniPLM (noise)."""
    losses = {"Pre-Train w/o KD": [4.0, 4.1, 4.2], "PD": [3.9, 4.02, 4.08], "MiniPLM": [4.05, 4.05, 4.22]}
    runs = []
    for size, shift in (("tiny", 0.0), ("mini", -0.5)):
        for method, values in losses.items():
            for seed, loss in enumerate(values, start=1):
                name = f"{method.split()[0].lower()}_{size}-seed{seed}"
                runs.append(
                    fabricate_run(
                        root,
                        name,
                        method=method,
                        flops=1e13,
                        tokens=2e5,
                        final_val_loss=loss + shift,
                        model=f"preset:{size}",
                        seed=seed,
                    )
                )
    return runs


def test_seed_groups_pair_runs_by_size_and_seed(tmp_path):
    groups = {
        (g["method"], g["size"]): g
        for g in seed_groups([summarize_run(r) for r in seed_sweep(tmp_path)], "Pre-Train w/o KD")
    }
    assert len(groups) == 6
    base = groups[("Pre-Train w/o KD", "tiny")]
    assert base["n_seeds"] == 3 and base["seeds"] == [1, 2, 3] and base["paired"] is None
    assert base["heldout_loss_mean"] == pytest.approx(4.1) and base["heldout_loss_std"] == pytest.approx(0.1)
    for size in ("tiny", "mini"):  # each size pairs with its own baseline: the mini shift cancels
        pd = groups[("PD", size)]["paired"]
        assert pd["diffs"] == pytest.approx([-0.1, -0.08, -0.12])
        assert pd["diff_mean"] == pytest.approx(-0.1) and pd["diff_se"] == pytest.approx(0.02 / 3**0.5)
        assert pd["significant"]
        # PD's curve reaches each paired baseline's final loss before its end: compute saved
        assert all(0.5 < r < 1 for r in pd["flops_to_reach_baseline_ratio"])
        miniplm = groups[("MiniPLM", size)]["paired"]
        assert miniplm["diff_mean"] == pytest.approx(0.02 / 3) and not miniplm["significant"]
        assert miniplm["flops_to_reach_baseline_ratio"][0] is None  # seed 1 ends above its baseline
        assert miniplm["flops_to_reach_baseline_ratio_mean"] is None


def test_a_seed_sweep_report_has_the_seed_table_and_its_own_file_names(tmp_path):
    runs = seed_sweep(tmp_path / "runs")
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "docs"), stem="study"))
    assert sorted(p.name for p in out.iterdir()) == ["study-plots", "study.html", "study.json", "study.md"]
    md = (out / "study.md").read_text()
    pd_tiny = table_row(md, "PD")
    assert pd_tiny[:3] == ["PD", "tiny", "3"] and pd_tiny[4] == "-0.1000 ± 0.0115" and pd_tiny[5] == "yes, better"
    assert table_row(md, "MiniPLM")[5] == "no"
    assert table_row(md, "MiniPLM")[7].endswith("× (1 of 3 seeds reach it)")
    assert "![Held-out loss vs training FLOPs, mean over seeds](study-plots/loss_vs_flops_seed_mean.png)" in md
    assert (out / "study-plots" / "loss_vs_flops_seed_mean.png").read_bytes().startswith(PNG_MAGIC)
    data = json.loads((out / "study.json").read_text())
    assert {(r["method"], r["size"], r["seed"]) for r in data["runs"]} == {
        (m, s, k) for m in ("Pre-Train w/o KD", "PD", "MiniPLM") for s in ("tiny", "mini") for k in (1, 2, 3)
    }
    assert all(r["heldout_loss"] and r["flops"] for r in data["runs"])
    assert data["fits"] == []  # one budget per (method, size); the seed means replace 18 per-run curve fits
    assert data["plots"] == ["study-plots/loss_vs_flops_seed_mean.png"]


def test_each_heldout_set_gets_its_paired_difference_and_targets_are_named(tmp_path):
    # PD: no better on the pool's mixture, better by 0.1 on the target set in every seed
    runs = []
    for method, pool, manual in (
        ("Pre-Train w/o KD", [4.0, 4.1, 4.2], [5.0, 5.3, 5.1]),
        ("PD", [4.01, 4.09, 4.21], [4.9, 5.2, 5.0]),
    ):
        for seed in (1, 2, 3):
            runs.append(
                fabricate_run(
                    tmp_path / "runs",
                    f"{method[:2]}-{seed}",
                    method=method,
                    flops=1e13,
                    tokens=2e5,
                    final_val_loss=pool[seed - 1],
                    seed=seed,
                    heldout_losses={"pool": pool[seed - 1], "manual": manual[seed - 1]},
                )
            )
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "docs"), stem="web", target_sets=["manual"]))
    data = json.loads((out / "web.json").read_text())
    assert data["target_sets"] == ["manual"]
    assert {r["seed"]: r["heldout_losses"]["manual"] for r in data["runs"] if r["method"] == "PD"} == {
        1: 4.9,
        2: 5.2,
        3: 5.0,
    }
    pd = next(g for g in data["seed_groups"] if g["method"] == "PD")["heldout_sets"]
    assert pd["manual"]["paired"]["diff_mean"] == pytest.approx(-0.1) and pd["manual"]["paired"]["significant"]
    assert (
        pd["pool"]["paired"]["diff_mean"] == pytest.approx(0.0033, abs=1e-4) and not pd["pool"]["paired"]["significant"]
    )
    md = (out / "web.md").read_text()
    assert "manual (target): loss, Δ vs Pre-Train w/o KD" in md
    assert table_row(md, "PD", section="Held-out sets")[3] == "5.0333 (-0.1000 ± 0.0000, better)"
    with pytest.raises(PredistillError, match="--target-set 'web'"):
        run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "d2"), target_sets=["web"]))


def test_single_runs_are_said_to_be_untested_and_a_note_leads_the_page(tmp_path, runs):
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "r"), note="See docs/study.md."))
    md = (out / "report.md").read_text().splitlines()
    assert md[2] == "See docs/study.md."
    assert any("not tested against seed noise" in line for line in md)
    assert "See docs/study.md." in (out / "report.html").read_text()


def test_accuracy_over_compute_and_size_is_drawn_when_methods_span_sizes(tmp_path):
    """MiniPLM's Fig. 1a/1b: a method with an average accuracy at two sizes gets a line in both panels."""

    def evaluated(acc):
        return {"heldout_loss": 3.0, "avg_acc": acc, "tasks": {"evaluated": ["t"]}, "results": {"t": {"acc": acc}}}

    runs = [
        fabricate_run(
            tmp_path / "runs",
            f"{method}-{params}",
            method=method,
            flops=params * 3e7,
            tokens=2e5,
            final_val_loss=3.0,
            params=params,
            eval_json=evaluated(acc),
        )
        for method, params, acc in (
            ("Pre-Train w/o KD", 400_000, 0.30),
            ("Pre-Train w/o KD", 1_600_000, 0.34),
            ("MiniPLM", 400_000, 0.32),
            ("MiniPLM", 1_600_000, 0.37),
        )
    ]
    out = run(ReportConfig(runs=[str(r) for r in runs], out=str(tmp_path / "report")))
    assert (out / "plots" / "accuracy_scaling.png").read_bytes()[:8] == PNG_MAGIC
    assert "](plots/accuracy_scaling.png)" in (out / "report.md").read_text()
    one_size = run(ReportConfig(runs=[str(r) for r in runs[::2]], out=str(tmp_path / "one")))
    assert not (one_size / "plots" / "accuracy_scaling.png").exists()
