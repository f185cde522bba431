"""The score table: one mean token log-prob per instance of a token store, under one model.
Defined here and nowhere else (written by `predistill score`, read by `sample` and `report`).

    SCORES/
      plan.json                  what this table is being made from (model, hashes, sharding);
                                 a rerun with another plan is refused
      shards/shard-00000.npy     structured array, one row per instance of the shard, in id order:
                                   id        int64    instance id in the token store
                                   logprob   float32  mean log p over the predicted tokens (NaN if none)
                                   n_tokens  int32    number of predicted tokens (length − 1)
      shards/shard-00000.done    completion marker: JSON with the .npy's sha256 and row count
      manifest.json              format "score_table", config, model/tokenizer/store hashes, shard list,
                                 counts, FLOPs; `complete: true` written last

Shard s holds instances [s·shard_size, (s+1)·shard_size) (`sharding.plan_shards`). Each shard is
written atomically and then its marker; a shard counts as done only when its marker's sha256
matches the data on disk (`artifacts.read_marker`).
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np

from predistill.core.artifacts import (
    MANIFEST,
    PredistillError,
    json_bytes,
    read_manifest,
    read_marker,
    sha256_file,
    write_bytes_atomic,
    write_shard,
)
from predistill.core.sharding import Shard
from predistill.formats.store import TokenStore, check_same_store

FORMAT = "score_table"
VERSION = 1
PLAN = "plan.json"
SHARD_DIR = "shards"
SHARD_FILE = re.compile(r"shard-\d{5,}\.npy")  # a name inside SHARD_DIR, never a path
SHARD_DTYPE = np.dtype([("id", "<i8"), ("logprob", "<f4"), ("n_tokens", "<i4")])


def _paths(shard_dir: Path, shard: Shard) -> tuple[Path, Path]:
    return shard_dir / f"{shard.name}.npy", shard_dir / f"{shard.name}.done"


def write_score_shard(shard_dir: Path, shard: Shard, logprob: np.ndarray, n_tokens: np.ndarray) -> None:
    """One shard's rows, then the marker that vouches for them."""
    rows = np.zeros(len(shard.ids), dtype=SHARD_DTYPE)
    rows["id"], rows["logprob"], rows["n_tokens"] = shard.ids, logprob, n_tokens
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    write_shard(*_paths(shard_dir, shard), buf.getvalue(), n=len(shard.ids), n_tokens=int(n_tokens.sum()))


def shard_marker(shard_dir: Path, shard: Shard) -> dict | None:
    """The shard's marker if it exists and vouches for the shard file as it is on disk."""
    npy, done = _paths(shard_dir, shard)
    return read_marker(done, npy, n=len(shard.ids))


def table_hash(shard_hashes: list[str]) -> str:
    return hashlib.sha256("".join(shard_hashes).encode()).hexdigest()


def markers_hash(out: Path, shards: list[Shard]) -> str | None:
    """The table's `table_hash` from its shard markers (None while a shard is missing)."""
    markers = [shard_marker(Path(out) / SHARD_DIR, s) for s in shards]
    found = [m for m in markers if m is not None]
    if len(found) < len(markers):
        return None
    return table_hash([m["sha256"] for m in found])


def finish_table(out: Path, plan: dict, shards: list[Shard]) -> dict | None:
    """Write the manifest if every shard is done (else return None). Deterministic: no timings."""
    shard_dir = Path(out) / SHARD_DIR
    entries, n_tokens, n_unscored, logprob_sum = [], 0, 0, 0.0
    for shard in shards:
        marker = shard_marker(shard_dir, shard)
        if marker is None:
            return None
        rows = np.load(shard_dir / f"{shard.name}.npy", allow_pickle=False)
        if not np.array_equal(rows["id"], shard.ids):
            raise PredistillError(f"{shard_dir / shard.name}.npy holds other instances than planned; remove {out}")
        entries.append({"file": f"{shard.name}.npy", "sha256": marker["sha256"], "n": marker["n"]})
        n_tokens += int(rows["n_tokens"].sum())
        scored = rows["n_tokens"] > 0
        n_unscored += int((~scored).sum())
        logprob_sum += float((rows["logprob"][scored].astype(np.float64) * rows["n_tokens"][scored]).sum())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **plan,
        "n_shards": len(shards),
        "shards": entries,
        "table_hash": table_hash([e["sha256"] for e in entries]),
        "n_tokens_scored": n_tokens,
        "n_unscored": n_unscored,
        "token_mean_logprob": logprob_sum / max(n_tokens, 1),
        "flops": 2 * plan["model"]["forward_params"] * n_tokens,
        "complete": True,
    }
    write_bytes_atomic(Path(out) / MANIFEST, json_bytes(manifest))
    return manifest


