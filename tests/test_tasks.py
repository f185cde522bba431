"""Local lm-eval tasks built from held-out text: item rules, determinism, well-formed task files."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.formats.tasks import (
    CONTINUATION,
    LASTWORD,
    LocalTaskConfig,
    build,
    continuation_split,
    item_counts,
    lastword_item,
    passages,
)

SMALL = dict(min_context_chars=20, max_context_chars=200, min_choice_chars=5, max_choice_chars=60)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tiny_store):
    # 64-token test instances are short: a smaller minimum context lets the code domain contribute
    return build(
        LocalTaskConfig(
            store=str(tiny_store / "val"),
            out=str(tmp_path_factory.mktemp("t") / "tasks"),
            n_items=40,
            min_context_chars=40,
        )
    )


def test_lastword_cuts_before_the_final_word_of_a_line():
    cfg = LocalTaskConfig(**SMALL)
    text = "The night was long and the king spoke.\nThen the queen answered the brave lord!\nx = 1"
    item = lastword_item(text, cfg)
    # the last line ends in a non-word; the last final-of-line word is "lord" (punctuation dropped)
    assert item == {
        "context": "The night was long and the king spoke.\nThen the queen answered the brave",
        "target": " lord",
    }
    assert lastword_item("short text", cfg) is None  # context below min_context_chars


def test_continuation_split_keeps_the_separator_in_the_context():
    cfg = LocalTaskConfig(**SMALL)
    text = "def f(x, y):\n    return x + y * 3\n\ndef g(x, y):\n    return x - y\n"
    split = continuation_split(text, cfg)
    # the last boundary whose continuation qualifies: the indented line after "def g"
    assert split == {
        "context": "def f(x, y):\n    return x + y * 3\n\ndef g(x, y):\n    ",
        "continuation": "return x - y",
    }
    prose = "Noble lords came to the hall at night. The queen spoke first and loud. Then all was still."
    split = continuation_split(prose, cfg)
    assert split["context"].endswith("loud. ") and split["continuation"] == "Then all was still."


def test_items_are_well_formed_and_true_to_the_store(tasks_dir, tiny_store):
    store = TokenStore(tiny_store / "val")
    texts = {i: store.decode(i) for i in range(len(store))}
    counts = item_counts(tasks_dir)
    lastword = read_jsonl(tasks_dir / f"{LASTWORD}.jsonl")
    continuation = read_jsonl(tasks_dir / f"{CONTINUATION}.jsonl")
    assert counts == {LASTWORD: len(lastword), CONTINUATION: len(continuation)}
    assert len(lastword) >= 5 and len(continuation) >= 5
    for item in lastword:
        assert re.fullmatch(r" [A-Za-z][A-Za-z']{2,}", item["target"])
        assert item["context"] and not item["context"][-1].isspace()
        assert item["context"] + item["target"] in texts[item["instance"]]  # the true next word
    domains = set()
    for item in continuation:
        choices, label = item["choices"], item["label"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= label < 4
        assert all(c == c.strip() and c for c in choices)  # separators live in the context
        assert item["context"] + choices[label] in texts[item["instance"]]
        for k, distractor in enumerate(choices):
            if k != label:
                assert item["context"] + distractor not in texts[item["instance"]]
        domains.add(int(store.domain_ids[item["instance"]]))
    assert domains == {0, 1}  # the seeded passage order reaches both domains of the store
    # labels are shuffled, not always the same position
    assert len({item["label"] for item in continuation}) > 1


def test_task_yaml_is_absolute_and_registers_with_lm_eval(tasks_dir):
    from lm_eval.tasks import TaskManager

    for name, output_type in ((LASTWORD, "loglikelihood"), (CONTINUATION, "multiple_choice")):
        spec = yaml.safe_load((tasks_dir / f"{name}.yaml").read_text())
        assert spec["task"] == name and spec["output_type"] == output_type and spec["dataset_path"] == "json"
        data_file = spec["dataset_kwargs"]["data_files"]["test"]
        assert data_file.startswith("/") and data_file == str(tasks_dir / f"{name}.jsonl")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    assert {LASTWORD, CONTINUATION} <= set(manager.all_tasks)


def test_build_is_deterministic_reused_and_seeded(tmp_path, tiny_store):
    val = str(tiny_store / "val")
    a = build(LocalTaskConfig(store=val, out=str(tmp_path / "a"), n_items=30))
    b = build(LocalTaskConfig(store=val, out=str(tmp_path / "b"), n_items=30))
    for name in (LASTWORD, CONTINUATION):
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
        assert (a / f"{name}.yaml").read_text().replace(str(a), "X") == (b / f"{name}.yaml").read_text().replace(
            str(b), "X"
        )
    before = (a / f"{CONTINUATION}.jsonl").stat().st_mtime_ns
    build(LocalTaskConfig(store=val, out=str(a), n_items=30))  # same settings: reused as is
    assert (a / f"{CONTINUATION}.jsonl").stat().st_mtime_ns == before
    build(LocalTaskConfig(store=val, out=str(a), n_items=30, seed=7))  # another seed: rebuilt, other order
    assert (a / f"{CONTINUATION}.jsonl").read_bytes() != (b / f"{CONTINUATION}.jsonl").read_bytes()


def test_passages_split_documents_at_eos(tiny_store):
    store = TokenStore(tiny_store / "val")
    pieces = list(passages(store, seed=0))
    assert all("<|endoftext|>" not in text for _, _, text in pieces)
    assert {i for i, _, _ in pieces} == set(range(len(store)))
    assert [i for i, _, _ in pieces] != sorted(i for i, _, _ in pieces)  # permuted, not store order


def test_refuses_to_write_into_a_foreign_directory(tmp_path, tiny_store):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(PredistillError, match="not a local tasks directory"):
        build(LocalTaskConfig(store=str(tiny_store / "val"), out=str(tmp_path)))
