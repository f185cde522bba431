"""The token record: per predicted position of every instance of a token store, one model's log-prob
of the next token and the entropy of its distribution there. Defined here and nowhere else (written
by `predistill score --token-record`, in the scoring pass itself: no extra body forward).

    TOKREC/
      writer.json              what the record is being made from (store, model, sharding); a rerun
                               with another plan is refused
      shards/shard-00000.npy   float16 [P, 2]: (log p(x_t+1 | x_≤t), H(p(· | x_≤t))) in nats, for the
                               predicted positions t = 0 … len−2 of the shard's instances, in id order
      shards/shard-00000.json  completion marker: the .npy's sha256 and its position count
      manifest.json            format "token_record": store and model hashes, shard size, every shard's
                               sha256, n_positions, bytes_per_token; `complete: true` written last

Instance i's positions are found from the token store's instance lengths (len − 1 each), so the
record holds values only: 4 bytes per position. A reader verifies the manifest's schema and the
store it belongs to when it opens the record, and each shard against its sha256 the first time it
reads from it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from predistill.core.artifacts import (
    COUNT,
    NUMBER,
    PredistillError,
    check_fields,
    check_plan,
    read_manifest,
    read_marker,
    sha256_file,
    write_manifest,
    write_shard,
)
from predistill.core.sharding import Shard, shard_name
from predistill.formats.store import TokenStore, check_same_store

FORMAT = "token_record"
VERSION = 1
FIELDS = ("logprob", "entropy")
DTYPE = np.dtype("<f2")
WRITER_FILE = "writer.json"
SCHEMA = {
    "version": int,
    "store_hash": str,
    "store_dir": str,
    "model": dict,
    "shard_size": COUNT,
    "n_instances": COUNT,
    "n_positions": COUNT,
    "shards": list,
    "bytes_per_token": NUMBER,
}


def _paths(directory: Path, index: int) -> tuple[Path, Path]:
    base = Path(directory) / "shards" / shard_name(index)
    return base.with_suffix(".npy"), base.with_suffix(".json")


class TokenRecordWriter:
    """Writes a token record of `store` shard by shard, resumably; ranks write disjoint shards and
    the one that finds them all finishes it (`finish`)."""

    def __init__(self, out: str | Path, store: TokenStore, model: dict, shard_size: int):
        self.dir = Path(out)
        self.store = store
        self.shard_size = shard_size
        self.n_positions = np.maximum(store.lengths.astype(np.int64) - 1, 0)
        self.settings = {"format": FORMAT, "version": VERSION, "store_hash": store.hash, "model": model,
                         "shard_size": shard_size, "fields": list(FIELDS)}  # fmt: skip
        self.complete = False
        if (self.dir / "manifest.json").is_file():
            manifest = read_manifest(self.dir, FORMAT, "token record")
            if {k: manifest.get(k) for k in self.settings} != self.settings:
                raise PredistillError(f"{self.dir} already holds a token record of another store or model; remove it "
                                      "or choose another --token-record")  # fmt: skip
            self.complete = True
            return
        if self.dir.exists() and not (self.dir / WRITER_FILE).is_file() and any(self.dir.iterdir()):
            raise PredistillError(f"{self.dir} exists and is not a token record; refusing to write into it")
        check_plan(self.dir, self.settings, "token record", name=WRITER_FILE)
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)

    def shard_done(self, shard: Shard) -> bool:
        npy, marker = _paths(self.dir, shard.index)
        return self.complete or read_marker(marker, npy, n_positions=self._positions(shard)) is not None

    def _positions(self, shard: Shard) -> int:
        return int(self.n_positions[shard.ids].sum())

    def write(self, shard: Shard, rows: np.ndarray) -> None:
        """The shard's [P, 2] (log-prob, entropy) rows, then the marker that vouches for them."""
        if rows.shape != (self._positions(shard), len(FIELDS)):
            raise PredistillError(f"token record shard {shard.index}: {rows.shape} rows for "
                                  f"{self._positions(shard)} positions")  # fmt: skip
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(rows, dtype=DTYPE), allow_pickle=False)
        write_shard(*_paths(self.dir, shard.index), buf.getvalue(), n_positions=self._positions(shard))

    def finish(self, shards: list[Shard], *, others_may_be_writing: bool = False) -> dict | None:
        """Write the manifest once every shard is in (None while another rank's shard is missing)."""
        if self.complete:
            return read_manifest(self.dir, FORMAT, "token record")
        entries = []
        for shard in shards:
            npy, marker = _paths(self.dir, shard.index)
            meta = read_marker(marker, npy, n_positions=self._positions(shard))
            if meta is None:
                if others_may_be_writing:
                    return None
                raise PredistillError(f"{self.dir}: token record shard {shard.index} is missing after the pass")
            entries.append({"file": npy.name, "sha256": meta["sha256"], "n_positions": meta["n_positions"]})
        n_positions = int(self.n_positions.sum())
        data_bytes = n_positions * len(FIELDS) * DTYPE.itemsize
        write_manifest(
            self.dir,
            {
                **self.settings,
                "store_dir": str(self.store.dir.resolve()),  # where `verify` finds it; not part of the identity
                "n_instances": len(self.store),
                "n_positions": n_positions,
                "shards": entries,
                "bytes_per_token": data_bytes / max(n_positions, 1),
            },
        )
        self.complete = True
        return read_manifest(self.dir, FORMAT, "token record")


