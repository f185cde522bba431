"""The selection: which instances of a token store a student trains on. Defined here and nowhere
else (written by `predistill sample`, read by `train`, `generate` and `sample --materialize`).

    SELECTION/
      selection.npy      int64, the kept instance ids into the token store, strictly ascending
      scores.npy         float32 [N], the score the method ranked by
      proxy_subset.npy   (proxy only) structured rows id/teacher/reference of the proxy's training subset
      report.md, *_hist.png   what a user reads before trusting the selection
      manifest.json      format "selection", config, store hash, score-table hashes, counts,
                         per-domain keep rates, `selection_sha256`, proxy statistics; complete last

A selection is a view: the ids index the token store whose hash the manifest records, or an
instance-aligned re-tokenisation of it (`prepare --source store:DIR`: instance i spells the same
text, and the store records DIR's hash as `derived_from`), so students with their own tokenizer
train on the same selected text; `load_selection` refuses it for any other store.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from predistill.core.artifacts import PredistillError, read_manifest, sha256_file
from predistill.formats.store import TokenStore, check_same_store

FORMAT = "selection"
VERSION = 1
IDS_FILE = "selection.npy"


def top_fraction(scores: np.ndarray, ratio: float) -> np.ndarray:
    """The ⌊ratio·N⌋ highest-scoring positions, ascending (corpus order).

    One global descending sort; ties go to the lower position; NaN ranks below everything."""
    scores = np.asarray(scores, dtype=np.float64)
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((np.arange(len(scores)), -keyed))  # primary: score descending; then position
    keep = math.floor(ratio * len(scores))
    return np.sort(order[:keep]).astype(np.int64)


def read_selection_manifest(directory: str | Path) -> dict:
    return read_manifest(directory, FORMAT, "selection")


def _aligned_retokenisation(store: TokenStore, store_hash) -> bool:
    """Is `store` the instance-by-instance re-tokenisation of the store with hash `store_hash`?"""
    derived = store.manifest.get("derived_from")
    return isinstance(derived, dict) and isinstance(store_hash, str) and derived.get("hash") == store_hash


def load_selection(directory: str | Path, store: TokenStore | None = None) -> np.ndarray:
    """The kept instance ids of a complete selection (int64, strictly ascending), after every check:
    the file is the one the manifest's sha256 vouches for, a 1-D integer array of unique ids,
    non-empty, and — given `store` — made from that store and inside it."""
    directory = Path(directory)
    manifest = read_selection_manifest(directory)
    n_instances = manifest.get("n_instances")  # how many the store had; the store itself says so when given
    if not (
        isinstance(manifest.get("selection_sha256"), str)
        and isinstance(manifest.get("store_hash"), str)
        and (
            n_instances is None
            or isinstance(n_instances, int)
            and not isinstance(n_instances, bool)
            and n_instances >= 0
        )
    ):
        raise PredistillError(
            f"{directory / 'manifest.json'}: selection_sha256 and store_hash must be strings, "
            "n_instances a count (corrupted selection)"
        )
    path = directory / IDS_FILE
    if not path.is_file() or sha256_file(path) != manifest.get("selection_sha256"):
        raise PredistillError(f"{path}: missing or changed since the selection was made; rerun sample")
    if store is not None and not _aligned_retokenisation(store, manifest.get("store_hash")):
        check_same_store(manifest.get("store_hash", ""), store, f"selection {directory}")
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise PredistillError(f"{path}: unreadable ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise PredistillError(f"{path}: expected a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
    if len(ids) == 0:
        raise PredistillError(f"selection {directory} keeps no instance")
    ids = ids.astype(np.int64)
    if np.any(np.diff(ids) <= 0):
        raise PredistillError(f"{path}: ids are not unique and ascending; rerun sample")
    n = manifest.get("n_instances") if store is None else len(store)
    if ids[0] < 0 or (n is not None and ids[-1] >= n):
        raise PredistillError(f"selection {directory} has ids outside the store's {n} instances")
    return ids
