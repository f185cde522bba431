"""The artifact a stage writes, and the one way it is judged and built.

A stage declares its output once — where it goes, its format, what it is called in messages, the
identity it must have, and where each identity field lives in the artifact's manifest — and the
`Output` does the rest of the contract:

    output = Output(out, FORMAT, "token store", {"config": config, "tokenizer_hash": h},
                    located={"tokenizer_hash": "tokenizer.hash"})
    if output.complete():          # same identity: nothing to do (said once); another: refused
        return out
    with output.staged() as tmp:   # OUT.partial, owned and locked; renamed into place on success
        ...write tmp, manifest last...

`complete` is `artifacts.check_output` with the identity read from the manifest by the declared
paths (a dotted path reads a nested field: `tokenizer.hash`), so no stage writes its own reader of
its own identity. A stage that writes in place (a score table's shards, a run's checkpoints) says
what its unfinished work looks like (`resumable`) and resumes it instead of staging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from predistill.core.artifacts import check_output, staged_dir


def field_at(manifest: Mapping[str, Any], path: str) -> Any:
    """The manifest's value at a dotted path (None where any step is missing or not a mapping)."""
    value: Any = manifest
    for step in path.split("."):
        value = value.get(step) if isinstance(value, Mapping) else None
    return value


@dataclass(frozen=True)
class Output:
    """An artifact directory a stage writes (see the module doc)."""

    path: Path
    fmt: str
    what: str
    identity: dict
    # identity key → where the manifest keeps it (a dotted path); a key not named here is a top-level field
    located: Mapping[str, str] = field(default_factory=dict)
    # for an identity the manifest does not hold as such (a run's is recomputed from its saved config)
    read: Callable[[dict], dict] | None = None

    def identity_in(self, manifest: dict) -> dict:
        """The identity of the artifact a manifest describes."""
        if self.read is not None:
            return self.read(manifest)
        return {key: field_at(manifest, self.located.get(key, key)) for key in self.identity}

    def complete(self, *, resumable: Callable[[Path], bool] = lambda out: False, announce: bool = True) -> bool:
        """True: a complete artifact with this identity is there (nothing to do). False: go on (absent,
        empty, or `resumable` work of this stage). Refused: another identity, or not this artifact."""
        return check_output(Path(self.path), self.fmt, self.what, self.identity, self.identity_in, resumable, announce)

    def staged(self, resume: Callable[[Path], bool] | None = None) -> AbstractContextManager[Path]:
        """`OUT.partial` to write the artifact in; renamed into place when the block succeeds,
        removed when it fails (kept for `resume` on Ctrl-C). See `artifacts.staged_dir`."""
        return staged_dir(Path(self.path), self.fmt, resume)
