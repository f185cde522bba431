"""`predistill report RUN... --out DIR`: the comparison table and plots of a set of training runs.

    DIR/report.md      the table, the fits, the plots (relative links) and each row's command
    DIR/report.html    the same, self-contained (the PNGs are embedded as data URIs)
    DIR/report.json    the same numbers, machine-readable
    DIR/plots/*.png    loss vs tokens, loss vs training FLOPs, loss-vs-compute power-law fits,
                       and the MiniPLM score histograms of the selections the runs trained on

Inputs, per run directory (the `predistill train` contract; every piece is optional, and a missing
one shows as "–"):
- `manifest.json` (format "run"): method, params, steps, tokens, training FLOPs, selection and
  kd_logits paths, final_val_loss;
- `eval.json` (written by `predistill eval --out RUN/eval.json`): held-out loss and task accuracy;
  without it the held-out loss is the manifest's final_val_loss, marked †;
- `metrics.jsonl`: loss / val_loss per logged step, with tokens and FLOPs, for the curves;
- `config.json`: its "command" is the row's command (else one is rebuilt from its settings, one
  `--flag value` per key);
- the selection's manifest (and the score tables it names) and the kd_logits store's manifest:
  offline teacher FLOPs (`flops`) and stored logits bytes/token (`bytes_per_token`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import json
import math
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predistill.core.artifacts import MANIFEST, PredistillError, hold_output, parse_json, write_json_atomic
from predistill.core.config import add_config_arguments, config_from_args, option
from predistill.formats import rundir
from predistill.formats.evalresults import headline_metric
from predistill.training.config import BUDGET_KEYS, configuration_keys

DASH = "–"
# MiniPLM's scaling figures fit the loss-vs-compute curve and read it past the trained range.
DEFAULT_EXTRAPOLATE = 10.0
MIN_FIT_POINTS = 3
BASELINE = "Pre-Train w/o KD"
# a paired difference counts as a real effect when it exceeds this many standard errors
SIGNIFICANT_SE = 2.0
# Artifacts whose FLOPs are not offline teacher inference (a reference model is trained, not run).
NOT_TEACHER_FORMATS = {"run", "token_store", "tokenizer", "converted_model", "local_tasks", "eval"}


@dataclass
class ReportConfig:
    runs: list[str] = option(
        default_factory=list,
        help="run directories written by `predistill train`",
        positional=True,
        required=True,
        metavar="RUN",
    )
    out: str = option("", "directory for report.md, report.html, report.json and plots/", required=True)
    title: str = option("predistill report", "page title")
    note: str = option("", "a paragraph shown under the title (what the runs are, where fuller results are)")
    extrapolate: float = option(
        DEFAULT_EXTRAPOLATE, "extend the power-law fits to this × the largest fitted compute", interval="[1, inf)"
    )
    irreducible: str = option(
        "auto",
        "fit L = a·C^-b + c with an irreducible term c: auto = when a fit has ≥ 4 points",
        choices=("auto", "on", "off"),
    )
    baseline: str = option(BASELINE, "the method every other is compared to, seed by seed, in the seed summary")
    target_sets: list[str] = option(
        default_factory=list,
        help="a held-out set (train --heldout NAME=DIR) that is "
        "not the training pool's mixture: marked as a target in the tables and listed as "
        "such in STEM.json (repeatable)",
        flag="--target-set",
        metavar="NAME",
    )
    stem: str = option(
        "report",
        "file names: OUT/STEM.md, STEM.html, STEM.json (plots in OUT/plots, or OUT/STEM-plots for another stem)",
    )


# ---------------------------------------------------------------------------------------------
# reading runs


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or unreadable (reports never crash)."""
    try:
        value = parse_json(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as a list of objects; malformed lines (a run killed mid-write) are skipped."""
    rows: list[dict] = []
    try:
        lines = path.read_text(errors="replace").splitlines()  # a corrupt byte spoils one line, not the report
    except OSError:
        return rows
    for line in lines:
        try:
            row = parse_json(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _resolve(ref, run_dir: Path) -> Path | None:
    """An artifact path recorded in a manifest: as written (relative to where the run started), or
    relative to the run directory."""
    if not isinstance(ref, str) or not ref:
        return None
    for candidate in (Path(ref), run_dir / ref):
        if candidate.exists():
            return candidate.resolve()
    return None


def _non_finite(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _number(value) -> float | None:
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else None
    )


def _object(value: Any) -> dict:
    """`value` when it is a JSON object, else {} (a field a manifest may lack, or hold malformed)."""
    return value if isinstance(value, dict) else {}


def _referenced_artifacts(manifest: dict, base: Path) -> list[Path]:
    """Directories with a manifest that `manifest` names anywhere in its values (e.g. the score
    tables a selection was made from), whatever the key."""
    found: list[Path] = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and 0 < len(value) < 4096:
            path = _resolve(value, base)
            if path is not None and path.is_dir() and (path / MANIFEST).is_file() and path not in found:
                found.append(path)

    walk(manifest)
    return found


def offline_teacher_flops(
    selection: Path | None, kd_logits: Path | None, store: Path | None = None
) -> tuple[float | None, list[str]]:
    """Offline teacher (and reference) inference behind a run: the training store's `flops` when the
    teacher generated it (SeqKD: `predistill generate`'s prompts and samples); the selection's own `flops` when its
    manifest states the total (a proxy selection: `proxy.flops_spent`, the subset scoring plus the
    proxy's training and inference), else the sum over the score tables its manifest names; plus the kd
    logits store's `flops`, or, for a store written in a scoring pass, that pass's score table (its
    `scored_with`). Each artifact counts once (a store named by both is not added twice).
    Returns (FLOPs, or None when no artifact states any; the artifacts counted)."""
    counted: list[tuple[Path, float]] = []

    def add(path: Path) -> bool:
        manifest = _read_json(path / MANIFEST) or {}
        flops = _number(manifest.get("flops"))
        proxy = manifest.get("proxy")
        if flops is None and isinstance(proxy, dict):  # MiniPLM_prx: teacher/reference on a subset + the proxy
            flops = _number(proxy.get("flops_spent"))
        generated = isinstance(manifest.get("generation"), dict)  # a token store the teacher wrote (SeqKD)
        if (
            flops is None
            or (manifest.get("format") in NOT_TEACHER_FORMATS and not generated)
            or any(p == path for p, _ in counted)
        ):
            return False
        counted.append((path, flops))
        return True

    for path in _store_provenance(store):
        if not add(path) and path.is_dir() and (_read_json(path / MANIFEST) or {}).get("format") == "selection":
            for ref in _referenced_artifacts(_read_json(path / MANIFEST) or {}, path):
                add(ref)

    if selection is not None and not add(selection):
        for path in _referenced_artifacts(_read_json(selection / MANIFEST) or {}, selection):
            add(path)
    if kd_logits is not None and not add(kd_logits):
        # written in the scoring pass: its cost is in the score table it names (`scored_with`)
        scored_with = (_read_json(kd_logits / MANIFEST) or {}).get("scored_with") or {}
        for path in _referenced_artifacts(scored_with, kd_logits):
            add(path)
    if not counted:
        return None, []
    return float(sum(f for _, f in counted)), [str(p) for p, _ in counted]


def _store_provenance(store: Path | None, depth: int = 8) -> list[Path]:
    """The artifacts a training store was made from that may hold teacher FLOPs: the store itself when
    the teacher generated it (SeqKD), and, through re-tokenisation (`prepare --source store:`,
    `derived_from`) and materialisation (`sample --materialize`, `source.selection_dir`), the
    stores and selections it came from — a SeqKD or MiniPLM corpus in another family's tokenizer
    still counts the teacher work behind it."""
    found: list[Path] = []
    while store is not None and depth > 0 and store not in found:
        manifest = _read_json(store / MANIFEST) or {}
        found.append(store)
        source = _object(manifest.get("source"))
        if isinstance(source.get("selection_dir"), str) and Path(source["selection_dir"]).is_dir():
            found.append(Path(source["selection_dir"]))
        derived = _object(manifest.get("derived_from"))
        upstream = derived.get("path") or source.get("store_dir")
        store = Path(upstream) if isinstance(upstream, str) and Path(upstream).is_dir() else None
        depth -= 1
    return found


@dataclass
class RunSummary:
    """One row of the report: everything read from one run directory."""

    dir: str
    name: str
    complete: bool = False
    method: str | None = None
    model: str | None = None
    size: str | None = None  # the model's short name: preset:tiny → tiny, a directory → its name
    seed: int | None = None  # initialisation and data order (train's --seed): runs with one seed are paired
    params: float | None = None  # counts, read as numbers (`_number`)
    params_non_embedding: float | None = None
    steps: float | None = None
    tokens: float | None = None
    flops: float | None = None
    student_flops_per_token: float | None = None  # 6·N of the student alone (C of MiniPLM's C(D) = 6·N·D)
    identity: str = ""  # the run's configuration without its budget and seed: runs that share it share a fit
    variant: str = ""  # the configuration without its seed: runs that share it are one method's seeds
    schedule: str = ""  # what a method's run must share with its baseline's to be compared (model, optimiser, budget)
    heldout_loss: float | None = None
    heldout_source: str | None = None  # "eval" (eval.json) or "train" (manifest final_val_loss)
    heldout_losses: dict[str, float] = field(default_factory=dict)  # train --heldout NAME=DIR: set → loss
    tasks: dict[str, dict] = field(default_factory=dict)  # task → {"acc", "acc_norm", "exact_match"}
    subtasks: dict[str, dict] = field(default_factory=dict)  # group task → {subtask → the same}
    avg_acc: float | None = None
    teacher_flops_offline: float | None = None
    teacher_flops_sources: list[str] = field(default_factory=list)
    logits_bytes_per_token: float | None = None
    # which positions the run trained or distilled on, by level: "token" (train --token-rule), "store"
    # (a position-selected --kd-logits store), "kd" (train --kd-positions) → {"rule", "fraction"};
    # empty: every position
    positions: dict[str, dict] = field(default_factory=dict)
    selection: str | None = None
    kd_logits: str | None = None
    command: str = ""
    metrics: list[dict] = field(default_factory=list)
    # evaluations of the exports written during training (train --export-every, eval --exports), by
    # step, then the final model: {step, tokens, flops, heldout_loss, avg_acc}
    over_training: list[dict] = field(default_factory=list)


# what a method's run shares with the baseline run it is read against (the method's own settings —
# selection, KD source, store — differ by design); the budget is compared for per-run curves only
SCHEDULE_KEYS = (
    "model",
    "batch_size",
    "seq_len",
    "lr",
    "lr_schedule",
    "warmup",
    "warmup_ratio",
    "decay_ratio",
    "min_lr_ratio",
    "val_store",
    "steps",
    "flops_budget",
    "epochs",
)


def run_identity(config: dict, s: RunSummary, keep: tuple[str, ...] = ()) -> str:
    """The configuration as a key (`training.config.configuration_keys`): runs that differ only in budget,
    seed, execution or what they measure share it (but not in the axes named in `keep`)."""
    if not config:
        return json.dumps({"method": s.method or s.name, "model": s.model})
    return json.dumps(
        {k: config.get(k) for k in configuration_keys(keep)} | {"method": s.method}, sort_keys=True, default=str
    )


def evaluations_over_training(run_dir: Path, s: RunSummary) -> list[dict]:
    points = []
    for export in rundir.run_exports(run_dir):
        info, evaluation = _read_json(export / rundir.EXPORT_INFO) or {}, _read_json(export / rundir.EVAL) or {}
        if evaluation:
            points.append(
                {
                    "step": _number(info.get("step")),
                    "tokens": _number(info.get("tokens")),
                    "flops": _number(info.get("flops")),
                    "heldout_loss": _number(evaluation.get("heldout_loss")),
                    "avg_acc": _number(evaluation.get("avg_acc")),
                }
            )
    if points and (s.heldout_source == "eval" or s.avg_acc is not None):
        points.append(
            {
                "step": s.steps,
                "tokens": s.tokens,
                "flops": s.flops,
                "heldout_loss": s.heldout_loss,
                "avg_acc": s.avg_acc,
            }
        )
    return points


def summarize_run(run: str) -> RunSummary:
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise PredistillError(f"{run}: no such run directory")
    s = RunSummary(dir=str(run_dir), name=run_dir.resolve().name)
    manifest = _read_json(run_dir / MANIFEST) or {}
    config = _read_json(run_dir / rundir.CONFIG) or {}
    evaluation = _read_json(run_dir / rundir.EVAL) or {}
    s.complete = manifest.get("format") == rundir.FORMAT and manifest.get("complete") is True
    s.method = manifest.get("method") or config.get("method")
    s.model = manifest.get("model") or config.get("model")
    if isinstance(s.model, str) and s.model:
        s.size = s.model.removeprefix("preset:").rstrip("/").removesuffix("/config.json").rsplit("/", 1)[-1]
    seed = config.get("seed")
    s.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    params = _object(manifest.get("params"))
    s.params = _number(params.get("total"))
    s.params_non_embedding = _number(params.get("non_embedding"))
    s.steps = _number(manifest.get("steps"))
    s.tokens = _number(manifest.get("tokens"))
    s.flops = _number(manifest.get("flops"))
    s.student_flops_per_token = _number(manifest.get("student_flops_per_token"))
    s.identity = run_identity(config, s)
    s.variant = run_identity(config, s, keep=BUDGET_KEYS)
    s.schedule = json.dumps({k: config.get(k) for k in SCHEDULE_KEYS}, sort_keys=True, default=str)
    s.metrics = read_metrics(run_dir / rundir.METRICS)
    if s.tokens is None and s.metrics:  # an unfinished run: its last logged step
        s.tokens = _number(s.metrics[-1].get("tokens"))
        s.flops = s.flops if s.flops is not None else _number(s.metrics[-1].get("flops"))

    if (loss := _number(evaluation.get("heldout_loss"))) is not None:
        s.heldout_loss, s.heldout_source = loss, "eval"
    elif (loss := _number(manifest.get("final_val_loss"))) is not None:
        s.heldout_loss, s.heldout_source = loss, "train"
    elif any(_non_finite(v) for v in (evaluation.get("heldout_loss"), manifest.get("final_val_loss"))):
        s.heldout_source = "non-finite"  # a diverged run: shown as such, never as a missing value
        print(f"predistill report: warning: {run_dir}: held-out loss is not finite (a diverged run)", file=sys.stderr)
    losses = _object(manifest.get("heldout_losses"))
    s.heldout_losses = {str(k): v for k, v in losses.items() if _number(v) is not None}
    results = _object(evaluation.get("results"))
    evaluated = _object(evaluation.get("tasks")).get("evaluated")
    order = [t for t in evaluated if t in results] if isinstance(evaluated, list) else []
    for task in order + sorted(t for t in results if t not in order):  # eval's task order (eval.json sorts keys)
        if isinstance(results[task], dict):
            r = results[task]
            s.tasks[task] = {k: _number(r.get(k)) for k in TASK_METRICS}
            subtasks = _object(r.get("subtasks"))
            s.subtasks[task] = {
                str(t): {k: _number(v.get(k)) for k in TASK_METRICS} for t, v in subtasks.items() if isinstance(v, dict)
            }
    s.avg_acc = _number(evaluation.get("avg_acc"))
    if s.avg_acc is None and s.tasks:
        headlines = [headline_metric(v) for v in s.tasks.values()]
        values = [v for v in headlines if v is not None]
        s.avg_acc = float(np.mean(values)) if values else None

    s.over_training = evaluations_over_training(run_dir, s)
    selection = _resolve(manifest.get("selection") or config.get("selection"), run_dir)
    kd_logits = _resolve(manifest.get("kd_logits") or config.get("kd_logits"), run_dir)
    s.selection = str(selection) if selection else manifest.get("selection")
    s.kd_logits = str(kd_logits) if kd_logits else manifest.get("kd_logits")
    store = _resolve(manifest.get("store") or config.get("store"), run_dir)
    s.teacher_flops_offline, s.teacher_flops_sources = offline_teacher_flops(selection, kd_logits, store)
    if kd_logits is not None:
        s.logits_bytes_per_token = _number((_read_json(kd_logits / MANIFEST) or {}).get("bytes_per_token"))
    for level, key in (("token", "token_selection"), ("store", "kd_logits_positions")):
        chosen = manifest.get(key)
        if isinstance(chosen, dict) and isinstance(chosen.get("rule"), str) and _number(chosen.get("fraction")):
            s.positions[level] = {"rule": chosen["rule"], "fraction": _number(chosen["fraction"])}
    if isinstance(config.get("kd_positions"), str) and _number(config.get("kd_position_fraction")):  # SE-KD
        s.positions["kd"] = {"rule": config["kd_positions"], "fraction": _number(config["kd_position_fraction"])}

    command = config.get("command")
    if isinstance(command, str) and command:
        s.command = command
    elif config:
        s.command = reconstruct_command(config)
    else:
        s.command = f"{DASH} (no readable {run_dir / 'config.json'})"
    return s


def reconstruct_command(config: dict) -> str:
    """`predistill train` with one flag per setting of the run's config.json (every TrainConfig field
    is a flag: underscores become dashes, booleans take true/false, lists repeat the flag)."""
    parts = ["predistill", "train"]
    for key, value in config.items():
        if key == "command" or value is None or isinstance(value, dict):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag, "true" if value else "false"]
        elif isinstance(value, list):
            for item in value:
                parts += [flag, shlex.quote(str(item))]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# the power law


@dataclass
class PowerLaw:
    """L(C) = a·C^(−b) + c, fitted by least squares on log L (c = 0: a line in log-log space)."""

    a: float
    b: float
    c: float
    r2: float
    n_points: int

    @classmethod
    def of(cls, fit: dict) -> PowerLaw:
        """The law a fit entry (`scaling_fits`, report.json's `fits`) records."""
        return cls(fit["a"], fit["b"], fit["c"], fit["r2"], fit["n_points"])

    def __call__(self, compute):
        return self.a * np.power(np.asarray(compute, dtype=np.float64), -self.b) + self.c

    def compute_for(self, loss: float) -> float | None:
        """The compute at which the fit reaches `loss` (None when it never does)."""
        if loss <= self.c or self.b <= 0:
            return None
        return float((self.a / (loss - self.c)) ** (1 / self.b))


def _loglinear(log_c: np.ndarray, log_excess: np.ndarray) -> tuple[float, float, float]:
    """Least squares log_excess = α − b·log_c; returns (α, b, sum of squared residuals)."""
    slope, intercept = np.polyfit(log_c, log_excess, 1)
    residual = log_excess - (intercept + slope * log_c)
    return float(intercept), float(-slope), float(residual @ residual)


def fit_power_law(compute, loss, irreducible: bool = False) -> PowerLaw:
    """Fit L(C) = a·C^(−b) (+ c). With the constant, c is found by a grid then a bounded ternary
    search over [0, min L), each candidate fitted in log space (no scipy needed)."""
    compute = np.asarray(compute, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    keep = (compute > 0) & np.isfinite(compute) & np.isfinite(loss) & (loss > 0)
    compute, loss = compute[keep], loss[keep]
    if len(compute) < 2 or np.ptp(np.log(compute)) == 0:
        raise ValueError("a power-law fit needs ≥ 2 points at different compute")
    log_c = np.log(compute)

    def sse(c: float) -> float:
        alpha, b, _ = _loglinear(log_c, np.log(loss - c))
        pred = np.exp(alpha) * compute**-b + c
        return float(np.sum((np.log(pred) - np.log(loss)) ** 2))

    c = 0.0
    if irreducible and len(compute) >= 3:
        upper = float(loss.min()) * (1 - 1e-9)
        grid = np.linspace(0.0, upper, 400, endpoint=False)
        errors = [sse(g) for g in grid]
        k = int(np.argmin(errors))
        lo, hi = grid[max(k - 1, 0)], (grid[k + 1] if k + 1 < len(grid) else upper)
        for _ in range(100):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            lo, hi = (lo, m2) if sse(m1) < sse(m2) else (m1, hi)
        c = (lo + hi) / 2 if sse((lo + hi) / 2) < errors[k] else float(grid[k])
    alpha, b, _ = _loglinear(log_c, np.log(loss - c))
    law = PowerLaw(float(np.exp(alpha)), b, c, 0.0, len(compute))
    log_pred, log_true = np.log(law(compute)), np.log(loss)
    total = float(np.sum((log_true - log_true.mean()) ** 2))
    law.r2 = 1.0 - float(np.sum((log_true - log_pred) ** 2)) / total if total > 0 else 1.0
    return law


MIN_COMPUTE_SPAN = 2.0  # a fit needs points spread over at least this factor of compute


def _use_irreducible(mode: str, n_points: int) -> bool:
    return mode == "on" or (mode == "auto" and n_points >= 4)


def config_labels(runs: list[RunSummary], key: str = "identity", with_size: bool = True) -> dict[str, str]:
    """A readable name per configuration (`key`: "identity", or "variant" to tell budgets apart):
    "method (size)", plus the settings that tell apart configurations sharing a method and size."""
    configs = {getattr(r, key): r for r in runs}
    labels = {}
    for ident, r in configs.items():
        name = (r.method or r.name) + (f" ({r.size})" if r.size and with_size else "")
        same = [
            json.loads(i) for i, o in configs.items() if (o.method or o.name, o.size) == (r.method or r.name, r.size)
        ]
        if len(same) == 1:
            labels[ident] = name
            continue
        mine = json.loads(ident)
        differing = sorted(k for k in set().union(*same) if any(other.get(k) != mine.get(k) for other in same))
        labels[ident] = name + ": " + ", ".join(f"{k}={mine.get(k, 'unset')}" for k in differing)
    return labels


def scaling_fits(runs: list[RunSummary], mode: str, seeded: bool = False) -> list[dict]:
    """Fits of held-out loss vs training FLOPs: one per exact configuration across its compute budgets
    (and seeds; ≥ 2 budgets), and one along each run's validation curve (≥ 3 points; not for a seed
    sweep, where the seed means stand for them). Methods and sizes are never pooled in one law."""
    labels = config_labels(runs)
    candidates = []
    for identity, label in labels.items():
        members = [r for r in runs if r.identity == identity]
        pts = [(r.flops, r.heldout_loss) for r in members if r.flops and r.heldout_loss]
        candidates.append((f"config: {label}", "config", pts, members))
    for r in runs if not seeded else []:
        candidates.append((f"run: {r.name}", "curve", _val_curve(r), [r]))
    fits = []
    for label, kind, pts, members in candidates:
        distinct = len({c for c, _ in pts})
        if distinct < (2 if kind == "config" else MIN_FIT_POINTS):
            continue
        c, loss = np.array(pts, dtype=np.float64).T
        if c.max() < MIN_COMPUTE_SPAN * c.min():
            continue  # compute-matched runs sit at one budget: a power law through them means nothing
        try:
            law = fit_power_law(c, loss, _use_irreducible(mode, distinct))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
        per_token = {r.student_flops_per_token for r in members}
        seeds = {r.seed for r in members}
        # a configuration's runs differ in their budget: only a curve is compared at its own budget
        schedules = {
            json.dumps(
                {k: v for k, v in json.loads(r.schedule).items() if kind == "curve" or k not in BUDGET_KEYS},
                sort_keys=True,
            )
            for r in members
        }
        fits.append(
            {
                "label": label,
                "kind": kind,
                "points": [list(p) for p in pts],
                **asdict(law),
                "compute_max": float(c.max()),
                "method": members[0].method or members[0].name,
                "size": members[0].size,
                "seed": seeds.pop() if len(seeds) == 1 else None,
                "schedule": schedules.pop() if len(schedules) == 1 else None,
                "student_flops_per_token": per_token.pop() if len(per_token) == 1 else None,
            }
        )
    return fits


# MiniPLM's Table of extrapolated losses: L at the compute of 1T and 10T training tokens, C(D) = 6·N·D
EXTRAPOLATED_TOKENS = {"1T": 1e12, "10T": 1e13}


def extrapolations(fits: list[dict], baseline: str) -> list[dict]:
    """Each fit read at C(1T) and C(10T), and the compute it needs to reach its baseline's loss there
    (÷ C(D): < 1 is compute saved). The baseline is the one fit of `baseline` with the same kind, student
    size, seed and schedule (model, optimiser settings, and for a curve its budget); none, or more than
    one, and the ratio is left out. Fits without a student FLOPs-per-token are skipped."""
    rows = []
    for f in fits:
        if not f["student_flops_per_token"]:
            continue
        law = PowerLaw.of(f)
        candidates = [
            b
            for b in fits
            if b["method"] == baseline
            and b["kind"] == f["kind"]
            and b["size"] == f["size"]
            and b["seed"] == f["seed"]
            and b["schedule"] is not None
            and b["schedule"] == f["schedule"]
            and b["student_flops_per_token"]
        ]
        base = candidates[0] if len(candidates) == 1 else None
        row = {"label": f["label"], "method": f["method"], "size": f["size"], "kind": f["kind"]}
        for name, tokens in EXTRAPOLATED_TOKENS.items():
            compute = f["student_flops_per_token"] * tokens
            ratio = reached = None  # None: no baseline to compare with
            if base is not None and base is not f:
                base_law = PowerLaw.of(base)
                target = float(base_law(base["student_flops_per_token"] * tokens))
                needed = law.compute_for(target)
                reached = needed is not None
                ratio = needed / (base["student_flops_per_token"] * tokens) if reached else None
            row[name] = {
                "compute": compute,
                "loss": float(law(compute)),
                "reaches_baseline": reached,
                "compute_ratio_to_baseline": ratio,
            }
        rows.append(row)
    return rows


def extrapolation_rows(rows: list[dict], baseline: str) -> tuple[list[str], list[list[str]]]:
    header = ["fit"] + [
        h
        for name in EXTRAPOLATED_TOKENS
        for h in (f"C({name}) FLOPs", f"L({name})", f"compute to reach {baseline}'s L({name})")
    ]
    table = []
    for row in rows:
        cells = [row["label"]]
        for name in EXTRAPOLATED_TOKENS:
            x = row[name]
            reach = {None: DASH, False: "never"}.get(x["reaches_baseline"]) or f"{x['compute_ratio_to_baseline']:.2f}×"
            cells += [fmt_sci(x["compute"]), f"{x['loss']:.4f}", reach]
        table.append(cells)
    return header, table


# ---------------------------------------------------------------------------------------------
# seeds: the mean and spread of each (method, size), and its paired difference to the baseline


def _val_curve(r: RunSummary) -> list[tuple[float, float]]:
    curve = [(_number(m.get("flops")), _number(m.get("val_loss"))) for m in r.metrics]
    return [(c, v) for c, v in curve if c is not None and v is not None]


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training FLOPs at which a validation curve first reaches `target`, interpolated linearly
    between its evaluations; None when it never does."""
    previous = None
    for c, v in curve:
        if v <= target:
            if previous is None or previous[1] == v:
                return c
            (c0, v0) = previous
            return c0 + (c - c0) * (v0 - target) / (v0 - v)
        previous = (c, v)
    return None


def _heldout(r: RunSummary) -> float:
    assert r.heldout_loss is not None  # `seed_groups` groups only runs with a held-out loss
    return r.heldout_loss


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def seed_groups(runs: list[RunSummary], baseline: str) -> list[dict]:
    """One entry per (method, size) with held-out losses: their mean ± std over seeds, and against the
    baseline method of the same size, seed by seed, the paired difference (mean ± standard error) and
    the training FLOPs each seed needs to reach the baseline's final held-out loss (MiniPLM's "compute
    saved": ratio < 1 is compute saved). Runs without a seed pair with nothing."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        if r.heldout_loss is not None:
            groups.setdefault(r.variant, []).append(r)
    labels = config_labels([r for members in groups.values() for r in members], key="variant", with_size=False)
    out = []
    for variant, members in groups.items():
        method, size = members[0].method or members[0].name, members[0].size
        losses = [_heldout(r) for r in members]
        mean, std = _mean_std(losses)
        entry: dict[str, Any]  # its values: numbers, lists, the paired and per-set summaries
        entry = {
            "method": method,
            "label": labels[variant],
            "size": size,
            "n_seeds": len(members),
            "seeds": [r.seed for r in members],
            "heldout_loss_mean": mean,
            "heldout_loss_std": std,
            "flops_mean": float(np.mean([r.flops for r in members])) if all(r.flops for r in members) else None,
            "paired": None,
        }
        # the baseline's runs of the same size and schedule (a budget sweep pairs budget with budget)
        bases = [
            v
            for v, rs in groups.items()
            if (rs[0].method or rs[0].name) == baseline and rs[0].size == size and rs[0].schedule == members[0].schedule
        ]
        base = {r.seed: r for r in groups[bases[0]] if r.seed is not None} if len(bases) == 1 else {}
        pairs = [(r, base[r.seed]) for r in members if r.seed in base]
        sets = [name for name in members[0].heldout_losses if all(name in r.heldout_losses for r in members)]
        entry["heldout_sets"] = {
            name: _set_summary(
                [r.heldout_losses[name] for r in members],
                [(r.heldout_losses[name], b.heldout_losses[name]) for r, b in pairs if name in b.heldout_losses]
                if method != baseline
                else [],
            )
            for name in sets
        }
        if method != baseline and pairs:
            reach = []
            for r, b in pairs:
                c = flops_to_reach(_val_curve(r), _heldout(b))
                reach.append(c / b.flops if c is not None and b.flops else None)
            reached = [x for x in reach if x is not None]
            entry["paired"] = {
                **paired_difference([_heldout(r) - _heldout(b) for r, b in pairs]),
                "flops_to_reach_baseline_ratio": reach,
                "flops_to_reach_baseline_ratio_mean": float(np.mean(reached)) if len(reached) == len(reach) else None,
            }
        out.append(entry)
    return out


def paired_difference(diffs: list[float]) -> dict:
    """Seed-paired differences to the baseline: their mean, standard error, and whether the mean is
    beyond SIGNIFICANT_SE standard errors."""
    d_mean, d_std = _mean_std(diffs)
    se = d_std / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {
        "n_pairs": len(diffs),
        "diff_mean": d_mean,
        "diff_se": se,
        "diffs": diffs,
        "significant": se is not None and abs(d_mean) > SIGNIFICANT_SE * se,
    }


def _set_summary(losses: list[float], pairs: list[tuple[float, float]]) -> dict:
    """One held-out set of a seed group: mean ± std over seeds, and the paired difference to the
    baseline's loss on the same set, when there are pairs."""
    mean, std = _mean_std(losses)
    return {"mean": mean, "std": std, "paired": paired_difference([a - b for a, b in pairs]) if pairs else None}


def heldout_set_rows(groups: list[dict], baseline: str, targets: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per held-out set (train --heldout): each seed group's mean loss and paired Δ vs the baseline."""
    names = list(dict.fromkeys(n for g in groups for n in g.get("heldout_sets", {})))
    header = ["method", "size", "seeds"] + [
        f"{n}{' (target)' if n in targets else ''}: loss, Δ vs {baseline}" for n in names
    ]
    rows = []
    for g in groups:
        cells = []
        for name in names:
            summary = g.get("heldout_sets", {}).get(name)
            if summary is None:
                cells.append(DASH)
                continue
            cell = f"{summary['mean']:.4f}"
            if (p := summary["paired"]) is not None:
                cell += f" ({p['diff_mean']:+.4f}" + (f" ± {p['diff_se']:.4f}" if p["diff_se"] is not None else "")
                cell += (", " + ("better" if p["diff_mean"] < 0 else "worse") if p["significant"] else "") + ")"
            cells.append(cell)
        rows.append([g["label"], g["size"] or DASH, str(g["n_seeds"])] + cells)
    return header, rows


def seed_rows(groups: list[dict], baseline: str) -> tuple[list[str], list[list[str]]]:
    header = [
        "method",
        "size",
        "seeds",
        "held-out loss (mean ± std)",
        f"Δ vs {baseline} (paired mean ± s.e.)",
        f"beyond {SIGNIFICANT_SE:g} s.e.?",
        "training FLOPs",
        f"FLOPs to reach {baseline}'s loss",
    ]
    rows = []
    for g in groups:
        p = g["paired"]
        if p is None:
            delta = verdict = reach = DASH
        else:
            delta = f"{p['diff_mean']:+.4f}" + (f" ± {p['diff_se']:.4f}" if p["diff_se"] is not None else "")
            verdict = (
                DASH
                if p["diff_se"] is None
                else ("yes, " + ("better" if p["diff_mean"] < 0 else "worse") if p["significant"] else "no")
            )
            ratios = p["flops_to_reach_baseline_ratio"]
            n_reached = sum(x is not None for x in ratios)
            reached = [x for x in ratios if x is not None]
            reach = (
                f"{p['flops_to_reach_baseline_ratio_mean']:.2f}×"
                if n_reached == len(ratios)
                else "not reached"
                if not reached
                else f"{np.mean(reached):.2f}× ({n_reached} of {len(ratios)} seeds reach it)"
            )
        rows.append(
            [
                g["label"],
                g["size"] or DASH,
                str(g["n_seeds"]),
                f"{g['heldout_loss_mean']:.4f} ± {g['heldout_loss_std']:.4f}",
                delta,
                verdict,
                fmt_sci(g["flops_mean"]),
                reach,
            ]
        )
    return header, rows


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


def plot_seed_curves(runs: list[RunSummary], path: Path) -> bool:
    """Validation loss vs training FLOPs, the mean over each method's seeds (its spread shaded), one
    panel per model size."""
    sizes = list(dict.fromkeys(r.size for r in runs if _val_curve(r)))
    if not sizes:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
    methods = list(dict.fromkeys(r.method or r.name for r in runs))
    for ax, size in zip(axes[0], sizes):
        for k, method in enumerate(methods):
            curves = [_val_curve(r) for r in runs if r.size == size and (r.method or r.name) == method]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)  # seeds of one method evaluate at the same steps
            x = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
            y = np.array([[p[1] for p in c[:n]] for c in curves])
            ax.plot(x, y.mean(axis=0), "o-", color=f"C{k % 10}", ms=3, lw=1.3, label=f"{method} ({len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=f"C{k % 10}", alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"{size}: mean over seeds (shaded: min–max)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def plot_over_training(runs: list[RunSummary], path: Path) -> bool:
    """Downstream accuracy of each run's exports against training tokens (PD's Fig. 5)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for k, r in enumerate(runs):
        points = [
            (p["tokens"], 100 * p["avg_acc"])
            for p in r.over_training
            if p["tokens"] is not None and p["avg_acc"] is not None
        ]
        if points:
            label = (r.method or r.name) + (f" ({r.size})" if r.size else "")
            ax.plot(*zip(*points), "o-", color=f"C{k % 10}", ms=4, lw=1.2, label=label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training tokens")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("downstream accuracy over training (exports every --export-every steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_scaling(runs: list[RunSummary], path: Path) -> bool:
    """MiniPLM's Fig. 1: average accuracy against training FLOPs (a) and against model size (b), a
    line per method through its sizes (seeds averaged). Drawn when some method has an average
    accuracy at two sizes or more."""
    points: dict[str, dict[float, list[tuple[float, float]]]] = {}  # method → size (params) → (flops, acc)
    for r in runs:
        if r.avg_acc is not None and r.flops and r.params:
            points.setdefault(r.method or r.name, {}).setdefault(float(r.params), []).append(
                (float(r.flops), 100 * r.avg_acc)
            )
    if not any(len(sizes) > 1 for sizes in points.values()):
        return False
    plt = _plt()
    fig, (by_flops, by_size) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (method, sizes) in enumerate(points.items()):
        params = sorted(sizes)
        flops = [float(np.mean([f for f, _ in sizes[n]])) for n in params]
        acc = [float(np.mean([a for _, a in sizes[n]])) for n in params]
        style = dict(color=f"C{k % 10}", ms=5, lw=1.3, label=method)
        by_flops.plot(flops, acc, "o-", **style)
        by_size.plot(params, acc, "o-", **style)
    for ax, xlabel, title in (
        (by_flops, "training FLOPs", "(a) accuracy vs training compute"),
        (by_size, "parameters", "(b) accuracy vs model size"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_curves(runs: list[RunSummary], x_key: str, path: Path) -> bool:
    """Training loss (line) and validation loss (markers) of every run against `x_key`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for k, r in enumerate(runs):
        color = f"C{k % 10}"
        # the LM part of the loss: a KD run's total loss mixes in the KD term and is not comparable
        loss_key = "lm_loss" if any(_number(m.get("lm_loss")) is not None for m in r.metrics) else "loss"
        train = [
            (m[x_key], m[loss_key])
            for m in r.metrics
            if _number(m.get(x_key)) is not None and _number(m.get(loss_key)) is not None
        ]
        val = [
            (m[x_key], m["val_loss"])
            for m in r.metrics
            if _number(m.get(x_key)) is not None and _number(m.get("val_loss")) is not None
        ]
        label = r.method or r.name
        if train:
            x, y = zip(*train)
            ax.plot(x, y, color=color, alpha=0.8, lw=1.2, label=f"{label} (train {loss_key.replace('_', ' ')})")
            drawn = True
        if val:
            x, y = zip(*val)
            ax.plot(x, y, "o--", color=color, ms=4, lw=1, label=f"{label} (val)")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel({"tokens": "training tokens", "flops": "training FLOPs"}[x_key])
    if x_key == "flops":
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title(f"loss vs {'tokens' if x_key == 'tokens' else 'training FLOPs'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_scaling(runs: list[RunSummary], fits: list[dict], extrapolate: float, path: Path) -> bool:
    """Held-out loss vs training FLOPs (log-log), each fit drawn to `extrapolate` × its largest compute."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for k, r in enumerate(runs):
        if r.flops and r.heldout_loss:
            ax.plot([r.flops], [r.heldout_loss], "o", color=f"C{k % 10}", ms=7, label=f"{r.method or r.name}")
            drawn = True
    run_color = {f"run: {r.name}": f"C{k % 10}" for k, r in enumerate(runs)}
    labels = config_labels(runs)
    for k, r in reversed(list(enumerate(runs))):  # a configuration takes the colour of its first run
        run_color[f"config: {labels[r.identity]}"] = f"C{k % 10}"
    for fit in fits:
        law = PowerLaw.of(fit)
        lo = min(p[0] for p in fit["points"])
        xs = np.geomspace(lo, fit["compute_max"], 50)
        xe = np.geomspace(fit["compute_max"], fit["compute_max"] * extrapolate, 20)
        style = {"config": "-", "curve": ":"}[fit["kind"]]
        color = run_color.get(fit["label"], "k")
        text = f"{fit['label']}: {fit['a']:.3g}·C^-{fit['b']:.3g}" + (f" + {fit['c']:.3g}" if fit["c"] else "")
        ax.plot(xs, law(xs), style, color=color, lw=1.5, label=text)
        ax.plot(xe, law(xe), style, color=color, lw=1, alpha=0.5)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range overlap
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("held-out loss L")
    ax.set_title(f"loss vs compute, L(C) = a·C^-b (+c); faded: extrapolation to {extrapolate:g}×")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def score_plots(runs: list[RunSummary], plots_dir: Path) -> list[dict]:
    """The selections' own PNGs (copied), or histograms of their float score arrays (*.npy) when
    they ship data but no picture. Each selection once, however many runs used it."""
    out, seen = [], set()
    for r in runs:
        if not r.selection or not Path(r.selection).is_dir() or r.selection in seen:
            continue
        seen.add(r.selection)
        selection = Path(r.selection)
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", selection.name)
        pngs = sorted(selection.rglob("*.png"))
        for png in pngs:
            target = plots_dir / f"selection-{tag}-{png.name}"
            shutil.copyfile(png, target)
            out.append({"selection": str(selection), "file": target.name, "source": str(png)})
        if pngs:
            continue
        arrays = {}
        for npy in sorted(selection.rglob("*.npy")):
            try:
                values = np.load(npy, mmap_mode="r")
            except (OSError, ValueError):
                continue
            if values.ndim == 1 and values.dtype.kind == "f" and len(values):
                arrays[npy.stem] = np.asarray(values, dtype=np.float64)
        if arrays:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(7, 4))
            for name, values in arrays.items():
                finite = values[np.isfinite(values)]
                ax.hist(finite, bins=50, alpha=0.5, label=f"{name} (n={len(finite)})")
            ax.set_xlabel("score (mean token log-prob or difference)")
            ax.set_ylabel("instances")
            ax.set_title(f"scores of selection {selection.name}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            target = plots_dir / f"selection-{tag}-scores.png"
            fig.savefig(target, dpi=110)
            plt.close(fig)
            out.append(
                {"selection": str(selection), "file": target.name, "source": "histogram of " + ", ".join(arrays)}
            )
    return out


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_sci(value: float | None) -> str:
    return DASH if value is None else f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def fmt_count(value: float | None) -> str:
    if value is None:
        return DASH
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def fmt_loss(r: RunSummary) -> str:
    if r.heldout_source == "non-finite":
        return "non-finite (diverged)"
    if r.heldout_loss is None:
        return DASH
    return f"{r.heldout_loss:.4f}" + ("" if r.heldout_source == "eval" else "†")


def fmt_acc(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}"


def task_columns(runs: list[RunSummary]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [t for t in r.tasks if t not in names]
    return names


TASK_METRICS = ("acc", "acc_norm", "exact_match")


def table_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """The comparison table: header and formatted cells. Task cells hold acc_norm when the task
    has it, else acc (the papers' convention), in %."""
    tasks = task_columns(runs)
    header = [
        "run",
        "method",
        "params (non-emb.)",
        "training FLOPs",
        "tokens",
        "held-out loss",
        *tasks,
        "avg acc",
        "teacher FLOPs offline",
        "logits B/token",
    ]
    rows = []
    for r in runs:
        headline = [fmt_acc(None if t not in r.tasks else headline_metric(r.tasks[t])) for t in tasks]
        params = DASH if r.params is None else f"{fmt_count(r.params)} ({fmt_count(r.params_non_embedding)})"
        rows.append(
            [
                r.name,
                r.method or DASH,
                params,
                fmt_sci(r.flops),
                fmt_count(r.tokens),
                fmt_loss(r),
                *headline,
                fmt_acc(r.avg_acc),
                fmt_sci(r.teacher_flops_offline),
                DASH if r.logits_bytes_per_token is None else f"{r.logits_bytes_per_token:.1f}",
            ]
        )
    return header, rows


def detail_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Every metric of every task for every run, a group's subtasks under it (`group / subtask`)."""
    header = ["run", "task", *TASK_METRICS]
    rows = []
    for r in runs:
        for t, v in r.tasks.items():
            rows.append([r.name, t, *(fmt_acc(v[k]) for k in TASK_METRICS)])
            rows += [
                [r.name, f"{t} / {sub}", *(fmt_acc(w[k]) for k in TASK_METRICS)]
                for sub, w in r.subtasks.get(t, {}).items()
            ]
    return header, rows


def fit_rows(fits: list[dict], extrapolate: float) -> tuple[list[str], list[list[str]]]:
    header = ["fit", "points", "a", "b", "c (irreducible)", "R² (log)", f"L at {extrapolate:g}× compute"]
    rows = []
    for f in fits:
        law = PowerLaw.of(f)
        rows.append(
            [
                f["label"],
                str(f["n_points"]),
                f"{f['a']:.4g}",
                f"{f['b']:.4g}",
                f"{f['c']:.4g}",
                f"{f['r2']:.4f}",
                f"{float(law(f['compute_max'] * extrapolate)):.4f}",
            ]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


EXTRAPOLATION_TITLE = (
    "Extrapolated as MiniPLM does: L at the compute of 1T and 10T tokens, C(D) = 6·N·D (N: the "
    "student), and the compute a fit needs to reach its baseline's L there (< 1: saved). Far past "
    "the fitted range: a reading of the trend, not a measurement"
)
SEED_NOTE = (
    "Seeds: a run's seed fixes its initial weights and data order; runs of one size with the same seed "
    "are paired, and Δ is the mean over seeds of (method − {baseline}) held-out loss, ± its standard "
    "error (std/√n). A difference within {k} standard errors is not evidence of an effect. FLOPs to reach: "
    "the training FLOPs at which a run's validation curve first reaches its paired {baseline} run's final "
    "loss, divided by that {baseline} run's FLOPs (< 1: compute saved; mean over seeds)."
)
FOOTNOTES = (
    "Held-out loss: mean over held-out instances of the per-instance mean token NLL (MiniPLM), "
    "from `RUN/eval.json`; † = the run's own final validation loss (no eval.json). Task columns: "
    "acc_norm where the task has it, else acc, else exact match, in %; avg acc = their plain mean. Training FLOPs: "
    "6·N·D (+ 2·N_teacher·D for an online teacher). Teacher FLOPs offline: teacher/reference inference "
    "recorded by the selection, its score tables and the logits store. – = not available."
)


# ---------------------------------------------------------------------------------------------


def run(cfg: ReportConfig) -> Path:
    with contextlib.ExitStack() as held:  # the output's lock, released however the report ends
        return _run(cfg, held)


def _run(cfg: ReportConfig, held: contextlib.ExitStack) -> Path:
    if not cfg.runs:
        raise PredistillError("report needs at least one run directory")
    if cfg.extrapolate < 1:
        raise PredistillError(f"--extrapolate must be ≥ 1, got {cfg.extrapolate}")
    if cfg.irreducible not in ("auto", "on", "off"):
        raise PredistillError(f"--irreducible must be auto, on or off, got {cfg.irreducible!r}")
    if not re.fullmatch(r"[\w.-]+", cfg.stem) or cfg.stem.startswith("."):
        raise PredistillError(f"--stem must be a file name stem (letters, digits, '_', '-', '.'), got {cfg.stem!r}")
    runs = [summarize_run(r) for r in cfg.runs]
    if unknown := [t for t in cfg.target_sets if not any(t in r.heldout_losses for r in runs)]:
        raise PredistillError(
            f"--target-set {unknown[0]!r}: no run has a held-out loss on a set of that name "
            f"(train --heldout {unknown[0]}=DIR)"
        )
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise PredistillError(f"--out {out} exists and is not a directory")
    plots_name = "plots" if cfg.stem == "report" else f"{cfg.stem}-plots"
    plots_dir = out / plots_name
    hold_output(out, held)  # one report writes OUT at a time: its files are judged and replaced under the lock
    _refuse_foreign_outputs(out, cfg.stem, plots_dir)
    if plots_dir.exists():
        shutil.rmtree(plots_dir)  # a rerun must not show plots of runs that are no longer in it
    plots_dir.mkdir(parents=True)

    groups = seed_groups(runs, cfg.baseline)
    seeded = any(g["n_seeds"] > 1 for g in groups)
    fits = scaling_fits(runs, cfg.irreducible, seeded)
    plots: list[tuple[str, str]] = []  # (title, file in plots/)
    if seeded:  # a curve per run would be dozens of lines: the seed means, with their spread, replace them
        if plot_seed_curves(runs, plots_dir / "loss_vs_flops_seed_mean.png"):
            plots.append(("Held-out loss vs training FLOPs, mean over seeds", "loss_vs_flops_seed_mean.png"))
    else:
        if plot_curves(runs, "tokens", plots_dir / "loss_vs_tokens.png"):
            plots.append(("Loss vs training tokens", "loss_vs_tokens.png"))
        if plot_curves(runs, "flops", plots_dir / "loss_vs_flops.png"):
            plots.append(("Loss vs training FLOPs", "loss_vs_flops.png"))
    if (fits or not seeded) and plot_scaling(runs, fits, cfg.extrapolate, plots_dir / "scaling.png"):
        plots.append(("Held-out loss vs compute: power-law fits and extrapolation", "scaling.png"))
    if plot_accuracy_scaling(runs, plots_dir / "accuracy_scaling.png"):
        plots.append(
            ("Average accuracy vs training FLOPs and vs model size (MiniPLM's Fig. 1)", "accuracy_scaling.png")
        )
    if plot_over_training(runs, plots_dir / "accuracy_over_training.png"):
        plots.append(("Downstream accuracy over training", "accuracy_over_training.png"))
    for s in score_plots(runs, plots_dir):
        plots.append((f"MiniPLM scores: {Path(s['selection']).name} ({s['source']})", s["file"]))

    sections = []
    if seeded:
        sections.append(
            (f"Seeds: mean ± std, and the paired difference to {cfg.baseline}", *seed_rows(groups, cfg.baseline))
        )
    if any(g.get("heldout_sets") for g in groups):
        sections.append(
            (
                f"Held-out sets: mean loss over seeds (paired Δ vs {cfg.baseline} ± s.e.; "
                f"'better'/'worse' beyond {SIGNIFICANT_SE:g} s.e.)",
                *heldout_set_rows(groups, cfg.baseline, cfg.target_sets),
            )
        )
    sections.append(("Comparison", *table_rows(runs)))
    if any(r.tasks for r in runs):
        sections.append(
            (
                "Task accuracy (acc / acc_norm / exact match, %; a group: its aggregate, then each subtask)",
                *detail_rows(runs),
            )
        )
    if any(r.over_training for r in runs):
        sections.append(
            (
                "Over training: the exports' evaluations (train --export-every, eval --exports)",
                ["run", "step", "tokens", "training FLOPs", "held-out loss", "avg acc"],
                [
                    [
                        r.name,
                        fmt_count(p["step"]),
                        fmt_count(p["tokens"]),
                        fmt_sci(p["flops"]),
                        DASH if p["heldout_loss"] is None else f"{p['heldout_loss']:.4f}",
                        fmt_acc(p["avg_acc"]),
                    ]
                    for r in runs
                    for p in r.over_training
                ],
            )
        )
    extrapolated = extrapolations(fits, cfg.baseline)
    if fits:
        sections.append(("Power-law fits L(C) = a·C^(−b) + c (C = training FLOPs)", *fit_rows(fits, cfg.extrapolate)))
    if extrapolated:
        sections.append((EXTRAPOLATION_TITLE, *extrapolation_rows(extrapolated, cfg.baseline)))
    incomplete = [r.name for r in runs if not r.complete]

    seed_note = (
        SEED_NOTE.format(baseline=cfg.baseline, k=f"{SIGNIFICANT_SE:g}")
        if seeded
        else "One run per method and size (one seed): differences between them are not tested against "
        "seed noise, and are not evidence of an effect."
    )
    md = (
        [f"# {cfg.title}", ""]
        + ([cfg.note, ""] if cfg.note else [])
        + [f"{len(runs)} run(s). {FOOTNOTES}", "", seed_note, ""]
    )
    if incomplete:
        md += [f"Incomplete or unreadable run manifests (partial rows): {', '.join(incomplete)}.", ""]
    for title, header, rows in sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    if not fits:
        md += [
            "No power-law fit: it needs held-out losses at ≥ 2 compute budgets of one method, "
            f"or a validation curve of ≥ {MIN_FIT_POINTS} points.",
            "",
        ]
    md += ["## Plots", ""]
    md += [f"### {title}\n\n![{title}]({plots_name}/{file})\n" for title, file in plots] or ["No plottable data.", ""]
    md += ["## Commands", ""]
    for r in runs:
        md += [f"**{r.name}** ({r.method or DASH})", "", "```sh", r.command, "```", ""]
    (out / f"{cfg.stem}.md").write_text("\n".join(md))

    body = [f"<h1>{html.escape(cfg.title)}</h1>"] + ([f"<p>{html.escape(cfg.note)}</p>"] if cfg.note else [])
    body += [f"<p>{len(runs)} run(s). {html.escape(FOOTNOTES)}</p>", f"<p>{html.escape(seed_note)}</p>"]
    if incomplete:
        body.append(
            f"<p>Incomplete or unreadable run manifests (partial rows): {html.escape(', '.join(incomplete))}.</p>"
        )
    for title, header, rows in sections:
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    body.append("<h2>Plots</h2>")
    for title, file in plots:
        data = base64.b64encode((plots_dir / file).read_bytes()).decode()
        body.append(
            f"<h3>{html.escape(title)}</h3><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{data}\">"
        )
    body.append("<h2>Commands</h2>")
    for r in runs:
        body.append(
            f"<p><b>{html.escape(r.name)}</b> ({html.escape(r.method or DASH)})</p><pre>{html.escape(r.command)}</pre>"
        )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
    )
    (out / f"{cfg.stem}.html").write_text(
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(cfg.title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )

    summary = [asdict(r) | {"metrics": None} for r in runs]  # the curves stay in each run's metrics.jsonl
    write_json_atomic(
        out / f"{cfg.stem}.json",
        {
            "format": "report",
            "version": 1,
            "runs": summary,
            "seed_groups": groups,
            "fits": fits,
            "extrapolations": extrapolated,
            "plots": [f"{plots_name}/{file}" for _, file in plots],
            "target_sets": cfg.target_sets,
            "config": asdict(cfg),
        },
    )
    return out


def _refuse_foreign_outputs(out: Path, stem: str, plots_dir: Path) -> None:
    """A rerun replaces its own STEM.md/.html/.json and plots (STEM.json, format "report", says a
    report wrote them); a file or folder of the same name that no report wrote (the user's own
    plots/, a STEM.md of their own) is refused, never overwritten."""
    previous = _read_json(out / f"{stem}.json")
    ours = previous is not None and previous.get("format") == "report"
    for path in (out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.html"):
        if (path.exists() or path.is_symlink()) and (not ours or path.is_symlink() or not path.is_file()):
            raise PredistillError(
                f"{path} exists and no report wrote it; refusing to overwrite it (choose another --out or --stem)"
            )
    if plots_dir.is_symlink() or (
        plots_dir.exists() and (not plots_dir.is_dir() or any(plots_dir.iterdir())) and not ours
    ):
        raise PredistillError(
            f"{plots_dir} exists and no report made it; refusing to replace it (choose another --out or --stem)"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ReportConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(ReportConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    print(f"predistill: wrote {out / (cfg.stem + '.md')} and {out / (cfg.stem + '.html')}")
