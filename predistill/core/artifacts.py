"""Artifact directories: manifests, hashes, atomic writes, and the output-directory protocol.

Every stage writes one directory holding `manifest.json` with the format name and version, the
config that made it, the hashes of its inputs, counts, and `complete: true` written last. Nothing
is written in place: a stage builds `OUT.partial/` and renames it to `OUT` only when it is whole,
so a killed run never leaves a directory that claims to be complete.

The protocol every stage follows for its `--out` (`check_output`): a complete artifact with the
same identity → nothing to do; another identity → refuse, naming what differs; a partial one →
resume. Long stages work in shards: each shard's data file is written atomically, then its
marker (`write_shard`), which records the data's sha256; `read_marker` is the one check of a
marker, and a shard whose data does not match is redone. `check_plan` pins what a resumable
directory is being made from, so a rerun with other settings cannot mix shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class PredistillError(Exception):
    """An error the user can fix (bad input, missing artifact). The CLI prints it as one line."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def parse_json(text: str | bytes) -> Any:
    """`json.loads` whose every failure is a ValueError: malformed text, a 5 000-digit number and
    nesting 100 000 deep alike (a file's word is never trusted to be parseable)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def reason_of(error: BaseException, limit: int = 300) -> str:
    """An exception's first non-blank line (its type's name when it has none), cut at `limit`
    characters: what a one-line error says of a library's failure (transformers lists every model type)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:limit]


def read_json_object(path: Path, damaged: str) -> dict:
    """A JSON object file that a stage wrote into `damaged` (a run directory…); anything else is a
    one-line error saying the directory is damaged."""
    try:
        value = parse_json(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PredistillError(f"{path}: unreadable ({type(e).__name__}); {damaged} is damaged") from None
    if not isinstance(value, dict):
        raise PredistillError(f"{path}: not a JSON object; {damaged} is damaged")
    return value


def json_bytes(obj: Any) -> bytes:
    """The canonical JSON encoding of every manifest and marker: sorted keys, so reruns are byte-identical."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a per-process temporary name, fsync, rename: readers (and racing ranks) see all or
    nothing. The temporary is created exclusively and never through a link: whatever sits at its
    name (a killed writer's leftover, a planted symlink) is unlinked first, itself, not its target.
    A failed write (full disk) removes its temporary; those of killed writers are removed when the
    directory is resumed (`check_plan`)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open_exclusive(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_exclusive(path: str | Path):
    """A new file opened for writing at `path`, created here and now (O_EXCL, O_NOFOLLOW): an entry
    already there — a planted symlink included — is removed first, never written through."""
    path = Path(path)
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            raise PredistillError(f"{path} is a directory; cannot write a temporary file there")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def open_append_nofollow(path: str | Path):
    """`path` opened for appending text, refusing a symlink (an output never writes through a link
    to a file outside it)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        if Path(path).is_symlink():
            raise PredistillError(f"{path} is a symbolic link; refusing to write through it") from None
        raise
    return os.fdopen(fd, "a")


def remove_debris(directory: Path) -> None:
    """Remove the temporaries (`*.tmp`) that killed writers left anywhere under `directory`; a
    temporary named after a live process is another writer's, and is left alone."""
    for debris in Path(directory).rglob("*.tmp"):
        pid = debris.name[: -len(".tmp")].rpartition(".")[2]
        if not _pid_alive(pid):
            debris.unlink(missing_ok=True)


def _pid_alive(text: str) -> bool:
    """Is `text` the pid of a live process (whose temporary must not be touched)?"""
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def write_shard(data_path: Path, marker_path: Path, data: bytes, **fields: Any) -> dict:
    """Write a shard's data atomically, then its completion marker (`fields` + the data's sha256)."""
    write_bytes_atomic(data_path, data)
    marker = {**fields, "sha256": hashlib.sha256(data).hexdigest()}
    write_bytes_atomic(marker_path, json_bytes(marker))  # last: it vouches for the data
    return marker


def read_marker(marker: Path, data: Path, **expect: Any) -> dict | None:
    """A shard's completion marker, if both files exist, the marker's sha256 vouches for `data` as
    it is on disk, and every `expect` field equals the marker's; None otherwise (redo the shard)."""
    if not marker.is_file() or not data.is_file():
        return None
    try:
        content = parse_json(marker.read_text())
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not isinstance(content, dict) or any(content.get(k) != v for k, v in expect.items()):
        return None
    return content if content.get("sha256") == sha256_file(data) else None


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {_short(old.get(k))} → {_short(new.get(k))}" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"


def check_plan(directory: Path, plan: dict, what: str, name: str = "plan.json") -> None:
    """Pin what a resumable directory is being made from: write `plan` the first time, and refuse
    a rerun whose plan differs (naming what differs) instead of mixing shards of two plans."""
    path = Path(directory) / name
    if path.is_file():
        try:
            old = parse_json(path.read_text())
        except ValueError:
            raise PredistillError(f"{path}: unreadable; remove {directory} and rerun") from None
        if old != plan:
            raise PredistillError(
                f"{directory} holds an unfinished {what}: an interrupted {what} with other settings "
                f"(another plan — {_differences(old, plan)}); remove it or rerun with the same "
                "settings to resume"
            )
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json_bytes(plan))
    remove_debris(Path(directory))


