"""The token store: the on-disk format every stage reads. Defined here and nowhere else.

    STORE/
      tokens.bin      all instances' token ids back to back, dtype from the manifest
                      (uint16 when the vocabulary fits in 65 536 ids, else uint32)
      offsets.npy     int64, n_instances + 1 boundaries: instance i is tokens[offsets[i]:offsets[i+1]]
      domains.npy     int16, n_instances: index into manifest["domains"]
      loss_mask.bin   optional, uint8 per token: 1 where the token is a training target (SFT data:
                      the responses; `predistill sft-data`), 0 where it is only context. A store
                      without it trains on every token
      tokenizer/      the HF tokenizer that made the ids (so any stage can decode)
      manifest.json   format "token_store", config, tokenizer hash, counts, store_hash, complete
      val/            optional held-out store, same layout

`store_hash` identifies the content (sha256 over tokens.bin then offsets.npy's array bytes);
downstream artifacts (scores, selections, logits) record it and refuse another store's.
`chunk_sha256` holds the sha256 of each `chunk_bytes` (64 MiB) piece of tokens.bin: a reader
verifies a chunk (and that its ids are inside the vocabulary) the first time it reads from it, so a
store changed in place is refused at a cost of one pass over the chunks read, whatever the store's
size. `offsets_sha256`
and `domains_sha256` vouch for the index files, checked at every open (they are small): moved
instance boundaries are refused even when the total stays the same. `loss_mask_sha256` vouches for
loss_mask.bin, checked in full the first time a mask is read; a masked store's `store_hash` covers
its mask too (the same tokens with another mask train another model).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from predistill.core.artifacts import PredistillError, read_manifest, sha256_file, write_manifest
from predistill.formats import tokenizer as saved_tokenizer

if TYPE_CHECKING:  # batches are tensors; torch is imported where they are made
    import torch

FORMAT = "token_store"
# where a store's manifest keeps the fields its writers name in their identity (`core.output.Output`)
IDENTITY_AT = {
    "tokenizer_hash": "tokenizer.hash",
    "derived_from_hash": "derived_from.hash",  # prepare --source store:DIR
    "selection_hash": "source.selection_hash",  # sample --materialize
}
VERSION = 1
UINT16_VOCAB_LIMIT = 1 << 16
CHUNK_BYTES = 1 << 26  # the unit of integrity checks on read
REQUIRED_KEYS = (
    "dtype",
    "n_tokens",
    "n_instances",
    "vocab_size",
    "eos_id",
    "store_hash",
    "tokenizer",
    "chunk_bytes",
    "chunk_sha256",
    "offsets_sha256",
    "domains_sha256",
)


LOSS_MASK = "loss_mask.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


class TokenStoreWriter:
    """Appends instances to a new store directory; `finish` writes the index and the manifest.

    Everything is appended to files as it comes (tokens.bin, and the instance ends and domains in
    `*.part` files until `finish`), so memory does not grow with the store and a writer can be
    resumed: `checkpoint()` makes what was appended durable and returns the counts that
    `TokenStoreWriter(..., resume=counts)` truncates back to (hashes are rebuilt from the files)."""

    def __init__(self, directory: str | Path, vocab_size: int, resume: dict | None = None, loss_mask: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        if loss_mask and resume:
            raise ValueError("a store with a loss mask is written in one go (sft-data), not resumed")
        self._mask = open(self.dir / LOSS_MASK, "wb") if loss_mask else None
        self._hash = hashlib.sha256()
        self.chunk_sha256: list[str] = []
        self._chunk_hash, self._chunk_fill = hashlib.sha256(), 0
        self.n_tokens, self._n_instances = 0, 0
        mode = "r+b" if resume else "wb"
        self._tokens = open(self.dir / "tokens.bin", mode)
        self._ends = open(self.dir / "ends.part", mode)  # int64 end offset of each instance
        self._domains = open(self.dir / "domains.part", mode)  # int16 domain of each instance
        if resume:
            self.n_tokens, self._n_instances = resume["n_tokens"], resume["n_instances"]
            for f, size in (
                (self._tokens, self.n_tokens * self.dtype.itemsize),
                (self._ends, self._n_instances * 8),
                (self._domains, self._n_instances * 2),
            ):
                f.truncate(size)
                f.seek(size)
            with open(self.dir / "tokens.bin", "rb") as f:  # the hashes' state, rebuilt from the data
                while block := f.read(1 << 24):
                    self._hash.update(block)
                    self._hash_chunks(block)

    def checkpoint(self) -> dict:
        """Make everything appended so far durable; the counts to resume from."""
        for f in (self._tokens, self._ends, self._domains):
            f.flush()
            os.fsync(f.fileno())
        return {"n_tokens": self.n_tokens, "n_instances": self._n_instances}

    def _hash_chunks(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), CHUNK_BYTES - self._chunk_fill)
            self._chunk_hash.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == CHUNK_BYTES:
                self.chunk_sha256.append(self._chunk_hash.hexdigest())
                self._chunk_hash, self._chunk_fill = hashlib.sha256(), 0

    def append(self, ids: np.ndarray, domain: int, loss_mask: np.ndarray | None = None) -> None:
        if len(ids) == 0:
            return
        if (loss_mask is None) != (self._mask is None) or (loss_mask is not None and len(loss_mask) != len(ids)):
            raise ValueError("a loss mask, one entry per token, for every instance of a masked store (and only there)")
        ids = np.asarray(ids)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise PredistillError(
                f"token id {int(ids.max() if ids.max() >= self.vocab_size else ids.min())} "
                f"outside the vocabulary [0, {self.vocab_size})"
            )
        data = ids.astype(self.dtype, copy=False).tobytes()
        self._tokens.write(data)
        self._hash.update(data)
        self._hash_chunks(data)
        self.n_tokens += len(ids)
        self._n_instances += 1
        self._ends.write(np.int64(self.n_tokens).tobytes())
        self._domains.write(np.int16(domain).tobytes())
        if self._mask is not None:
            self._mask.write((np.asarray(loss_mask) != 0).astype(np.uint8).tobytes())

    @property
    def n_instances(self) -> int:
        return self._n_instances

    def finish(self, manifest: dict) -> dict:
        for f in (self._tokens, self._ends, self._domains):
            f.close()
        if self._chunk_fill:
            self.chunk_sha256.append(self._chunk_hash.hexdigest())
        offsets = np.concatenate([[0], np.fromfile(self.dir / "ends.part", dtype=np.int64)]).astype(np.int64)
        domains = np.fromfile(self.dir / "domains.part", dtype=np.int16)
        np.save(self.dir / "offsets.npy", offsets)
        np.save(self.dir / "domains.npy", domains)
        (self.dir / "ends.part").unlink()
        (self.dir / "domains.part").unlink()
        self._hash.update(offsets.tobytes())
        masked = {}
        if self._mask is not None:
            self._mask.close()
            mask_sha256 = sha256_file(self.dir / LOSS_MASK)
            self._hash.update(mask_sha256.encode())
            masked = {
                "loss_mask_sha256": mask_sha256,
                "n_target_tokens": int(np.count_nonzero(np.fromfile(self.dir / LOSS_MASK, dtype=np.uint8))),
            }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            **manifest,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "n_tokens": self.n_tokens,
            "n_instances": self.n_instances,
            "store_hash": self._hash.hexdigest(),
            "chunk_bytes": CHUNK_BYTES,
            "chunk_sha256": self.chunk_sha256,
            "offsets_sha256": hashlib.sha256(offsets.tobytes()).hexdigest(),
            "domains_sha256": hashlib.sha256(domains.tobytes()).hexdigest(),
            **masked,
        }
        write_manifest(self.dir, manifest)
        return manifest


class TokenStore:
    """Read-only view of a token store: instance i, batches, decoded text."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, FORMAT, "token store")
        if self.manifest.get("version") != VERSION:
            raise PredistillError(
                f"{self.dir}: token store version {self.manifest.get('version')!r}; this predistill "
                f"reads version {VERSION}"
            )
        missing = [k for k in REQUIRED_KEYS if k not in self.manifest]
        if missing:
            raise PredistillError(f"{self.dir}: the manifest lacks {', '.join(missing)} (corrupted store)")
        self._check_manifest_types()
        try:
            self.dtype = np.dtype(self.manifest["dtype"])
            self.offsets = np.load(self.dir / "offsets.npy", allow_pickle=False)
            self.domain_ids = np.load(self.dir / "domains.npy", allow_pickle=False)
        except (OSError, ValueError, TypeError) as e:
            raise PredistillError(f"{self.dir}: unreadable store index ({e})") from None
        n_tokens = self.manifest["n_tokens"]
        if self.offsets.dtype != np.int64 or self.offsets.ndim != 1:
            raise PredistillError(
                f"{self.dir}: offsets.npy is {self.offsets.dtype}{list(self.offsets.shape)}, expected int64[n+1]"
            )
        if len(self.offsets) != self.manifest["n_instances"] + 1 or self.offsets[-1] != n_tokens:
            raise PredistillError(
                f"{self.dir}: offsets.npy disagrees with the manifest's counts "
                f"({len(self.offsets) - 1} instances / {self.offsets[-1]} tokens, manifest says "
                f"{self.manifest['n_instances']} / {n_tokens})"
            )
        if self.offsets[0] != 0 or (len(self.offsets) > 1 and np.any(np.diff(self.offsets) <= 0)):
            raise PredistillError(f"{self.dir}: offsets.npy is not strictly increasing from 0 (corrupted store)")
        if len(self.domain_ids) != len(self.offsets) - 1:
            raise PredistillError(
                f"{self.dir}: domains.npy has {len(self.domain_ids)} entries for "
                f"{len(self.offsets) - 1} instances (corrupted store)"
            )
        for name, array in (("offsets", self.offsets), ("domains", self.domain_ids)):
            recorded = self.manifest[f"{name}_sha256"]
            if recorded != hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest():
                raise PredistillError(
                    f"{self.dir}/{name}.npy: changed since the store was written (sha256 mismatch); rebuild the store"
                )
        domains = self.manifest.get("domains")
        if not isinstance(domains, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str) for d in domains
        ):
            raise PredistillError(
                f"{self.dir}: the manifest's domains are not a list of named domains (corrupted store)"
            )
        if len(self.domain_ids) and (self.domain_ids.min() < 0 or self.domain_ids.max() >= len(domains)):
            raise PredistillError(
                f"{self.dir}/domains.npy: a domain index outside the manifest's {len(domains)} "
                "domains (corrupted store)"
            )
        size = (self.dir / "tokens.bin").stat().st_size
        if size != n_tokens * self.dtype.itemsize:
            raise PredistillError(f"{self.dir}: tokens.bin has {size} bytes, expected {n_tokens * self.dtype.itemsize}")
        # np.memmap refuses empty files; an empty store is legal (e.g. a tiny val split)
        self.tokens = (
            np.memmap(self.dir / "tokens.bin", dtype=self.dtype, mode="r")
            if n_tokens
            else np.zeros(0, dtype=self.dtype)
        )
        self._tokenizer = None
        self._lengths: np.ndarray | None = None
        self._chunk_tokens = self.manifest["chunk_bytes"] // self.dtype.itemsize
        n_chunks = -(-n_tokens // self._chunk_tokens)
        self._chunk_sha256: list[str] = self.manifest["chunk_sha256"]
        if len(self._chunk_sha256) != n_chunks:
            raise PredistillError(
                f"{self.dir}: the manifest lists {len(self._chunk_sha256)} chunk checksums for "
                f"{n_chunks} chunks of tokens.bin (corrupted store)"
            )
        self._verified = np.zeros(n_chunks, dtype=bool)
        self._loss_mask: np.ndarray | None = None  # memory-mapped and checked on first use
        recorded = self.manifest.get("loss_mask_sha256")
        if recorded is not None and not isinstance(recorded, str):
            raise PredistillError(f"{self.dir}: the manifest's loss_mask_sha256 is not a checksum (corrupted store)")
        if recorded is not None and not (self.dir / LOSS_MASK).is_file():
            raise PredistillError(f"{self.dir}: the manifest records a loss mask but {LOSS_MASK} is missing")
        if recorded is not None and (self.dir / LOSS_MASK).stat().st_size != n_tokens:
            raise PredistillError(
                f"{self.dir}/{LOSS_MASK} has {(self.dir / LOSS_MASK).stat().st_size} bytes, "
                f"expected one per token ({n_tokens})"
            )

    def _check_manifest_types(self) -> None:
        """What the reader computes with must be what a writer writes (one-line errors, not tracebacks)."""
        m = self.manifest

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        bad = [k for k in ("n_tokens", "n_instances", "vocab_size", "eos_id") if not is_int(m[k]) or m[k] < 0]
        if not bad and m["vocab_size"] < 1:
            bad.append("vocab_size")
        if not bad and m["dtype"] != token_dtype(m["vocab_size"]).name:
            bad.append("dtype")  # e.g. int16 over uint16 data: ids would read back negative
        chunk_bytes = m["chunk_bytes"]
        if not is_int(chunk_bytes) or chunk_bytes < 1 or (not bad and chunk_bytes % np.dtype(m["dtype"]).itemsize):
            bad.append("chunk_bytes")
        checksums = m["chunk_sha256"]
        if not (isinstance(checksums, list) and all(isinstance(c, str) for c in checksums)):
            bad.append("chunk_sha256")
        bad += [k for k in ("offsets_sha256", "domains_sha256") if not isinstance(m[k], str)]
        if bad:
            raise PredistillError(
                f"{self.dir}: the manifest's {', '.join(bad)} cannot be this store's (corrupted store)"
            )

    def _verify(self, start: int, end: int) -> None:
        """Check the chunks holding tokens [start, end) the first time they are read: their sha256
        against the manifest, and every id inside the vocabulary."""
        first, last = start // self._chunk_tokens, max(end - 1, start) // self._chunk_tokens
        if end <= start or self._verified[first : last + 1].all():
            return
        for c in range(first, last + 1):
            if self._verified[c]:
                continue
            chunk = np.asarray(self.tokens[c * self._chunk_tokens : (c + 1) * self._chunk_tokens])
            if hashlib.sha256(chunk.tobytes()).hexdigest() != self._chunk_sha256[c]:
                raise PredistillError(
                    f"{self.dir}/tokens.bin: chunk {c} changed since the store was written "
                    "(sha256 mismatch); rebuild the store"
                )
            if len(chunk) and int(chunk.max()) >= self.vocab_size:
                raise PredistillError(
                    f"{self.dir}/tokens.bin: token id {int(chunk.max())} in chunk {c} is outside "
                    f"the vocabulary of {self.vocab_size} ids (corrupted store)"
                )
            self._verified[c] = True

    def verify_all(self) -> None:
        """Every chunk now (what reads do lazily), and the loss mask: `predistill verify`."""
        self._verify(0, self.manifest["n_tokens"])
        if self.has_loss_mask and len(self):
            self.loss_mask(0)

    # identity -------------------------------------------------------------------------------
    @property
    def hash(self) -> str:
        return self.manifest["store_hash"]

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def domain_names(self) -> list[str]:
        return [d["name"] for d in self.manifest["domains"]]

    # access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        # computed once: per-step callers (train's target count) index it, and np.diff over the
        # offsets is O(corpus) — 0.18 s a step at 49M instances
        if self._lengths is None:
            self._lengths = np.diff(self.offsets)
            self._lengths.flags.writeable = False
        return self._lengths

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"instance {i} out of range for a store of {len(self)}")
        i %= len(self)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        self._verify(start, end)
        return self.tokens[start:end]

    @property
    def has_loss_mask(self) -> bool:
        return self.manifest.get("loss_mask_sha256") is not None

    def refuse_if_masked(self, what: str) -> None:
        """A copy in other ids or another layout (re-tokenised, re-cut, exported) cannot carry the
        loss mask, whose bytes mark this store's token positions: refuse rather than drop it."""
        if self.has_loss_mask:
            raise PredistillError(
                f"{self.dir} carries a loss mask (`predistill sft-data`): {what} would drop it and train on "
                "every token; run `predistill sft-data` with the tokenizer you need instead"
            )

    def loss_mask(self, i: int) -> np.ndarray:
        """Instance i's targets (uint8 per token, 1 = trained on); a store without a mask: all ones."""
        if not self.has_loss_mask:
            return np.ones(int(self.lengths[i]), dtype=np.uint8)
        if self._loss_mask is None:
            path = self.dir / LOSS_MASK
            if sha256_file(path) != self.manifest["loss_mask_sha256"]:
                raise PredistillError(
                    f"{path}: changed since the store was written (sha256 mismatch); rebuild the store"
                )
            self._loss_mask = (
                np.memmap(path, dtype=np.uint8, mode="r") if self.manifest["n_tokens"] else np.zeros(0, dtype=np.uint8)
            )
        i %= len(self)
        return self._loss_mask[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def batch(self, ids, max_len: int | None = None, pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Instances `ids` as a right-padded LongTensor [B, L] and their lengths [B].

        `max_len` truncates longer instances; padding uses `pad_id` (default EOS) and must be
        masked by the caller using the lengths.
        """
        import torch

        rows = [self[int(i)][:max_len] for i in ids]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        out = torch.full(
            (len(rows), int(lengths.max()) if rows else 0), self.eos_id if pad_id is None else pad_id, dtype=torch.long
        )
        for row, r in enumerate(rows):
            out[row, : len(r)] = torch.from_numpy(r.astype(np.int64))
        return out, lengths

    def iter_batches(self, batch_size: int, ids=None, max_len: int | None = None):
        """Yield `(ids, tokens, lengths)` over `ids` (default: every instance) in order."""
        ids = np.arange(len(self)) if ids is None else np.asarray(ids)
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            yield (chunk, *self.batch(chunk, max_len))

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = saved_tokenizer.load_dir(self.dir / "tokenizer")
        return self._tokenizer

    def decode(self, i: int) -> str:
        """Instance i as text, exactly: EOS tokens are kept and no spaces are "cleaned up", so
        encoding the text again (without special tokens added) gives back the instance's ids."""
        return self.tokenizer().decode(self[i].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_same_store(expected_hash: str, store: TokenStore, what: str) -> None:
    """Refuse an artifact made from another token store, naming both hashes."""
    if expected_hash != store.hash:
        raise PredistillError(
            f"{what} was made from token store {expected_hash[:12]}, but {store.dir} is {store.hash[:12]}"
        )
