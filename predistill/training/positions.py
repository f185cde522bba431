"""Choosing positions: which target positions of an instance the loss trains on (`TokenSelection`,
`train --token-rule`), and at which a position-selected logits store keeps the teacher's
distribution (`PositionChoice`, `score --logits-positions`, `select-positions`).

MiniPLM's Difference Sampling chooses *instances* by mean log p_teacher − mean log p_reference;
`difference` applies the same score per token — log p_teacher(x_t+1 | x_≤t) − log p_ref(x_t+1 | x_≤t),
read from the two models' token records (`score --token-record`) — and keeps the top `fraction` of
each instance's target positions. `random` keeps a seeded random subset of the same size: the
control that says whether the score, not the smaller number of trained tokens, made a difference.

Selection is per instance (⌈fraction · n⌉ of its n trained positions, at least one; ties to the
earlier position), never per batch, so any split of a batch into ranks and micro-batches trains on
the same tokens and normalises by the same count. The forward and backward still run over every
token: FLOPs are those of an unselected run (the scoring passes' FLOPs are in their score tables).

`train --kd-positions student-entropy` is SE-KD's choice (arXiv 2602.01395): the KD term only at
the top fraction of each instance's positions by the *student's* entropy, chosen in each step from a
no-grad pass over its head (counted in FLOPs), the LM term at every position (`top_per_row`).

`excess` is RHO-1's rule (arXiv 2404.07965): the top fraction by the student's *current* loss minus
the reference's, L_θ(x_t+1) − L_ref(x_t+1) = −log p_θ + log p_ref, chosen inside each step from a
no-grad pass over the student's head before the loss (`excess_mask`); RHO-1 takes the top k% of a
batch, this takes it per instance for the reason above. The extra head pass (2·H·V FLOPs per token)
is counted in the run's FLOPs.

A position-selected store keeps ⌈fraction · n⌉ of each instance's n positions: the highest teacher
entropy (`entropy`: where the teacher's distribution says most beyond the next token — SE-KD's
choice, arXiv 2602.01395, made with the teacher because an offline store has no student yet), the
highest log p_teacher − log p_ref (`difference`), or at random (`random`, the control). The teacher's
values are taken as its token record stores them (float16), so a choice made in the scoring pass and
one made afterwards from the record (`select-positions`) keep the same positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from predistill.core.artifacts import PredistillError
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import DTYPE, TokenRecord

RULES = ("difference", "excess", "random")
KD_POSITION_RULES = ("student-entropy",)  # train --kd-positions: where the KD term applies, chosen in the step
DURING_STEP = ("excess",)  # rules that read the student's own per-token loss, so choose inside the step
STORE_RULES = ("entropy", "difference", "random")
RECENT = 4096  # masks kept: a few global batches' worth, never the corpus


def check_token_rule(rule: str | None, fraction: float, teacher_record: str | None, reference_record: str | None):
    """The records a token rule reads, and only those (`train --token-rule`; one line each)."""
    if fraction < 1 and not rule:
        raise PredistillError("--token-fraction < 1 needs a --token-rule (difference, excess or random)")
    if rule is not None and rule not in RULES:
        raise PredistillError(f"unknown --token-rule {rule!r}; known: {', '.join(RULES)}")
    if rule == "difference" and not (teacher_record and reference_record):
        raise PredistillError("--token-rule difference needs --teacher-record and --reference-record")
    if rule == "excess" and not reference_record:
        raise PredistillError("--token-rule excess needs --reference-record")
    if teacher_record and rule != "difference":
        raise PredistillError("--teacher-record is read by --token-rule difference only")
    if reference_record and rule not in ("difference", "excess"):
        raise PredistillError("--reference-record is read by --token-rule difference and excess only")


def n_kept(n: int, fraction: float) -> int:
    """Positions kept of an instance's `n` trained ones: ⌈fraction · n⌉, at least one (none of none)."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n else 0


def random_positions(seed: int, i: int, n: int, k: int) -> np.ndarray:
    """Boolean mask of `k` of instance i's `n` positions, drawn by a generator seeded by (seed, i)."""
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng([seed, i]).permutation(n)[:k]] = True
    return keep


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
        check_token_rule(rule, fraction, teacher_record, reference_record)
        self.rule, self.fraction, self.seed = rule, fraction, seed
        self._recent: dict[tuple[int, int], np.ndarray] = {}  # the last RECENT instances' masks
        # each record refuses one of another token store, naming both hashes
        self.teacher = TokenRecord(teacher_record, store) if teacher_record else None
        self.reference = TokenRecord(reference_record, store) if reference_record else None

    @property
    def during_step(self) -> bool:
        """Chosen inside the step from the student's own loss (`excess_mask`), not ahead (`keep`)."""
        return self.rule in DURING_STEP

    def count(self, i: int, trained: np.ndarray) -> int:
        """How many of instance i's trained positions (`trained`, a mask) the loss takes."""
        if self.during_step:
            return n_kept(int(np.count_nonzero(trained)), self.fraction)
        return int(np.count_nonzero(self.keep(i, len(trained)) & trained))

    def reference_logprobs(self, i: int, n: int) -> np.ndarray:
        """The reference's log p(x_t+1 | x_≤t) at instance i's first n positions (the excess rule)."""
        assert self.reference is not None  # opened for `excess` and `difference`
        return self.reference.instance(i)[0][:n]

    def keep(self, i: int, n: int) -> np.ndarray:
        """Boolean [n]: which of instance i's first n target positions the loss trains on (computed
        once per instance and step: the global target count and the rank's batch both ask). Rules
        chosen during the step keep every position here."""
        if self.during_step:
            return np.ones(n, dtype=bool)
        key = (i, n)
        if key not in self._recent:
            if len(self._recent) >= RECENT:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = self._keep(i, n)
        return self._recent[key]

    def _keep(self, i: int, n: int) -> np.ndarray:
        k = n_kept(n, self.fraction)
        if self.rule == "random":
            return random_positions(self.seed, i, n, k)
        assert self.teacher is not None and self.reference is not None  # opened for `difference`
        return top_positions(self.teacher.instance(i)[0][:n] - self.reference.instance(i)[0][:n], k)

    def describe(self) -> dict:
        """What the run manifest records of the selection."""
        records = {
            name: record_of(r)
            for name, r in (("teacher", self.teacher), ("reference", self.reference))
            if r is not None
        }
        return {"rule": self.rule, "fraction": self.fraction, "records": records}


