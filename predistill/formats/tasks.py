"""Local lm-eval tasks built from held-out text, for machines that cannot reach the hub's task data.

Two zero-shot tasks, written as lm-eval custom YAML tasks (`dataset_path: json`, absolute
`data_files`) into one directory that `lm_eval.tasks.TaskManager(include_path=DIR)` registers:

- `local_lastword` (LAMBADA-style): a passage cut right before its final word; the model must
  produce that word. Metric `acc` = the word's tokens are all the model's greedy (argmax) choices
  given the passage, exactly lm-eval's `lambada_openai` formulation (`output_type: loglikelihood`),
  plus `perplexity` of the word. There is no `acc_norm` for this task (nothing to normalise across).
- `local_continuation` (HellaSwag/StoryCloze-style): a passage cut at a line or sentence boundary,
  and 4 candidate continuations: the true next line/sentence and 3 distractors that are true
  continuations of *other* held-out passages (same domain when possible, closest in length among a
  seeded random sample, so length alone gives little away). `acc` = argmax of the summed
  log-likelihood, `acc_norm` = argmax of log-likelihood per character (lm-eval's definitions).

Passages are the documents inside the held-out store's instances (split at EOS, decoded with the
store's tokenizer), visited in a seeded permutation so both domains of a mixed store contribute.
Everything is a pure function of (store content, config): rebuilding gives byte-identical files.

    TASKS_DIR/
      local_lastword.jsonl       {"id", "instance", "context", "target"}  (target has its leading space)
      local_lastword.yaml
      local_continuation.jsonl   {"id", "instance", "context", "choices", "label"}
      local_continuation.yaml
      manifest.json              format "local_tasks": config, store hash, item counts
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predistill.core.artifacts import PredistillError, read_manifest, staged_dir, write_manifest
from predistill.core.config import Effect, identity, option
from predistill.formats.store import TokenStore

FORMAT = "local_tasks"
VERSION = 1
LASTWORD = "local_lastword"
CONTINUATION = "local_continuation"
LOCAL_TASKS = (LASTWORD, CONTINUATION)

# The final word: letters (≥ 3, apostrophes allowed), preceded by one space, followed only by
# closing punctuation before the end of its line. Short words ("a", "of") make a weak test.
_LAST_WORD = re.compile(r"(?<= )([A-Za-z][A-Za-z']{2,})(?=[.!?,;:\"')\]]*(?:\n|\Z))")
# Split points for a continuation: right after a newline (+ the next line's indentation), or
# after a sentence end and one space inside a line.
_SPLIT = re.compile(r"\n[ \t]*|(?<=[.!?]) (?=[A-Z])")
_SENTENCE_END = re.compile(r"[.!?](?= )")


@dataclass
class LocalTaskConfig:
    # the identity is the content (the store's hash, recorded beside the config), not the paths
    store: str = option("", effect=Effect.NONE)  # held-out token store the passages come from
    out: str = option("", effect=Effect.NONE)  # tasks directory to write
    seed: int = 1234
    n_items: int = 200  # per task (fewer when the store has fewer usable passages)
    n_choices: int = 4
    min_context_chars: int = 120
    max_context_chars: int = 800  # bounds the eval cost: ≈ 200 tokens of context per item
    min_choice_chars: int = 12
    max_choice_chars: int = 160
    distractor_pool: int = 16  # distractors are the closest in length among this many random candidates


def passages(store: TokenStore, seed: int):
    """Yield `(instance, domain, text)` for every document piece of every instance, instances in
    a seeded permutation (a store lists its domains one after the other)."""
    tokenizer = store.tokenizer()
    order = np.random.default_rng(seed).permutation(len(store))
    for i in order:
        ids = np.asarray(store[int(i)], dtype=np.int64)
        cuts = np.flatnonzero(ids == store.eos_id)
        start = 0
        for end in [*cuts.tolist(), len(ids)]:
            if end > start:
                text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True)
                if text.strip():
                    yield int(i), int(store.domain_ids[i]), text
            start = end + 1


def lastword_item(text: str, cfg: LocalTaskConfig) -> dict | None:
    """`{"context", "target"}` for the last final-of-line word whose context fits the limits."""
    best = None
    for m in _LAST_WORD.finditer(text):
        context = text[: m.start() - 1]  # drop the space: it belongs to the target, as in LAMBADA
        if len(context) > cfg.max_context_chars:
            break
        if len(context) >= cfg.min_context_chars and not context[-1:].isspace():
            best = {"context": context, "target": " " + m.group(1)}
    return best


def _choice_at(text: str, start: int, cfg: LocalTaskConfig) -> str | None:
    """The continuation starting at `start`: the rest of its line, or its first sentence when the
    line is too long; None when neither fits the length limits."""
    line = text[start:].split("\n", 1)[0].rstrip()
    if len(line) > cfg.max_choice_chars:
        ends = [
            m.end() for m in _SENTENCE_END.finditer(line) if cfg.min_choice_chars <= m.end() <= cfg.max_choice_chars
        ]
        line = line[: ends[0]] if ends else ""
    if not cfg.min_choice_chars <= len(line) <= cfg.max_choice_chars or not re.search(r"[A-Za-z]", line):
        return None
    return line


def continuation_split(text: str, cfg: LocalTaskConfig) -> dict | None:
    """`{"context", "continuation"}` at the last boundary whose context fits the limits. The
    context keeps the separator (newline + indentation, or a space), so every choice is scored
    after the same text and carries no whitespace of its own."""
    best = None
    for m in _SPLIT.finditer(text):
        if m.end() > cfg.max_context_chars:
            break
        if m.end() < cfg.min_context_chars or not text[: m.start()].strip():
            continue
        choice = _choice_at(text, m.end(), cfg)
        if choice is not None:
            best = {"context": text[: m.end()], "continuation": choice}
    return best


def _pick_distractors(k: int, items: list[dict], cfg: LocalTaskConfig) -> list[str]:
    """`n_choices − 1` continuations of other instances: same domain when there are enough, the
    closest in length to the true one among a seeded random sample of candidates."""
    item = items[k]
    true = item["continuation"]
    others = [j for j, o in enumerate(items) if o["instance"] != item["instance"] and o["continuation"] != true]
    same = [j for j in others if items[j]["domain"] == item["domain"]]
    need = cfg.n_choices - 1
    pool = same if len(same) >= need else others
    rng = random.Random(f"{cfg.seed}:distractors:{k}")
    sample = rng.sample(pool, min(cfg.distractor_pool, len(pool)))
    sample.sort(key=lambda j: (abs(len(items[j]["continuation"]) - len(true)), j))
    picked: list[str] = []
    for j in sample:
        if items[j]["continuation"] not in picked:
            picked.append(items[j]["continuation"])
        if len(picked) == need:
            break
    return picked


def build_items(store: TokenStore, cfg: LocalTaskConfig) -> dict[str, list[dict]]:
    """The items of both tasks (see module doc), as the JSON objects their files hold."""
    lastword: list[dict] = []
    splits: list[dict] = []
    for instance, domain, text in passages(store, cfg.seed):
        if len(lastword) >= cfg.n_items and len(splits) >= cfg.n_items:
            break
        if len(lastword) < cfg.n_items and (item := lastword_item(text, cfg)):
            lastword.append({"id": len(lastword), "instance": instance, **item})
        if len(splits) < cfg.n_items and (split := continuation_split(text, cfg)):
            splits.append({"instance": instance, "domain": domain, **split})
    continuation: list[dict] = []
    for k, split in enumerate(splits):
        distractors = _pick_distractors(k, splits, cfg)
        if len(distractors) < cfg.n_choices - 1:
            continue  # too few other passages (a tiny store): leave the item out
        choices = [split["continuation"], *distractors]
        random.Random(f"{cfg.seed}:order:{k}").shuffle(choices)
        continuation.append(
            {
                "id": len(continuation),
                "instance": split["instance"],
                "context": split["context"],
                "choices": choices,
                "label": choices.index(split["continuation"]),
            }
        )
    return {LASTWORD: lastword, CONTINUATION: continuation}


def task_yaml(name: str, data_file: Path, cache_dir: Path) -> dict:
    """The lm-eval task config. Fields are named by key (`doc_to_text: context`), so lm-eval reads
    them verbatim instead of through a Jinja template (which would be free to touch whitespace)."""
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        # absolute paths: lm-eval resolves data_files against the working directory, not the YAML
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "doc_to_text": "context",
        "metadata": {"version": VERSION},
    }
    if name == LASTWORD:
        return {
            **common,
            "output_type": "loglikelihood",
            "doc_to_target": "target",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            ],
        }
    return {
        **common,
        "output_type": "multiple_choice",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        # the context ends with its separator (newline or space); choices carry none
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def build(cfg: LocalTaskConfig) -> Path:
    """Write the tasks directory (or reuse it when it already holds these tasks); return it."""
    import yaml

    if cfg.n_choices < 2:
        raise PredistillError(f"n_choices must be ≥ 2, got {cfg.n_choices}")
    if cfg.n_items < 1:
        raise PredistillError(f"the number of local task items must be ≥ 1, got {cfg.n_items}")
    store = TokenStore(cfg.store)
    out = Path(cfg.out).resolve()
    config = identity(cfg, blank=True)
    if (out / "manifest.json").is_file():
        try:
            old = read_manifest(out, FORMAT, "local tasks directory")
        except PredistillError:
            old = {}
        if old.get("config") == config and old.get("store_hash") == store.hash and old.get("dir") == str(out):
            return out
        print(f"predistill: rebuilding local tasks in {out} (store or settings changed)", flush=True)
    elif out.exists() and any(out.iterdir()):
        raise PredistillError(f"{out} exists and is not a local tasks directory; choose another --tasks-dir")
    items = build_items(store, cfg)
    with staged_dir(out, FORMAT) as tmp:
        counts = {}
        for name, rows in items.items():
            counts[name] = len(rows)
            if not rows:
                continue  # no task file: eval reports the task as skipped
            with open(tmp / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            spec = task_yaml(name, out / f"{name}.jsonl", out / ".datasets_cache")
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
        write_manifest(
            tmp,
            {
                "format": FORMAT,
                "version": VERSION,
                "config": config,
                "store_hash": store.hash,
                "store": str(Path(cfg.store).resolve()),
                "dir": str(out),
                "n_items": counts,
            },
        )
    return out


def item_counts(tasks_dir: str | Path) -> dict[str, int]:
    return read_manifest(tasks_dir, FORMAT, "local tasks directory")["n_items"]
