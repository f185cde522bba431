"""`predistill eval`: held-out LM loss and lm-eval zero-shot accuracy of one model.

    predistill eval --model RUN_OR_MODEL --store VAL --out RUN/eval.json [--tasks [LIST]]

Held-out loss follows MiniPLM: the mean over instances of each instance's mean next-token NLL
(the first token has no prediction), in fp32. It is the forward pass `score` runs
(`predistill.training.forward`): log-probs from the body's final hidden states through the chunked head,
so the [tokens × vocab] logits are never materialised (models whose head is not a plain
projection are run whole). A model
whose tokenizer is not the store's (a cross-family student) gets every instance decoded and
re-tokenised with its own tokenizer, document by document (EOS → its EOS); the output says so.

`--tasks` runs lm-eval 0.4.13 (`simple_evaluate`, model "hf" on the saved HF directory, on
`--device` in `--dtype`, `--num-fewshot` examples per prompt) fully offline: the paper's nine tasks are run when their data is in the local HF cache and
listed as skipped (with the reason) when not, and the local tasks of `predistill.formats.tasks` are built
from the held-out store's text. See docs/eval.md for the output format.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from predistill.core.artifacts import MANIFEST, PredistillError, parse_json, reason_of, write_json_atomic
from predistill.core.config import Effect, add_config_arguments, config_from_args, flat_identity, option, to_flat
from predistill.core.sharding import Dist, Shard, Work, init_distributed, plan_shards, run_sharded
from predistill.formats import rundir
from predistill.formats.evalresults import average_accuracy
from predistill.formats.store import TokenStore
from predistill.formats.tasks import LOCAL_TASKS, LocalTaskConfig, item_counts
from predistill.formats.tasks import build as build_local_tasks
from predistill.modeling.models import (
    DTYPES,
    count_params,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model,
    tokenizer_hash,
)
from predistill.training.forward import ModelInputs, ScoreCollector, run_forward_pass

FORMAT = "eval"
VERSION = 1
LM_EVAL_VERSION = "0.4.13"
LM_EVAL_INSTALL = f'pip install "lm-eval=={LM_EVAL_VERSION}"  (or: pip install -e ".[eval]")'
# The MiniPLM paper's zero-shot suite, and the lm-eval task folder that defines each (registering
# only these folders takes 0.1 s instead of the 30 s it takes to index all of lm-eval's tasks).
PAPER_TASKS = {
    "hellaswag": "hellaswag",
    "lambada_openai": "lambada",
    "winogrande": "winogrande",
    "openbookqa": "openbookqa",
    "arc_easy": "arc",
    "arc_challenge": "arc",
    "piqa": "piqa",
    "social_iqa": "siqa",
    "storycloze_2018": "storycloze",
}
TASK_ALIASES = {"default": [*PAPER_TASKS, *LOCAL_TASKS], "paper": list(PAPER_TASKS), "local": list(LOCAL_TASKS)}


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class EvalConfig:
    model: str = option(
        "",
        "a `predistill train` run directory (its hf/ export is used), an HF model directory, smollm2-135m, or a hub id",
        required=True,
    )
    store: str = option("", "held-out token store (a training store with a val/ split means that split)", required=True)
    out: str = option("", "JSON file to write (recipes use RUN/eval.json)", required=True, effect=Effect.NONE)
    tasks: list[str] | None = option(
        None,
        "run lm-eval on these comma-separated tasks; alone: `default` = the MiniPLM "
        "paper's nine (skipped with a note when their data is not in the local HF cache) "
        f"+ the local tasks. Aliases: paper, local ({', '.join(LOCAL_TASKS)}); any lm-eval "
        "task name",
        nargs="?",
        const=["default"],
        type=_task_list,
        action=None,
        metavar="LIST",
    )
    tasks_dir: str | None = option(
        None, "where the local tasks are built (and reused); default: the --out file's folder/tasks", effect=Effect.NONE
    )
    batch_size: int = option(8, "sequences per forward pass", interval="[1, inf)", effect=Effect.ROUNDING)
    limit: int | None = option(
        None, "evaluate at most N held-out instances and N items per task (default: all)", interval="[1, inf)"
    )
    local_items: int = option(200, "items per local task", interval="[1, inf)")
    seed: int = option(1234, "seed of the local tasks' passage order and distractors", interval="[0, 4294967295]")
    allow_download: bool = option(
        False, "let lm-eval fetch task data from the HF hub (default: fully offline)", effect=Effect.NONE
    )
    num_fewshot: int = option(
        0, "lm-eval: examples in each prompt (0: zero-shot, as MiniPLM reports)", interval="[0, inf)"
    )
    fewshot: list[str] = option(
        default_factory=list,
        help="TASK=N: N examples per prompt for this task (a group: all "
        "its subtasks), overriding --num-fewshot (repeatable: PD's protocol sets them per task). "
        "A task whose lm-eval config fixes 0 shots keeps 0; each result records the shots used",
        flag="--fewshot",
        metavar="TASK=N",
    )
    task_path: list[str] = option(
        default_factory=list,
        help="a folder of lm-eval task/group YAML files to register "
        "(lm-eval's include_path; repeatable): your own tasks, or groups over local and "
        "lm-eval tasks",
        flag="--task-path",
        metavar="DIR",
    )
    exports: bool = option(
        False,
        "a run directory: also evaluate every export it wrote during training (train "
        "--export-every) into RUN/exports/step-N/eval.json — accuracy over training; an export "
        "already evaluated with these settings is kept",
        effect=Effect.NONE,
    )
    device: str = option(
        "auto", "auto (this rank's GPU if any), cpu, cuda, cuda:N; held-out loss and lm-eval", effect=Effect.ROUNDING
    )
    # compared as the resolved dtype (what `auto` became on this device), recorded beside the config
    dtype: str = option(
        "auto",
        "weights/activations; auto = float32 on CPU, bfloat16 on GPU (log-probs are fp32)",
        choices=DTYPES,
        effect=Effect.ROUNDING,
    )


# ---------------------------------------------------------------------------------------------
# model and store resolution


def open_store(path: str) -> tuple[TokenStore, str | None]:
    """The held-out store; given a training store that has a `val/` split, that split (with a note)."""
    if not Path(path).exists():
        raise PredistillError(f"{path}: no such token store")
    store = TokenStore(path)
    if store.manifest.get("split") == "train" and (Path(path) / "val" / MANIFEST).is_file():
        return TokenStore(Path(path) / "val"), f"{path} is a training store; using its held-out split {path}/val"
    return store, None


@contextlib.contextmanager
def hub_offline(enabled: bool = True):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for this process, restored afterwards. The libraries
    read the variables once at import, so their module-level copies are switched too."""
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    targets = [
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
        ("transformers.utils.hub", "_is_offline_mode"),
    ]
    saved = []
    for module_name, name in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # datasets comes with lm-eval only
            continue
        if hasattr(module, name):
            saved.append((module, name, getattr(module, name)))
    os.environ.update({k: "1" for k in saved_env})
    for mod, name, _ in saved:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# held-out loss


