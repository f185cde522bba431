"""An evaluation's results, `eval.json` (written by `predistill eval`, read by `report`): the one
place that says which number stands for a task.

    eval.json   model {spec, hf, run, params, tokenizer_hash, method}, store {path, store_hash, …},
                heldout_loss (+ its counts), tasks {requested, evaluated, skipped},
                results {task: {acc, acc_norm, perplexity, exact_match, n, num_fewshot, metrics}},
                avg_acc, local_tasks, lm_eval_version, dtype, notes, config

A task's headline is what the papers report for it: acc_norm where the task has it, else acc,
else exact match (GSM8K); `avg_acc` is their mean over tasks (a group counts once, with its
aggregate).
"""

from __future__ import annotations

import numpy as np

HEADLINE = ("acc_norm", "acc", "exact_match")


def headline_metric(metrics: dict) -> float | None:
    """The number a paper reports for a task (see the module doc); None when it has none."""
    return next((metrics[k] for k in HEADLINE if metrics.get(k) is not None), None)


def average_accuracy(results: dict[str, dict]) -> float | None:
    """`avg_acc`: the mean of the tasks' headline metrics (None without any)."""
    values = [v for v in (headline_metric(r) for r in results.values()) if v is not None]
    return float(np.mean(values)) if values else None