class ScoreTable:
    """A complete score table: `logprob[i]` (float32, NaN for unscorable) and `n_tokens[i]` per instance.

    The manifest is checked before any field is used (`_check_manifest`): known version, typed
    fields, shard files named inside the table, shard rows adding up to the instances; then each
    shard against its sha256, and its values: ids inside the table, log-probs ≤ 0 or NaN (never
    ±inf), every instance scored exactly once."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, FORMAT, "score table")
        n = self._check_manifest()
        self.logprob = np.full(n, np.nan, dtype=np.float32)
        self.n_tokens = np.zeros(n, dtype=np.int32)
        seen = np.zeros(n, dtype=bool)
        for entry in self.manifest["shards"]:
            path = self.dir / SHARD_DIR / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise PredistillError(f"{path}: missing or changed since the score table was finished; rescore")
            try:
                rows = np.load(path, allow_pickle=False)
            except ValueError as e:
                raise PredistillError(f"{path}: unreadable ({e}); rescore") from None
            if (
                rows.dtype != SHARD_DTYPE
                or rows.ndim != 1
                or len(rows) != entry["n"]
                or len(rows)
                and (rows["id"].min() < 0 or rows["id"].max() >= n)
            ):
                raise PredistillError(f"{path}: not a score shard of this table; rescore")
            if np.isinf(rows["logprob"]).any() or (rows["logprob"] > 0).any() or (rows["n_tokens"] < 0).any():
                raise PredistillError(
                    f"{path}: holds a log-prob that cannot be one (+inf, -inf or > 0) or a negative "
                    "token count; rescore"
                )
            if seen[rows["id"]].any() or len(np.unique(rows["id"])) != len(rows):
                raise PredistillError(f"{path}: scores an instance twice; rescore")
            seen[rows["id"]] = True
            self.logprob[rows["id"]] = rows["logprob"]
            self.n_tokens[rows["id"]] = rows["n_tokens"]

    def _check_manifest(self) -> int:
        """The manifest's schema; returns the number of instances."""
        m, where = self.manifest, f"{self.dir / MANIFEST}"
        if m.get("version") != VERSION:
            raise PredistillError(
                f"{self.dir}: score table version {m.get('version')!r}; this predistill reads version {VERSION}"
            )
        n, shards = m.get("n_instances"), m.get("shards")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PredistillError(f"{where}: n_instances = {n!r} is not a count (corrupted score table)")
        for key in ("store_hash", "table_hash"):
            if not isinstance(m.get(key), str):
                raise PredistillError(f"{where}: {key} is missing or not a string (corrupted score table)")
        if not isinstance(m.get("model"), dict) or not isinstance(m["model"].get("spec"), str):
            raise PredistillError(f"{where}: model.spec is missing (corrupted score table)")
        if not isinstance(shards, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and SHARD_FILE.fullmatch(e["file"])
            and isinstance(e.get("sha256"), str)
            and isinstance(e.get("n"), int)
            and not isinstance(e["n"], bool)
            and e["n"] >= 0
            for e in shards
        ):
            raise PredistillError(
                f"{where}: shards must list {{file: shard-NNNNN.npy, sha256, n}} entries inside "
                f"{SHARD_DIR}/ (corrupted score table)"
            )
        if sum(e["n"] for e in shards) != n:  # before allocating anything of size n
            raise PredistillError(
                f"{where}: its shards hold {sum(e['n'] for e in shards)} rows for {n} instances (corrupted score table)"
            )
        if table_hash([e["sha256"] for e in shards]) != m["table_hash"]:
            raise PredistillError(f"{where}: table_hash does not match its shards (corrupted score table)")
        return n

    @property
    def store_hash(self) -> str:
        return self.manifest["store_hash"]

    @property
    def hash(self) -> str:
        return self.manifest["table_hash"]

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]

    def __len__(self) -> int:
        return len(self.logprob)

    def check_store(self, store: TokenStore) -> None:
        check_same_store(self.store_hash, store, f"score table {self.dir}")
