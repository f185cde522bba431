"""Token-level selection: which target positions of an instance the LM loss trains on.

MiniPLM's Difference Sampling chooses *instances* by mean log p_teacher − mean log p_reference;
`difference` applies the same score per token — log p_teacher(x_t+1 | x_≤t) − log p_ref(x_t+1 | x_≤t),
read from the two models' token records (`score --token-record`) — and keeps the top `fraction` of
each instance's target positions. `random` keeps a seeded random subset of the same size: the
control that says whether the score, not the smaller number of trained tokens, made a difference.

Selection is per instance (⌈fraction · n⌉ of its n trained positions, at least one; ties to the
earlier position), never per batch, so any split of a batch into ranks and micro-batches trains on
the same tokens and normalises by the same count. The forward and backward still run over every
token: FLOPs are those of an unselected run (the scoring passes' FLOPs are in their score tables).
"""

from __future__ import annotations

import math

import numpy as np

from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import TokenRecord

RULES = ("difference", "random")
RECENT = 4096  # masks kept: a few global batches' worth, never the corpus


def n_kept(n: int, fraction: float) -> int:
    """Positions kept of an instance's `n` trained ones: ⌈fraction · n⌉, at least one (none of none)."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n else 0


def top_positions(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the `k` highest scores (ties to the earlier position; NaN ranks last)."""
    n = len(score)
    order = np.lexsort((np.arange(n), -np.nan_to_num(score, nan=0.0), np.isnan(score)))  # last key first
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    return keep


class TokenSelection:
    """The positions `train --token-rule` keeps, per instance (see the module doc)."""

    def __init__(
        self,
        rule: str,
        fraction: float,
        seed: int,
        store: TokenStore,
        teacher_record: str | None = None,
        reference_record: str | None = None,
    ):
        if rule not in RULES:
            raise PredistillError(f"unknown --token-rule {rule!r}; known: {', '.join(RULES)}")
        self.rule, self.fraction, self.seed = rule, fraction, seed
        self._recent: dict[tuple[int, int], np.ndarray] = {}  # the last RECENT instances' masks
        self.teacher = self.reference = None
        if rule == "difference":
            if not (teacher_record and reference_record):
                raise PredistillError("--token-rule difference needs --teacher-record and --reference-record")
            # each refuses a record of another token store, naming both hashes
            self.teacher, self.reference = TokenRecord(teacher_record, store), TokenRecord(reference_record, store)

    def keep(self, i: int, n: int) -> np.ndarray:
        """Boolean [n]: which of instance i's first n target positions the loss trains on (computed
        once per instance and step: the global target count and the rank's batch both ask)."""
        key = (i, n)
        if key not in self._recent:
            if len(self._recent) >= RECENT:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = self._keep(i, n)
        return self._recent[key]

    def _keep(self, i: int, n: int) -> np.ndarray:
        k = n_kept(n, self.fraction)
        if self.rule == "random":
            keep = np.zeros(n, dtype=bool)
            keep[np.random.default_rng([self.seed, i]).permutation(n)[:k]] = True
            return keep
        assert self.teacher is not None and self.reference is not None  # opened for `difference`
        return top_positions(self.teacher.instance(i)[0][:n] - self.reference.instance(i)[0][:n], k)

    def describe(self) -> dict:
        """What the run manifest records of the selection."""
        records = {
            name: {"model": r.manifest["model"], "shards_sha256": [s["sha256"] for s in r.manifest["shards"]]}
            for name, r in (("teacher", self.teacher), ("reference", self.reference))
            if r is not None
        }
        return {"rule": self.rule, "fraction": self.fraction, "records": records}