def heldout_sequences(
    store: TokenStore, tokenizer, limit: int | None = None, max_len: int | None = None
) -> tuple[list[np.ndarray], bool, int]:
    """The store's instances as token id arrays for `tokenizer`: the stored ids when the tokenizers
    are the same, else re-tokenised per document with EOS mapped to `tokenizer`'s EOS. Returns
    (sequences, retokenized, n_truncated at `max_len`)."""
    n = len(store) if limit is None else min(limit, len(store))
    inputs = ModelInputs(store, tokenizer)  # whole rows, to count the truncated ones
    sequences = [inputs.row(i) for i in range(n)]
    truncated = sum(max_len is not None and len(s) > max_len for s in sequences)
    return [s[:max_len] for s in sequences], inputs.retokenized, truncated


SHARD_SIZE = 16  # held-out instances per shard: the unit of work per rank, the same for any world size


def instance_nll(
    model,
    store: TokenStore,
    tokenizer,
    sequences: list[np.ndarray],
    batch_size: int = 8,
    progress: bool = True,
    ranks: Dist | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance (mean next-token NLL, number of predicted tokens) of `sequences` (rows of the
    store's first instances) through the shared forward pass. Under torchrun rank r runs shards
    r, r+W, … and every rank gets all results; batches form within a shard, so the numbers are the
    same for any number of ranks."""
    ranks = ranks or Dist()
    model.eval()
    inputs = ModelInputs(store, tokenizer, rows=sequences)
    collector = ScoreCollector()

    def forward(shards: Sequence[Shard]) -> None:
        run_forward_pass(
            model,
            inputs,
            shards,
            [collector],
            batch_size=batch_size,
            progress=progress and ranks.main,
            desc="held-out loss",
        )

    # kept in memory (no markers: a rerun recomputes it), the rank's results gathered below
    heldout = Work(plan_shards(len(sequences), SHARD_SIZE), lambda shard: False, forward, lambda others: True)
    run_sharded(heldout, ranks, "eval", "the held-out loss")
    ids = np.arange(len(sequences))
    logprob, n_tokens = {}, {}
    for part_logprob, part_tokens in ranks.gather((collector.logprob, collector.n_tokens)):
        logprob.update(part_logprob)
        n_tokens.update(part_tokens)
    mean_logprob = np.array([logprob[int(i)] for i in ids], dtype=np.float64)
    counts = np.array([n_tokens[int(i)] for i in ids], dtype=np.int64)
    return -mean_logprob, counts


def heldout_metrics(
    model,
    tokenizer,
    store: TokenStore,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    ranks: Dist | None = None,
) -> dict:
    """`heldout_loss` (MiniPLM: mean of per-instance mean NLL) and its companions."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    sequences, retokenized, truncated = heldout_sequences(store, tokenizer, limit, max_len)
    per_instance_all, counts = instance_nll(model, store, tokenizer, sequences, batch_size, progress, ranks)
    scored = counts > 0
    if not scored.any():
        raise PredistillError(f"{store.dir}: no held-out instance has 2 or more tokens; nothing to evaluate")
    per_instance = per_instance_all[scored]
    if not np.isfinite(per_instance).all():
        raise PredistillError(
            f"held-out loss is not finite on {int((~np.isfinite(per_instance)).sum())} of "
            f"{len(per_instance)} instances: the model's weights are broken (a diverged run?)"
        )
    domains = store.domain_ids[: len(sequences)][scored]
    by_domain = {
        name: float(per_instance[domains == d].mean())
        for d, name in enumerate(store.domain_names)
        if (domains == d).any()
    }
    return {
        "heldout_loss": float(per_instance.mean()),
        "heldout_token_loss": float((per_instance * counts[scored]).sum() / counts[scored].sum()),
        "heldout_loss_by_domain": by_domain,
        "n_instances": int(scored.sum()),
        "n_tokens": int(counts.sum()),
        "n_skipped_instances": int((~scored).sum()),
        "retokenized": retokenized,
        "n_truncated": truncated,
    }


# ---------------------------------------------------------------------------------------------
# lm-eval


def expand_tasks(names: list[str]) -> list[str]:
    """Aliases (`default`, `paper`, `local`) expanded, duplicates dropped, order kept."""
    out: list[str] = []
    for name in names:
        for task in TASK_ALIASES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise PredistillError(f"--tasks needs lm-eval {LM_EVAL_VERSION}: {LM_EVAL_INSTALL}") from None
    if lm_eval.__version__ != LM_EVAL_VERSION:
        print(
            f"predistill: warning: lm-eval {lm_eval.__version__} installed; results were validated with {LM_EVAL_VERSION}"
        )
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # keep its per-request INFO lines off the console
    return lm_eval


def task_manager(tasks: list[str], local_dir: Path | None, task_paths: Sequence[str] = ()):
    """A TaskManager that knows `tasks`: only the needed folders (the paper's, the local tasks',
    `task_paths`) when they define every task and load, else lm-eval's whole index too (30 s).
    Unknown names raise a PredistillError."""
    _lm_eval()
    import lm_eval.tasks

    for folder in task_paths:
        if not Path(folder).is_dir():
            raise PredistillError(f"--task-path {folder}: not a directory of lm-eval task YAML files")
    package_tasks = Path(lm_eval.tasks.__file__).parent
    paths = (
        ([str(local_dir)] if local_dir else [])
        + [str(Path(p).resolve()) for p in task_paths]
        + sorted({str(package_tasks / PAPER_TASKS[t]) for t in tasks if t in PAPER_TASKS})
    )
    manager = lm_eval.tasks.TaskManager(include_path=paths or None, include_defaults=False)
    own = [t for t in tasks if t not in PAPER_TASKS and t not in LOCAL_TASKS]
    if any(t not in manager.all_tasks for t in own) or not _loads(manager, own):
        # a task of lm-eval's own, or a group of yours over one of them
        manager = lm_eval.tasks.TaskManager(include_path=paths or None, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks and t not in LOCAL_TASKS]
    if unknown:
        raise PredistillError(
            f"unknown task(s): {', '.join(unknown)} (not in lm-eval {LM_EVAL_VERSION}"
            f"{' or --task-path' if task_paths else ''}; aliases: {', '.join(TASK_ALIASES)}; "
            f"local: {', '.join(LOCAL_TASKS)})"
        )
    return manager


def _names_local_task(task_paths: Sequence[str]) -> bool:
    """Does a YAML file under --task-path name a local task (a group over them needs them built)?"""
    pattern = re.compile(rf"\b({'|'.join(LOCAL_TASKS)})\b")
    return any(
        pattern.search(f.read_text(errors="replace"))
        for folder in task_paths
        if Path(folder).is_dir()
        for f in sorted(Path(folder).rglob("*.yaml"))
    )


def _loads(manager, tasks: list[str]) -> bool:
    try:
        manager.load(tasks)
    except Exception:  # noqa: BLE001 — a name this manager cannot resolve; the caller widens it
        return False
    return True


def reachable_tasks(manager, tasks: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split `tasks` into those whose data loads now and {task: why not} for the others."""
    ok, skipped = [], {}
    for task in tasks:
        if task not in manager.all_tasks:
            skipped[task] = "the held-out store yields no items for it"
            continue
        try:
            manager.load([task])
            ok.append(task)
        except Exception as e:  # noqa: BLE001 — lm-eval/datasets raise many types; the reason is what matters
            skipped[task] = f"data not reachable offline ({type(e).__name__}: {reason_of(e, 200)})"
    return ok, skipped


def fewshot_table(specs: list[str], tasks: list[str]) -> dict[str, int]:
    """--fewshot TASK=N → {task: N}, each task one of `tasks` (after alias expansion)."""
    table: dict[str, int] = {}
    for spec in specs:
        task, sep, shots = spec.partition("=")
        if not sep or not task or not shots.strip().isdigit():
            raise PredistillError(f"--fewshot {spec!r}: write TASK=N with N ≥ 0")
        if task not in tasks:
            raise PredistillError(f"--fewshot {spec!r}: {task} is not among the evaluated --tasks")
        if task in table:
            raise PredistillError(f"--fewshot names the task {task!r} twice")
        table[task] = int(shots)
    return table


# the metric a paper reports for a task, in this order: MiniPLM's and PD's multiple-choice tasks
# (acc_norm where lm-eval has it), then generation tasks (GSM8K: exact match of the answer line)
def _metrics(task_results: dict) -> dict[str, float]:
    """Every metric lm-eval reported: `name` for the unfiltered one, `name,filter` for the others
    (GSM8K: exact_match,strict-match and exact_match,flexible-extract)."""
    out = {}
    for key, value in task_results.items():
        name, sep, filt = key.partition(",")
        if not sep or name.endswith("_stderr") or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        out[name if filt == "none" else key] = float(value)
    return out


def _row(metrics: dict[str, float], n: int, shots: int | None) -> dict:
    """One task's result: acc, acc_norm, perplexity, exact_match (the strict filter where there
    are several), the binomial standard errors, all metrics, the items and the shots."""
    exact = metrics.get(
        "exact_match",
        metrics.get(
            "exact_match,strict-match", next((v for k, v in metrics.items() if k.startswith("exact_match,")), None)
        ),
    )
    row: dict[str, Any] = {
        "acc": metrics.get("acc"),
        "acc_norm": metrics.get("acc_norm"),
        "perplexity": metrics.get("perplexity"),
        "exact_match": exact,
        "n": n,
        "num_fewshot": shots,
        "metrics": metrics,
    }
    for key in ("acc", "acc_norm", "exact_match"):  # binomial standard error of a mean of 0/1 outcomes
        p = row[key]
        row[f"{key}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if p is not None and n > 1 else None
    return row


def _leaves(results: dict, task: str) -> list[str]:
    """The tasks under `task` (itself when it is not a group), nested groups expanded."""
    children = results.get("group_subtasks", {}).get(task)
    if not children:
        return [task]
    return [leaf for child in children for leaf in _leaves(results, child)]


def task_rows(results: dict, tasks: list[str]) -> dict[str, dict]:
    """lm-eval's results per requested task. A group gets its aggregate — lm-eval's own when its
    YAML declares `aggregate_metric_list`, else the item-weighted mean of its subtasks' metrics
    (perplexity excepted) — and a row per subtask under `subtasks`."""
    counts = {t: int(c["effective"]) for t, c in results["n-samples"].items()}
    shots = results.get("n-shot", {})
    leaf_rows = {t: _row(_metrics(results["results"][t]), counts[t], shots.get(t)) for t in counts}
    out = {}
    for task in tasks:
        if task in leaf_rows:
            out[task] = leaf_rows[task]
            continue
        leaves = _leaves(results, task)
        n = sum(counts[t] for t in leaves)
        metrics = _metrics(results["results"].get(task, {}))
        aggregate = "lm-eval" if metrics else "item-weighted mean of the subtasks"
        if not metrics:
            names = {k for t in leaves for k in leaf_rows[t]["metrics"] if not k.startswith("perplexity")}
            for name in sorted(names):
                have = [t for t in leaves if name in leaf_rows[t]["metrics"]]
                weight = sum(counts[t] for t in have)
                if weight:
                    metrics[name] = sum(leaf_rows[t]["metrics"][name] * counts[t] for t in have) / weight
        group_shots = {shots.get(t) for t in leaves}
        out[task] = {
            **_row(metrics, n, group_shots.pop() if len(group_shots) == 1 else None),
            "aggregate": aggregate,
            "subtasks": {t: leaf_rows[t] for t in leaves},
        }
    return out


def run_lm_eval(
    hf: str,
    tasks: list[str],
    manager,
    batch_size: int,
    limit: int | None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    num_fewshot: int = 0,
    fewshot: dict[str, int] | None = None,
) -> dict[str, dict]:
    """lm-eval's results per task (see `task_rows`), one `simple_evaluate` per distinct shot count."""
    import lm_eval

    by_shots: dict[int, list[str]] = {}
    for task in tasks:
        by_shots.setdefault((fewshot or {}).get(task, num_fewshot), []).append(task)
    out = {}
    for shots, group in by_shots.items():
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": hf, "dtype": dtype},
            tasks=group,
            device=device,
            batch_size=batch_size,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            num_fewshot=shots,
            # 0: no bootstrap (it forks a process pool); acc's standard error is closed-form, in _row
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
        out.update(task_rows(results, group))
    return {task: out[task] for task in tasks}


# ---------------------------------------------------------------------------------------------


def evaluate_exports(cfg: EvalConfig) -> list[Path]:
    """`--exports`: each step export of the run, into its own eval.json (the local tasks shared with
    the final model's, so every point is scored on the same items)."""
    ref = resolve_model(cfg.model)
    if ref.run is None:
        raise PredistillError(f"--exports needs a `predistill train` run directory, not {cfg.model}")
    tasks_dir = cfg.tasks_dir or str(Path(cfg.out).parent / "tasks")
    dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch.")
    # an export evaluated with the same measuring settings (and dtype) is kept; the model is the export itself
    settings = _measuring(to_flat(cfg))
    done = []
    for export in rundir.run_exports(Path(ref.run)):
        previous = _read_eval(export / rundir.EVAL) or {}
        config = previous.get("config")
        if not isinstance(config, dict):
            config = {}
        if previous.get("dtype") != dtype or _measuring(config) != settings:
            run(replace(cfg, model=str(export), out=str(export / rundir.EVAL), exports=False, tasks_dir=tasks_dir))
        done.append(export)
    return done


def _measuring(config: dict) -> dict:
    """What an evaluation with these (flat) settings measures, whatever model it is given."""
    return {k: v for k, v in flat_identity(config, EvalConfig).items() if k != "model"}


def _read_eval(path: Path) -> dict | None:
    try:
        result = parse_json(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("format") == FORMAT else None


def run(cfg: EvalConfig) -> dict:
    if not cfg.out:
        raise PredistillError("eval needs --out FILE.json")

    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise PredistillError("--batch-size and --limit must be ≥ 1")
    out = Path(cfg.out)
    if out.is_dir() or out.name in ("", ".", ".."):
        raise PredistillError(f"--out {out} is a directory; give the JSON file to write (e.g. RUN/eval.json)")
    if out.is_symlink() or (out.exists() and _read_eval(out) is None):
        # replaced only when an earlier eval wrote it: never a store's manifest.json, nor a user's file
        raise PredistillError(f"--out {out} exists and is not an eval result; refusing to overwrite it")
    if cfg.num_fewshot < 0:
        raise PredistillError(f"--num-fewshot must be ≥ 0, got {cfg.num_fewshot}")
    if cfg.exports:
        evaluate_exports(cfg)
    ref = resolve_model(cfg.model)
    store, store_note = open_store(cfg.store)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    ranks = init_distributed(device)  # under torchrun the held-out loss is sharded over the ranks
    notes = [store_note] if store_note else []

    # Tasks are resolved (and local ones built) before the model loads: a typo fails in a second.
    tasks = expand_tasks(cfg.tasks) if cfg.tasks else []
    shots = fewshot_table(cfg.fewshot, tasks)
    local_dir = None
    manager = None
    evaluated: list[str] = []
    skipped: dict[str, str] = {}
    with hub_offline(not cfg.allow_download):
        if tasks and ranks.main:  # the local tasks are built and lm-eval run by rank 0
            if any(t in LOCAL_TASKS for t in tasks) or _names_local_task(cfg.task_path):
                local_dir = build_local_tasks(
                    LocalTaskConfig(
                        store=str(store.dir),
                        out=cfg.tasks_dir or str(out.parent / "tasks"),
                        seed=cfg.seed,
                        n_items=cfg.local_items,
                    )
                )
            manager = task_manager(tasks, local_dir, cfg.task_path)
            evaluated, skipped = reachable_tasks(manager, tasks)
            for task, reason in skipped.items():
                print(f"predistill: skipping task {task}: {reason}", flush=True)

        model, tokenizer = load_model(ref.hf, dtype=dtype)
        heldout = heldout_metrics(model.to(device), tokenizer, store, cfg.batch_size, cfg.limit, ranks=ranks)
        if heldout["retokenized"]:
            notes.append(
                "the model's tokenizer differs from the store's: instances were decoded and "
                "re-tokenised with the model's tokenizer (losses are per model token)"
            )
        params = count_params(model)
        model_tok_hash = tokenizer_hash(tokenizer)
        del model
        gc.collect()  # lm-eval loads its own copy

        results = (
            run_lm_eval(
                ref.hf,
                evaluated,
                manager,
                cfg.batch_size,
                cfg.limit,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
                num_fewshot=cfg.num_fewshot,
                fewshot=shots,
            )
            if evaluated
            else {}
        )
    ranks.barrier()  # the others wait for rank 0's lm-eval
    if not ranks.main:
        return {}

    result = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "spec": cfg.model,
            "hf": ref.hf,
            "run": ref.run,
            "params": params,
            "tokenizer_hash": model_tok_hash,
            "method": (ref.run_manifest or {}).get("method"),
        },
        "store": {
            "path": str(store.dir),
            "store_hash": store.hash,
            "tokenizer_hash": store.tokenizer_hash,
            "n_instances": len(store),
        },
        **heldout,
        "tasks": {"requested": tasks, "evaluated": evaluated, "skipped": skipped},
        "results": results,
        "avg_acc": average_accuracy(results),
        "local_tasks": (
            {"dir": str(local_dir), "n_items": item_counts(local_dir), "seed": cfg.seed} if local_dir else None
        ),
        "lm_eval_version": _lm_eval_version() if tasks else None,
        "dtype": str(dtype).removeprefix("torch."),
        "notes": notes,
        "config": asdict(cfg),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    return result


def _lm_eval_version() -> str | None:
    try:
        import lm_eval

        return lm_eval.__version__
    except ImportError:
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EvalConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(EvalConfig, args)
    if cfg is None:
        return
    started = time.time()
    r = run(cfg)
    if not r:  # not rank 0: rank 0 writes and reports
        return
    line = (
        f"predistill: wrote {cfg.out} in {time.time() - started:.1f}s: heldout_loss {r['heldout_loss']:.4f} "
        f"over {r['n_instances']} instances"
    )
    for task, m in r["results"].items():
        line += f"; {task} " + " ".join(
            f"{k} {m[k]:.3f}" for k in ("acc", "acc_norm", "exact_match") if m.get(k) is not None
        )
    if r["tasks"]["skipped"]:
        line += f"; skipped {len(r['tasks']['skipped'])} task(s) (see the JSON)"
    print(line)
    for note in r["notes"]:
        print(f"predistill: note: {note}")