class TokenRecord:
    """A complete token record, checked on open (schema, its token store) and per shard on first read."""

    def __init__(self, directory: str | Path, store: TokenStore):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, FORMAT, "token record")
        check_fields(self.manifest, self.dir, SCHEMA)
        if self.manifest["version"] != VERSION or self.manifest.get("fields") != list(FIELDS):
            raise PredistillError(f"{self.dir}: token record version {self.manifest['version']!r} with fields "
                                  f"{self.manifest.get('fields')!r}; this predistill reads version {VERSION}")  # fmt: skip
        check_same_store(self.manifest["store_hash"], store, f"token record {self.dir}")
        self.store = store
        self.shard_size = self.manifest["shard_size"]
        n_shards = -(-len(store) // self.shard_size) if self.shard_size else 0
        shards = self.manifest["shards"]
        if (
            self.shard_size < 1
            or len(shards) != n_shards
            or not all(
                isinstance(e, dict) and isinstance(e.get("sha256"), str) and e.get("file") == f"{shard_name(k)}.npy"
                for k, e in enumerate(shards)
            )
        ):
            raise PredistillError(f"{self.dir}: the manifest's shard list does not match its store (corrupted record)")
        self.n_positions = np.maximum(store.lengths.astype(np.int64) - 1, 0)
        self._first = np.concatenate([[0], np.cumsum(self.n_positions)])  # instance i's first position overall
        self._shards: dict[int, np.ndarray] = {}  # memory-mapped once checked: random access stays cheap

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            path, _ = _paths(self.dir, k)
            if not path.is_file() or sha256_file(path) != self.manifest["shards"][k]["sha256"]:
                raise PredistillError(f"{path}: missing or changed since the token record was written (sha256)")
            try:
                rows = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise PredistillError(f"{path}: not a readable .npy ({e})") from None
            a, b = k * self.shard_size, min((k + 1) * self.shard_size, len(self.store))
            if rows.dtype != DTYPE or rows.shape != (int(self.n_positions[a:b].sum()), len(FIELDS)):
                raise PredistillError(f"{path}: {rows.dtype}{list(rows.shape)} is not this shard's record")
            self._shards[k] = rows
        return self._shards[k]

    def verify_all(self) -> None:
        """Every shard against its sha256 and its shape, now (`predistill verify`)."""
        for k in range(len(self.manifest["shards"])):
            self._shard(k)

    def instance(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance i's (log-prob, entropy) per predicted position, float32 [len − 1] each."""
        if not 0 <= i < len(self.store):
            raise IndexError(f"instance {i} out of range for a store of {len(self.store)}")
        k = i // self.shard_size
        start = int(self._first[i] - self._first[k * self.shard_size])
        rows = self._shard(k)[start : start + int(self.n_positions[i])].astype(np.float32)
        return rows[:, 0], rows[:, 1]