def excess_mask(
    nll: torch.Tensor, reference_logprob: torch.Tensor, mask: torch.Tensor, fraction: float
) -> torch.Tensor:
    """RHO-1's choice, per row: the top positions by excess loss nll − (−log p_ref) (`top_per_row`)."""
    return top_per_row(nll.float() + reference_logprob.float(), mask, fraction)


def top_per_row(score: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row: of the positions `mask` marks (m of them), the ⌈fraction · m⌉ (at least one) with the
    highest `score` (ties to the earlier position; NaN ranks last) — `n_kept` and `top_positions`
    applied to each row's masked positions."""
    mask = mask.bool()
    score = score.float().masked_fill(~mask, 0.0)
    missing = torch.isnan(score)
    # lexicographic order by stable sorts, last key first: masked-in, then not NaN, then score, then position
    order = torch.sort(score.nan_to_num(0.0), dim=1, descending=True, stable=True).indices
    for key in (missing, ~mask):
        order = order.gather(1, torch.sort(key.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    m = mask.sum(dim=1)
    k = torch.where(m > 0, torch.ceil(fraction * m - 1e-9).clamp(min=1).minimum(m), m)
    ranks = torch.arange(mask.shape[1], device=mask.device).expand_as(order)
    return torch.zeros_like(mask).scatter(1, order, ranks < k[:, None])


def record_values(rows: np.ndarray) -> np.ndarray:
    """(log-prob, entropy) rows [n, 2] as a token record holds them: rounded to its float16."""
    return np.asarray(rows).astype(DTYPE).astype(np.float32)


def record_of(record: TokenRecord) -> dict:
    """What a manifest records of a token record a choice read: its model and its shards' hashes."""
    return {"model": record.manifest["model"], "shards_sha256": [s["sha256"] for s in record.manifest["shards"]]}


class PositionChoice:
    """The positions at which a position-selected logits store keeps a distribution (module doc)."""

    def __init__(self, rule: str, fraction: float, seed: int = 0, reference: TokenRecord | None = None):
        if rule not in STORE_RULES:
            raise PredistillError(f"unknown position rule {rule!r}; known: {', '.join(STORE_RULES)}")
        if not 0 < fraction <= 1:
            raise PredistillError(f"the kept fraction of positions must be in (0, 1], got {fraction}")
        if (rule == "difference") != (reference is not None):
            raise PredistillError(
                "the difference rule needs the reference model's token record of the store"
                if rule == "difference"
                else f"a reference token record is read by the difference rule only, not by {rule!r}"
            )
        self.rule, self.fraction, self.seed, self.reference = rule, fraction, seed, reference

    @property
    def needs_teacher(self) -> bool:
        """Whether `keep` reads the teacher's per-position values (every rule but `random`)."""
        return self.rule != "random"

    def keep(self, i: int, n: int, teacher: np.ndarray | None = None) -> np.ndarray:
        """Boolean [n]: the positions of instance i (of n) that keep a distribution. `teacher`:
        its (log-prob, entropy) rows [n, 2] as the teacher's token record holds them."""
        k = n_kept(n, self.fraction)
        if self.rule == "random":
            return random_positions(self.seed, i, n, k)
        if teacher is None or teacher.shape != (n, 2):
            raise PredistillError(
                f"instance {i}: the {self.rule} rule needs the teacher's {n} (log-prob, entropy) rows"
            )
        if self.rule == "entropy":
            return top_positions(teacher[:, 1], k)
        assert self.reference is not None  # checked in __init__
        reference = self.reference.instance(i)[0]
        if len(reference) != n:
            raise PredistillError(f"instance {i}: the reference record has {len(reference)} positions, not {n}")
        return top_positions(teacher[:, 0] - reference, k)

    def describe(self) -> dict:
        """What a position-selected store's manifest records as `positions`."""
        out: dict = {"rule": self.rule, "fraction": self.fraction}
        if self.rule == "random":
            out["seed"] = self.seed
        if self.reference is not None:
            out["reference"] = record_of(self.reference)
        return out