def check_output(
    out: Path,
    fmt: str,
    what: str,
    identity: dict,
    identity_of: Callable[[dict], dict],
    resumable: Callable[[Path], bool] = lambda out: False,
    announce: bool = True,
) -> bool:
    """The output-directory protocol. True: `out` holds a complete `fmt` artifact whose identity
    (`identity_of(manifest)`) is `identity` — nothing to do (said on stderr when `announce`; under
    torchrun rank 0 says it). False: `out` is absent or empty, or `resumable(out)` says it holds
    this stage's unfinished work — go on (resume). Anything else is refused: another identity
    (naming what differs), or a directory that is not this artifact."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    if (staging.exists() or staging.is_symlink()) and not owned_work(staging, fmt):
        raise PredistillError(
            f"{staging} exists and is not this tool's unfinished {what}; refusing to remove it (remove it yourself)"
        )
    if out.is_symlink():
        raise PredistillError(f"{out} is a symbolic link; refusing to write through it")
    if not out.exists():
        return False
    if not out.is_dir():
        raise PredistillError(f"{out} exists and is not a directory; refusing to overwrite it")
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out, fmt, what)
        old = identity_of(manifest)
        if old == identity:
            if announce:
                print(f"predistill: {out} is already complete; nothing to do", file=sys.stderr)
            return True
        raise PredistillError(
            f"{out} already holds a {what} made with other settings (another config or inputs: "
            f"{_differences(old, identity)}); remove it or choose another --out"
        )
    # another rank's temporary (its plan being written) does not make the directory foreign
    if any(not p.name.endswith(".tmp") for p in out.iterdir()) and not resumable(out):
        raise PredistillError(f"{out} exists and is not a {what}; refusing to overwrite it")
    return False


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, json_bytes(obj))


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest with `complete: true`; call it after every other file is in place."""
    write_json_atomic(Path(directory) / MANIFEST, {**manifest, "complete": True})


def read_manifest(directory: str | Path, fmt: str, what: str | None = None) -> dict[str, Any]:
    """The manifest of a complete artifact of format `fmt`, or a PredistillError saying why not."""
    directory = Path(directory)
    what = what or fmt.replace("_", " ")
    path = directory / MANIFEST
    if not path.is_file():
        raise PredistillError(f"{directory}: not a {what} (no {MANIFEST})")
    try:
        manifest = parse_json(path.read_text())
    except ValueError as e:  # malformed, undecodable, a 5 000-digit number, nesting 100 000 deep
        raise PredistillError(f"{path}: unreadable manifest ({str(e).split(';')[0][:200]})") from None
    if not isinstance(manifest, dict):
        raise PredistillError(f"{path}: unreadable manifest (not a JSON object)")
    if manifest.get("format") != fmt:
        raise PredistillError(f"{directory}: is a {manifest.get('format')!r} artifact, expected {fmt!r}")
    if manifest.get("complete") is not True:
        raise PredistillError(f"{directory}: {what} is incomplete (its writer was interrupted); rerun it")
    return manifest


COUNT = "count"  # a schema type: a non-negative int (never a bool)
NUMBER = "number"  # a finite int or float (never a bool)


def check_fields(manifest: dict, where: str | Path, schema: dict[str, Any]) -> None:
    """Refuse a manifest whose fields are not what `schema` says (key → type, COUNT or NUMBER),
    naming the first bad field: what a reader computes with must be what a writer writes."""
    for key, expected in schema.items():
        value = manifest.get(key)
        if expected == COUNT:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif expected == NUMBER:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            kind = {COUNT: "a count", NUMBER: "a finite number"}.get(expected, getattr(expected, "__name__", expected))
            raise PredistillError(f"{where}: {key} = {_short(value)} is not {kind} (corrupted artifact)")


def is_complete(directory: str | Path, fmt: str) -> bool:
    try:
        read_manifest(directory, fmt)
        return True
    except PredistillError:
        return False


def refuse_links(directory: str | Path) -> None:
    """Refuse an output holding a symbolic link anywhere inside: a write there could land outside it."""
    for root, dirs, files in os.walk(directory):  # does not follow links to directories
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                raise PredistillError(
                    f"{os.path.join(root, name)} is a symbolic link inside an output; refusing to "
                    "write through it (replace it with a real file or directory)"
                )


STAGING_MARK = ".predistill-staging"  # in OUT.partial: this tool made it, for an artifact of the format it names


def owned(path: str | Path, fmt: str) -> bool:
    """May this tool remove or replace `path` as an artifact of format `fmt`? Yes when nothing is
    there, or an empty directory, or a directory whose manifest says `fmt` (complete or not); never
    a symlink, a file, or a directory of anything else — a user's folder, another kind of artifact."""
    path = Path(path)
    if path.is_symlink():
        return False
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        manifest = parse_json((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == fmt


def refuse_unowned(path: str | Path, fmt: str, what: str) -> None:
    if not owned(path, fmt):
        raise PredistillError(
            f"{path} exists and is not a {what} this tool wrote; refusing to remove or "
            "overwrite it (choose another output, or remove it yourself)"
        )


def lock_dir(directory: str | Path, out: str | Path) -> int:
    """Hold an exclusive lock on `directory` (an open descriptor; released when it is closed or the
    process dies, even by SIGKILL): one writer per output at a time, the second told so at once."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PredistillError(
            f"{out} is being written by another predistill process right now; wait for it to "
            "finish or choose another output"
        ) from None
    return fd


def hold_output(out: str | Path, held: contextlib.ExitStack) -> None:
    """One writer at a time for a stage that writes `out` in place (a score table's shards, a run's
    checkpoints): `out` (never a symlink) is created if need be and locked (`lock_dir`) until `held` closes. Under
    torchrun only one process per job calls it (rank 0): the ranks of one job share the output."""
    out = Path(out)
    if out.is_symlink():  # written in place: through a link, the files would land in the link's target
        raise PredistillError(f"{out} is a symbolic link; refusing to write through it")
    out.mkdir(parents=True, exist_ok=True)
    held.callback(os.close, lock_dir(out, out))


def owned_work(directory: str | Path, fmt: str) -> bool:
    """May this tool use or remove `directory` as its own work directory for `fmt` (`OUT.partial`,
    generate's `OUT.shards`)? Yes when nothing is there, or it is empty, or it carries this tool's
    staging mark for `fmt` (or holds only the temporaries of a mark being written, another rank's);
    never a symlink, a file, or a folder of the user's that happens to have the name."""
    directory = Path(directory)
    if directory.is_symlink():
        return False
    if not directory.exists():
        return True
    if not directory.is_dir():
        return False
    try:
        return (directory / STAGING_MARK).read_text() == fmt
    except OSError:
        return all(p.name.endswith(".tmp") for p in directory.iterdir())


def refuse_foreign_work(directory: str | Path, fmt: str, what: str) -> None:
    if not owned_work(directory, fmt):
        raise PredistillError(
            f"{directory} exists and is not this tool's unfinished {what}; refusing to use or remove "
            "it (remove it yourself)"
        )


def claim_work(directory: str | Path, fmt: str, what: str) -> Path:
    """`directory` as this tool's work directory for `fmt`: reused when it carries the staging mark,
    made (and marked) when absent; anything else is refused (`refuse_foreign_work`)."""
    directory = Path(directory)
    refuse_foreign_work(directory, fmt, what)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / STAGING_MARK).is_file():
        write_bytes_atomic(directory / STAGING_MARK, fmt.encode())
    return directory


def remove_owned_work(directory: str | Path, fmt: str) -> None:
    """Remove `directory` if it is this tool's work directory for `fmt` (`owned_work`); leave anything else alone."""
    directory = Path(directory)
    if directory.is_dir() and owned_work(directory, fmt):
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: str | Path, fmt: str, resume: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an `OUT.partial` directory; on success replace `OUT` with it atomically.

    Ownership first: an existing `OUT` is replaced only when it is this tool's artifact of the same
    format (`owned`), and an existing `OUT.partial` is reused or discarded only when it carries this
    tool's staging mark for `fmt`; anything else is refused before any work. A stale `.partial` from
    a killed run is discarded — unless `resume(staging)` says it holds resumable progress of this
    very run (`prepare`'s checkpoints), which the body then continues. Stages without `resume` are
    cheap enough to redo whole, and redoing them from scratch is what makes reruns byte-identical.
    When the body raises (bad input, Ctrl-C), the staging directory is removed — except a resumable
    one on Ctrl-C — so a failed run leaves nothing behind; a `.partial` never claims completion
    (writers put `manifest.json` with `complete: true` last, and `OUT` appears only by rename).
    """
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    what = fmt.replace("_", " ")
    refuse_unowned(out, fmt, what)
    if (staging.exists() or staging.is_symlink()) and not owned_work(staging, fmt):
        raise PredistillError(
            f"{staging} exists and is not this tool's unfinished {what}; refusing to remove it (remove it yourself)"
        )
    staging.mkdir(parents=True, exist_ok=True)
    lock = lock_dir(staging, out)  # the staging directory itself is the lock: kept, never recreated, while held
    try:
        if not (resume and resume(staging)):
            _empty(staging)  # stale (or new): its contents go, the locked directory stays
        else:  # resumed: a temporary the kill cut short must not ride into OUT
            remove_debris(staging)
        (staging / STAGING_MARK).write_text(fmt)
        try:
            yield staging
        except BaseException as e:
            # an error (bad input, full disk) leaves nothing behind; an interruption of a resumable
            # stage (Ctrl-C, like SIGKILL) keeps its progress for the rerun
            if resume is None or not isinstance(e, KeyboardInterrupt):
                shutil.rmtree(staging, ignore_errors=True)
            raise
        (staging / STAGING_MARK).unlink()
        refuse_unowned(out, fmt, what)  # what appeared at OUT while the body ran is not ours to replace either
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        os.close(lock)


def _empty(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
