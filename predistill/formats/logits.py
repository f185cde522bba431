"""The logits store: a teacher's retained next-token distribution at every token position.

Defined here and nowhere else (format, truncation, sampling, encoding, writer, reader).

What is stored (PD, arXiv 2410.16215 §3.2; RS-KD, arXiv 2503.16870)
-----------------------------------------------------------------------
For instance `i` of a token store and position `t` (0 ≤ t < len_i − 1; the distribution over the
token at t+1 given tokens ≤ t) the store holds a variable number of *entries*:

- mode `topk` — the paper's top-p-then-top-k truncation: sort the teacher's full-vocabulary
  log-probs descending (ties: lower id first), keep the smallest prefix whose probability mass is
  ≥ `top_p` (mass within `P_SLACK` of p counts as reaching it, so fp32 rounding of e.g. 0.25+0.25
  cannot add an entry), then at most `top_k` of them. Each entry: token id + the teacher's
  full-vocabulary log-prob (not renormalised: 1 − Σ exp is the dropped tail mass).
- mode `sample` — RS-KD: `samples` draws with replacement from the teacher distribution (at
  `sample_temperature`), stored as unique ids (ascending) with counts. At temperature 1 the
  empirical distribution count/N is an unbiased estimate of p. At temperature T ≠ 1 the draws come
  from q ∝ p^(1/T) and the store also keeps log p of the drawn ids, so the reader returns the
  self-normalised importance weights w ∝ count·p/q (consistent, not exactly unbiased). Draws are a
  pure function of (seed, global position) through a counter-based hash: shards are reproducible
  whatever the batch composition.

Position-selected stores (version 3)
------------------------------------
A store may keep a distribution at only some positions of each instance (`LogitsStoreWriter(...,
positions={...})`; which positions is the writer's caller's choice, recorded as the manifest's
`positions`: e.g. the top fraction by teacher entropy, `predistill.training.positions`). Such a store
is version 3: each shard adds a `kept` section, one bit per position of its instances (1: the
position holds entries), and every other stream covers the kept positions only. A reader returns
no entries (a fully masked row) at a position that was not kept; `train` then takes the data's next
token as the KD target there (`predistill.training.distill.data_elsewhere`).
`bytes_per_token` stays averaged over *all* positions; `n_distilled_positions` counts the kept ones.

Encoding (per shard, little-endian bit streams; version 2)
-----------------------------------------------------------
- ids: Huffman-coded per shard (`predistill.formats.entropy`) as symbols: 0 when the id is the position's
  next token (the teacher's entries often hold it), 1 + rank for the `ID_DIRECT` − 2 ids the token
  store uses most (the ranking is `id_order.bin`, one file per store), else an escape followed by
  the raw id. Each instance's first bit is kept (`ids_inst_bits`), so instances decode alone;
- log-probs: `logprob_bits`-bit unsigned codes, uniform over [`logprob_min`, 0]:
  code = round((clip(lp, lo, 0) − lo)/step), step = −lo/(2^bits − 1); decoded lp is within step/2
  of the teacher's for lp ≥ lo (the manifest states the bound and how many values were clipped);
- entries per position: n−1 in ⌈log2 top_k⌉ bits (topk); in sample mode none are stored: a
  position's counts sum to `samples`, so its entries end where the running sum of counts does;
- counts (sample mode): c−1, Huffman-coded per shard like the ids (`counts_inst_bits`);
- positions per instance: not stored, the token store's lengths − 1.
A value j of a b-bit stream occupies bits [j·b, (j+1)·b) of the stream, least significant bit first,
so the 8/16/32-bit cases are plain little-endian integer arrays. Every stream is followed by 8 zero
bytes so that random access can always read an 8-byte window. Version 1 stores (ids in ⌈log2 V⌉
bits, counts in ⌈log2 samples⌉ bits, no ranking) are still read.

On disk
-------
    LDIR/
      writer.json          settings fixed at the first run (a resumed run must match them)
      id_order.bin         v2: the ranked ids (uint32, most frequent first; sha256 in the manifest)
      shards/NNNNN.bin     instances [N·S, (N+1)·S): sections listed in the marker
      shards/NNNNN.json    completion marker: sections (byte offset, length), counts, sha256
      manifest.json        format "logits_store", version, store_hash, tokenizer_hash, config,
                           encoding (bits, quantisation step and error bound), n_instances,
                           n_positions, n_entries, total_bytes, bytes_per_token, complete (last)
Shard sections: `inst_entry_offsets` (int64, n_inst+1, shard-local), `n_entries` (topk), `ids`
(+ `ids_code`, the code lengths, and `ids_inst_bits`), `logprobs` (when stored), `counts` (sample
mode; + `counts_code`, `counts_inst_bits`); version 1 also has `inst_position_offsets` and
`n_entries` in sample mode.

A shard's .bin is written to a temporary name and renamed, then its marker is written: a killed
writer resumes by skipping shards that have a marker, and given the same teacher outputs every shard
is byte-identical on a rerun. `bytes_per_token` = (shard bytes + id_order.bin) / n_positions.

Use
---
Writing, as a consumer of a teacher forward pass (e.g. `predistill score --logits-out`)::

    writer = LogitsStoreWriter(ldir, store, LogitsConfig(...), vocab_size=lm_head.weight.shape[0],
                               teacher="smollm2-135m")
    todo = writer.todo_instances()                # instances of unfinished shards, ascending
    for ids, tokens, lengths in store.iter_batches(bs, ids=todo):
        hidden = model.model(tokens, attention_mask=...).last_hidden_state     # [B, L, H]
        writer.add_hidden(ids, hidden, lm_head.weight, tokens, lengths)
    manifest = writer.finish()

For byte-identical reruns feed whole shards in a fixed batching (e.g. a batch size dividing
`shard_instances`): entries are a pure function of the teacher's outputs, which a BLAS may round
differently in another batch composition. Online logits (a model saving its own store while it
trains): call `add_hidden` (or `add_logits`) with the training batch under `torch.no_grad()`; the
first sighting of an instance wins, later ones are ignored; feed `todo_instances()` at the end if the
run did not see every instance.

Reading, in the training loop::

    logits = LogitsStore(ldir, store)             # refuses a store with another hash
    targets = logits.read_batch(instance_ids, L)  # TeacherTargets, tensors [B, L, Kmax]
    loss, per_position = predistill.training.kd.kd_loss(student_hidden, lm_head.weight, targets, kd_cfg,
                                               position_mask)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from predistill.core.artifacts import (
    COUNT,
    MANIFEST,
    NUMBER,
    PredistillError,
    check_fields,
    check_plan,
    parse_json,
    read_manifest,
    read_marker,
    sha256_file,
    write_bytes_atomic,
    write_manifest,
    write_shard,
)
from predistill.core.config import option
from predistill.formats import entropy
from predistill.formats.store import TokenStore, check_same_store

FORMAT = "logits_store"
VERSION = 2  # 2: ids and counts entropy-coded; version 1 stores (fixed-width streams) stay readable
SELECTED_VERSION = 3  # version 2 with a `kept` bit per position: a position-selected store
READABLE_VERSIONS = (1, 2, 3)
ID_DIRECT = 4096  # v2 id symbols: 0 = the next token, 1 + frequency rank for the 4094 most frequent ids, escape
ID_ORDER_FILE = "id_order.bin"  # v2: the ranked ids, uint32, most frequent first (in total_bytes)
MODES = ("topk", "sample")
P_SLACK = 1e-6  # probability mass within this of top_p counts as reaching it (fp32 rounding)
WINDOW_PAD = 8  # zero bytes after every bit stream: random access reads 8-byte windows
DEFAULT_CHUNK_ROWS = 1024
WRITER_FILE = "writer.json"
DEFAULT_SHARD_INSTANCES = 256


@dataclass
class LogitsConfig:
    """What a logits store keeps and how it encodes it (saved in the manifest)."""

    # RS-KD with 8 draws is the default: in bench/bench_pd_curve.py it gave the best student per
    # byte (≈ 12 B/token; docs/logits.md). top-p-k is PD's own truncation (`mode="topk"`).
    mode: str = option(
        "sample", "sample: RS-KD draws with counts; topk: top-p-then-top-k entries", key="logits_mode", choices=MODES
    )
    top_p: float = option(0.95, "topk: probability mass kept", interval="(0, 1]")
    # worst case 5·(16+8)+3 bits ≈ 15.4 B/token at V ≤ 65 536 (docs/logits.md)
    top_k: int = option(5, "topk: at most this many entries", interval="[1, inf)")
    samples: int = option(8, "sample: draws per position", interval="[1, inf)")
    sample_temperature: float = option(
        1.0, "sample: draw from softmax(z/T); T ≠ 1 also stores log-probs", interval="(0, inf)"
    )
    sample_logprobs: bool = option(False, "sample: store log-probs of the drawn ids at T = 1 too")
    seed: int = option(
        0,
        "sample: seed of the draws (a function of seed and global position)",
        key="sample_seed",
        interval="[0, 4294967295]",
    )
    logprob_bits: int = option(8, "bits per stored log-prob", interval="[2, 32]")
    logprob_min: float = option(-12.0, "quantisation range [MIN, 0]; lower log-probs are clipped", interval="(-inf, 0)")
    # None: the writer's caller decides (score: its --shard-size), else DEFAULT_SHARD_INSTANCES
    shard_instances: int | None = option(
        None,
        "instances per logits shard; with score, a multiple of --shard-size (default: --shard-size)",
        key="logits_shard_size",
        interval="[1, inf)",
    )

    def validate(self) -> LogitsConfig:
        if self.mode not in MODES:
            raise PredistillError(f"logits mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.top_p <= 1:
            raise PredistillError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.top_k <= 65535:
            raise PredistillError(f"--top-k must be in [1, 65535], got {self.top_k}")
        if not 1 <= self.samples <= 65535:
            raise PredistillError(f"--samples must be in [1, 65535], got {self.samples}")
        if not self.sample_temperature > 0:
            raise PredistillError(f"sampling temperature must be > 0, got {self.sample_temperature}")
        if not 2 <= self.logprob_bits <= 32:
            raise PredistillError(f"logprob bits must be in [2, 32], got {self.logprob_bits}")
        if not self.logprob_min < 0:
            raise PredistillError(f"logprob_min must be < 0, got {self.logprob_min}")
        if self.shard_instances is not None and self.shard_instances < 1:
            raise PredistillError(f"shard_instances must be ≥ 1, got {self.shard_instances}")
        return self

    @property
    def stores_logprobs(self) -> bool:
        return self.mode == "topk" or self.sample_logprobs or self.sample_temperature != 1.0

    @property
    def logprob_step(self) -> float:
        return -self.logprob_min / ((1 << self.logprob_bits) - 1)

    @property
    def max_entries(self) -> int:
        return self.top_k if self.mode == "topk" else self.samples


def bits_for(n_values: int) -> int:
    """Bits that hold every value in [0, n_values)."""
    return max(0, int(n_values - 1).bit_length())


# ------------------------------------------------------------------------------------------------
# entries: variable-length per position
# ------------------------------------------------------------------------------------------------
@dataclass
class Entries:
    """Retained entries of P positions, flattened: position j owns entries [off[j], off[j]+n[j])."""

    n: np.ndarray  # [P] int64, ≥ 1
    ids: np.ndarray  # [E] int64
    logprobs: np.ndarray | None  # [E] float32, the teacher's full-vocabulary log-probs
    counts: np.ndarray | None  # [E] int64, sample mode

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n)]).astype(np.int64)

    def split(self, positions_per_part: Sequence[int] | np.ndarray) -> list[Entries]:
        """Cut into consecutive parts of the given numbers of positions."""
        parts, off = [], self.offsets
        p = 0
        for k in positions_per_part:
            a, b = off[p], off[p + k]
            parts.append(
                Entries(
                    self.n[p : p + k],
                    self.ids[a:b],
                    None if self.logprobs is None else self.logprobs[a:b],
                    None if self.counts is None else self.counts[a:b],
                )
            )
            p += k
        return parts

    def at(self, keep: np.ndarray) -> Entries:
        """The entries of the positions `keep` (bool [P]) marks, in order."""
        if len(self.n) != len(keep):
            raise PredistillError(f"{len(self.n)} positions of entries for a mask of {len(keep)}")
        chosen = keep[np.repeat(np.arange(len(keep)), self.n)]
        return Entries(
            self.n[keep],
            self.ids[chosen],
            None if self.logprobs is None else self.logprobs[chosen],
            None if self.counts is None else self.counts[chosen],
        )

    @staticmethod
    def empty(cfg: LogitsConfig) -> Entries:
        return Entries(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32) if cfg.stores_logprobs else None,
            np.zeros(0, np.int64) if cfg.mode == "sample" else None,
        )

    @staticmethod
    def concat(parts: Sequence[Entries], cfg: LogitsConfig) -> Entries:
        """Concatenate positions; `cfg` fixes which fields exist (even when `parts` is empty)."""
        parts = [Entries.empty(cfg), *parts]
        return Entries(
            np.concatenate([e.n for e in parts]).astype(np.int64),
            np.concatenate([e.ids for e in parts]).astype(np.int64),
            np.concatenate([e.logprobs for e in parts]).astype(np.float32) if cfg.stores_logprobs else None,
            np.concatenate([e.counts for e in parts]).astype(np.int64) if cfg.mode == "sample" else None,
        )


def _fp32_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def truncate_top_p_k(logits: torch.Tensor, top_p: float, top_k: int) -> Entries:
    """Top-p-then-top-k entries of each row of `logits` [N, V] (logits or log-probs).

    Order within a position: log-prob descending, ties by lower id. The top-p cut is taken on the
    fp64 cumulative sum of the sorted fp32 probabilities.
    """
    lp = _fp32_logprobs(logits)
    n_rows, vocab = lp.shape
    k = min(top_k, vocab)
    if n_rows == 0:
        return Entries(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), None)
    # topk is ~20× cheaper than a full sort; it is exact unless a tie straddles the k-th place,
    # where it may pick a higher id than a stable sort would: redo those (rare) rows with one.
    probe = min(k + 1, vocab)
    values, ids = torch.topk(lp, probe, dim=1, sorted=True)
    ids_sorted, order = torch.sort(ids[:, :k], dim=1)  # ids ascending, then a stable value sort
    vals = values[:, :k].gather(1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    ids = ids_sorted.gather(1, order)
    if probe > k:
        tied = torch.nonzero(values[:, k - 1] == values[:, k]).flatten()
        if len(tied):
            full_vals, full_ids = torch.sort(lp[tied], dim=1, descending=True, stable=True)
            vals[tied], ids[tied] = full_vals[:, :k], full_ids[:, :k]
    cum = torch.cumsum(vals.double().exp(), dim=1)
    n = 1 + (cum[:, : k - 1] < top_p - P_SLACK).sum(dim=1)
    keep = torch.arange(k, device=lp.device)[None, :] < n[:, None]
    return Entries(
        n.cpu().numpy().astype(np.int64),
        ids[keep].cpu().numpy().astype(np.int64),
        vals[keep].cpu().numpy().astype(np.float32),
        None,
    )


# counter-based hashing (splitmix64): a draw is a pure function of (seed, position, draw index)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seed: int, positions: np.ndarray, n_draws: int) -> np.ndarray:
    """[P, n_draws] float64 uniforms in [0, 1), one independent stream per global position."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + np.asarray(positions, np.uint64))
        draws = _splitmix64(key[:, None] + np.arange(n_draws, dtype=np.uint64)[None, :] * _GOLDEN)
    return (draws >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_entries(
    logits: torch.Tensor,
    samples: int,
    positions: np.ndarray,
    seed: int = 0,
    temperature: float = 1.0,
    keep_logprobs: bool = False,
) -> Entries:
    """RS-KD entries: `samples` draws per row of `logits` [N, V] from softmax(logits/T).

    `positions` [N] are global position keys (see `global_positions`): the draws of a row depend on
    (seed, its key) only. Entries are the unique drawn ids (ascending) with their counts.
    """
    lp = _fp32_logprobs(logits)
    n_rows, vocab = lp.shape
    if n_rows == 0:
        return Entries(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.float32) if keep_logprobs else None,
            np.zeros(0, np.int64),
        )
    q = lp if temperature == 1.0 else torch.log_softmax(lp / temperature, dim=1)
    cdf = torch.cumsum(q.exp(), dim=1)
    # fp32 uniforms strictly below 1, so a draw never lands past the last non-zero probability
    u = torch.from_numpy(uniforms(seed, positions, samples)).float().clamp_(max=1 - 2**-24).to(cdf.device) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)
    draws, _ = torch.sort(draws, dim=1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    starts = torch.nonzero(first.flatten()).flatten()
    counts = torch.diff(starts, append=torch.tensor([draws.numel()], device=starts.device))
    ids = draws.flatten()[starts]
    n = first.sum(dim=1)
    logprobs = None
    if keep_logprobs:
        rows = torch.repeat_interleave(torch.arange(n_rows, device=lp.device), n)
        logprobs = lp[rows, ids].cpu().numpy().astype(np.float32)
    return Entries(
        n.cpu().numpy().astype(np.int64),
        ids.cpu().numpy().astype(np.int64),
        logprobs,
        counts.cpu().numpy().astype(np.int64),
    )


THIN_SALT = 0x7468696E  # "thin": the subsample's uniforms are a stream of their own, not the draws'


def thin_draws(entries: Entries, samples: int, keep: int, positions: np.ndarray, seed: int = 0) -> Entries:
    """RS-KD entries of `samples` draws per position cut to `keep` draws: a uniform subsample without
    replacement of each position's draws, keyed by (seed, global position) like the draws themselves.
    `keep` of `samples` i.i.d. draws chosen at random are `keep` i.i.d. draws, so the result is what a
    `keep`-draw store estimates (other draws than a pass with `--samples keep` would make)."""
    if entries.counts is None:
        raise PredistillError("only a sample-mode (RS-KD) store's draws can be thinned")
    if not 1 <= keep <= samples:
        raise PredistillError(f"cannot keep {keep} of {samples} draws per position")
    rows = len(entries.n)
    if keep == samples or rows == 0:
        return entries
    if int(entries.counts.sum()) != rows * samples:
        raise PredistillError(
            f"entries hold {int(entries.counts.sum())} draws, not {samples} at each of {rows} positions"
        )
    draws = np.repeat(np.arange(len(entries.ids)), entries.counts).reshape(rows, samples)  # entry index per draw
    order = np.argsort(uniforms(seed ^ THIN_SALT, positions, samples), axis=1, kind="stable")[:, :keep]
    picked = np.sort(np.take_along_axis(draws, order, axis=1), axis=1)  # ids stay ascending within a position
    first = np.ones_like(picked, dtype=bool)
    first[:, 1:] = picked[:, 1:] != picked[:, :-1]
    flat, starts = picked.reshape(-1), np.flatnonzero(first.reshape(-1))
    index = flat[starts]
    return Entries(
        first.sum(axis=1).astype(np.int64),
        entries.ids[index],
        None if entries.logprobs is None else entries.logprobs[index],
        np.diff(np.append(starts, flat.size)).astype(np.int64),
    )


def compute_entries(logits: torch.Tensor, cfg: LogitsConfig, positions: np.ndarray | None = None) -> Entries:
    """The entries `cfg` retains for each row of `logits` [N, V] (exact, not yet quantised)."""
    if cfg.mode == "topk":
        return truncate_top_p_k(logits, cfg.top_p, cfg.top_k)
    if positions is None:
        raise PredistillError("sample mode needs the rows' global positions (they seed the draws)")
    return sample_entries(logits, cfg.samples, positions, cfg.seed, cfg.sample_temperature, cfg.stores_logprobs)


# ------------------------------------------------------------------------------------------------
# what the KD loss consumes
# ------------------------------------------------------------------------------------------------
@dataclass
class TeacherTargets:
    """Padded teacher entries for a batch of positions: shapes [..., K].

    `logprobs` are the teacher's log-probs at `ids` (topk: full-vocabulary log-probs, so
    1 − Σ exp is the dropped tail mass; sample: log of the estimated probabilities, which sum to 1).
    Padding has id 0, log-prob 0 and mask False.
    """

    ids: torch.Tensor  # int64
    logprobs: torch.Tensor  # float32
    mask: torch.Tensor  # bool

    @property
    def weights(self) -> torch.Tensor:
        return self.logprobs.exp() * self.mask

    def reshape(self, *shape: int) -> TeacherTargets:
        return TeacherTargets(self.ids.reshape(*shape), self.logprobs.reshape(*shape), self.mask.reshape(*shape))


def entry_logweights(entries: Entries, cfg: LogitsConfig) -> np.ndarray:
    """Per entry, the log of the teacher probability the KD loss should use (see TeacherTargets)."""
    if cfg.mode == "topk":
        assert entries.logprobs is not None  # topk entries carry log-probs
        return entries.logprobs.astype(np.float32)
    assert entries.counts is not None  # sample entries carry counts
    log_w = np.log(entries.counts.astype(np.float64))
    if cfg.sample_temperature != 1.0:
        assert entries.logprobs is not None  # stored at T ≠ 1 (cfg.stores_logprobs)
        # draws came from q ∝ p^(1/T): importance weight p/q ∝ p^(1 − 1/T), self-normalised below
        log_w = log_w + (1.0 - 1.0 / cfg.sample_temperature) * entries.logprobs.astype(np.float64)
    rows = np.repeat(np.arange(len(entries.n)), entries.n)
    row_max = np.full(len(entries.n), -np.inf)
    np.maximum.at(row_max, rows, log_w)
    shifted = np.exp(log_w - row_max[rows])
    total = np.zeros(len(entries.n))
    np.add.at(total, rows, shifted)
    return (log_w - row_max[rows] - np.log(total)[rows]).astype(np.float32)


def entries_to_targets(entries: Entries, cfg: LogitsConfig, k_max: int | None = None) -> TeacherTargets:
    """Pad variable-length entries into TeacherTargets [P, Kmax]."""
    n = entries.n
    k_max = int(n.max()) if k_max is None and len(n) else (k_max or 1)
    rows = np.repeat(np.arange(len(n)), n)
    cols = np.arange(len(entries.ids)) - np.repeat(entries.offsets[:-1], n)
    ids = np.zeros((len(n), k_max), np.int64)
    lps = np.zeros((len(n), k_max), np.float32)
    mask = np.zeros((len(n), k_max), bool)
    ids[rows, cols] = entries.ids
    lps[rows, cols] = entry_logweights(entries, cfg)
    mask[rows, cols] = True
    return TeacherTargets(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(mask))


@torch.no_grad()
def teacher_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    cfg: LogitsConfig,
    positions: np.ndarray | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> TeacherTargets:
    """Entries of an online teacher, straight to TeacherTargets [N, Kmax] (no store, no quantisation).

    hidden [N, H] (the teacher's final hidden states), weight [V, H] (its lm head). This is how a
    training loop uses a *truncated* online teacher with `kd.kd_loss`.
    """
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = hidden[start : start + chunk_rows].float() @ weight.float().t()
        pos = None if positions is None else positions[start : start + chunk_rows]
        parts.append(compute_entries(logits, cfg, pos))
    return entries_to_targets(Entries.concat(parts, cfg), cfg, cfg.max_entries)


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2^bits as a little-endian bit stream, plus WINDOW_PAD zero bytes."""
    values = np.asarray(values, dtype=np.uint64)
    if bits == 0:
        data = b""
    elif bits in (8, 16, 32):
        data = values.astype(f"<u{bits // 8}").tobytes()
    else:
        bit_matrix = (values[:, None] >> np.arange(bits, dtype=np.uint64)[None, :]) & np.uint64(1)
        data = np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()
    return data + bytes(WINDOW_PAD)


def unpack_bits(buf: np.ndarray, bits: int, index: np.ndarray) -> np.ndarray:
    """Values number `index` (int64 array) of a packed stream `buf` (uint8, padded) → int64."""
    index = np.asarray(index, dtype=np.int64)
    if bits == 0:
        return np.zeros(index.shape, np.int64)
    if bits in (8, 16, 32):
        width = bits // 8
        usable = buf[: (len(buf) - WINDOW_PAD) // width * width]
        return usable.view(f"<u{width}")[index].astype(np.int64)
    bitpos = index * bits
    window = buf[(bitpos >> 3)[..., None] + np.arange(8)]
    word = np.ascontiguousarray(window).view("<u8")[..., 0]
    return ((word >> (bitpos & 7).astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.int64)


def quantize_logprobs(lp: np.ndarray, bits: int, lo: float) -> np.ndarray:
    step = -lo / ((1 << bits) - 1)
    return np.rint((np.clip(lp, lo, 0.0) - lo) / step).astype(np.int64)


def dequantize_logprobs(codes: np.ndarray, bits: int, lo: float) -> np.ndarray:
    step = -lo / ((1 << bits) - 1)
    return (lo + codes.astype(np.float64) * step).astype(np.float32)


@dataclass(frozen=True)
class Encoding:
    """Bit widths of a store's streams, derived from its config and vocabulary."""

    id_bits: int
    n_bits: int
    count_bits: int
    logprob_bits: int  # 0: not stored
    logprob_min: float
    # version 2: ids and counts Huffman-coded per shard (`predistill.formats.entropy`), with escapes
    entropy_coded: bool = False
    id_direct: int = 0  # symbols of the id code: 0, 1 + ranks [0, id_direct − 2), the escape
    id_raw_bits: int = 0  # bits of an escaped id value (0: every id has a rank)
    count_direct: int = 0  # symbols of the count code (count − 1, the escape)
    count_raw_bits: int = 0
    id_order_sha256: str = ""

    @staticmethod
    def of(cfg: LogitsConfig, vocab_size: int) -> Encoding:
        """The current version's encoding (the ranking's sha256 is filled in by the writer)."""
        id_direct = min(ID_DIRECT, vocab_size + 2)
        counts = cfg.mode == "sample"
        count_direct = min(ID_DIRECT, cfg.samples + 1) if counts else 0
        return Encoding(
            id_bits=bits_for(vocab_size),
            n_bits=bits_for(cfg.max_entries),
            count_bits=bits_for(cfg.samples) if counts else 0,
            logprob_bits=cfg.logprob_bits if cfg.stores_logprobs else 0,
            logprob_min=cfg.logprob_min,
            entropy_coded=True,
            id_direct=id_direct,
            id_raw_bits=bits_for(id_direct - 1 + vocab_size) if id_direct - 2 < vocab_size else 0,
            count_direct=count_direct,
            count_raw_bits=bits_for(cfg.samples) if counts and count_direct < cfg.samples + 1 else 0,
        )

    @property
    def n_ranked(self) -> int:
        """Ids with a rank symbol; the rest are escaped (raw value after the escape code)."""
        return self.id_direct - 2

    def describe(self) -> dict:
        out = asdict(self)
        if self.logprob_bits:
            step = -self.logprob_min / ((1 << self.logprob_bits) - 1)
            # step/2 from rounding to a code, plus fp32 rounding of the decoded value
            out |= {
                "logprob_step": step,
                "logprob_max_abs_error": step / 2 - self.logprob_min * 2.0**-23,
                "logprob_error_note": f"|decoded − teacher| ≤ step/2 (+ fp32 rounding) for log-probs ≥ {self.logprob_min}; "
                "lower ones are clipped to it (counted in logprob_clipped)",
            }
        return out

    @staticmethod
    def from_manifest(encoding: dict) -> Encoding:
        names = [f for f in Encoding.__dataclass_fields__ if f in encoding]
        return Encoding(**{k: encoding[k] for k in names})


def id_order(store: TokenStore, n: int, block: int = 1 << 24) -> np.ndarray:
    """The `n` most frequent ids of the token store, most frequent first (ties: lower id): the
    rank symbols of a v2 store. The teacher's entries follow the corpus's unigram distribution
    closely enough that a frequent id gets a short code."""
    counts = np.zeros(store.vocab_size, np.int64)
    for a in range(0, len(store.tokens), block):  # bounded memory whatever the corpus size
        counts += np.bincount(np.asarray(store.tokens[a : a + block], np.int64), minlength=store.vocab_size)
    return np.lexsort((np.arange(store.vocab_size), -counts))[:n].astype(np.int64)


class IdSymbols:
    """v2 id values: 0 if the id is the position's next token (the teacher's entries often hold
    it), 1 + rank for a ranked id, id_direct − 1 + id (escaped, raw) otherwise."""

    def __init__(self, order: np.ndarray, enc: Encoding, vocab_size: int):
        self.order, self.enc = np.asarray(order, np.int64), enc
        self.rank = np.full(vocab_size, enc.n_ranked, np.int64)
        self.rank[self.order] = np.arange(len(self.order))

    def values(self, ids: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
        rank = self.rank[ids]
        return np.where(
            ids == next_tokens, 0, np.where(rank < self.enc.n_ranked, 1 + rank, self.enc.id_direct - 1 + ids)
        )

    def ids(self, values: np.ndarray, next_tokens: np.ndarray) -> np.ndarray:
        esc = self.enc.id_direct - 1
        ranked = self.order[np.clip(values - 1, 0, max(len(self.order) - 1, 0))] if len(self.order) else values
        return np.where(values == 0, next_tokens, np.where(values < esc, ranked, values - esc))


def encode_shard(
    entries: Entries,
    inst_positions: np.ndarray,
    enc: Encoding,
    symbols: IdSymbols | None = None,
    next_tokens: np.ndarray | None = None,
    kept: np.ndarray | None = None,
) -> tuple[bytes, dict, int]:
    """(shard bytes, sections {name: [offset, nbytes]}, number of clipped log-probs).

    `inst_positions` are each instance's *stored* positions (with `kept`, a bool per position of
    the shard's instances, the kept ones; entries and next tokens [P] cover those only). v2
    (`enc.entropy_coded`) needs `symbols` and each stored position's next token."""
    n_per_inst = [int(x) for x in inst_positions]
    pos_off = np.concatenate([[0], np.cumsum(n_per_inst)]).astype(np.int64)
    entry_off = np.concatenate([[0], np.cumsum(entries.n)]).astype(np.int64)[pos_off]
    streams = [("inst_entry_offsets", entry_off.astype("<i8").tobytes())]
    if kept is not None:
        streams.append(("kept", np.packbits(kept.astype(np.uint8), bitorder="little").tobytes() + bytes(WINDOW_PAD)))
    # v2 leaves out what a reader can rebuild: positions per instance (the token store's lengths)
    # and, in sample mode, entries per position (each position's counts sum to `samples`)
    if not enc.entropy_coded:
        streams.append(("inst_position_offsets", pos_off.astype("<i8").tobytes()))
    if not (enc.entropy_coded and entries.counts is not None):
        streams.append(("n_entries", pack_bits(entries.n - 1, enc.n_bits)))

    def huffman(name: str, values: np.ndarray, n_direct: int, raw_bits: int) -> None:
        code = entropy.Code.fit(values, n_direct, raw_bits)
        data, nbits = entropy.encode(values, code)
        bit_off = np.concatenate([[0], np.cumsum(nbits)]).astype(np.int64)[entry_off]
        streams.extend(
            [(f"{name}_code", code.to_bytes()), (name, data), (f"{name}_inst_bits", bit_off.astype("<i8").tobytes())]
        )

    if enc.entropy_coded:
        assert symbols is not None and next_tokens is not None, "v2 needs the id symbols and the next tokens"
        huffman("ids", symbols.values(entries.ids, np.repeat(next_tokens, entries.n)), enc.id_direct, enc.id_raw_bits)
    else:
        streams.append(("ids", pack_bits(entries.ids, enc.id_bits)))
    clipped = 0
    if enc.logprob_bits:
        assert entries.logprobs is not None  # logprob_bits > 0: the config stores log-probs
        clipped = int((entries.logprobs < enc.logprob_min).sum())
        streams.append(
            (
                "logprobs",
                pack_bits(quantize_logprobs(entries.logprobs, enc.logprob_bits, enc.logprob_min), enc.logprob_bits),
            )
        )
    if entries.counts is not None:
        if enc.entropy_coded:
            huffman("counts", entries.counts - 1, enc.count_direct, enc.count_raw_bits)
        else:
            streams.append(("counts", pack_bits(entries.counts - 1, enc.count_bits)))
    sections, offset = {}, 0
    for name, data in streams:
        sections[name] = [offset, len(data)]
        offset += len(data)
    return b"".join(data for _, data in streams), sections, clipped


# ------------------------------------------------------------------------------------------------
# writer
# ------------------------------------------------------------------------------------------------
def global_positions(store: TokenStore, instance_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A store-wide index of (instance, position): offsets[i] − i + t (sampling keys)."""
    instance_ids = np.asarray(instance_ids, np.int64)
    return store.offsets[instance_ids] - instance_ids + np.asarray(positions, np.int64)


def _numpy_ints(x) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, np.int64).reshape(-1)


def shard_files(directory: Path, n_shards: int) -> list[tuple[Path, Path]]:
    """(data, marker) of each shard of a logits store."""
    return [
        (Path(directory) / "shards" / f"{_shard_name(s)}.bin", Path(directory) / "shards" / f"{_shard_name(s)}.json")
        for s in range(n_shards)
    ]


def _shard_name(s: int) -> str:
    return f"{s:05d}"


class LogitsStoreWriter:
    """Writes a logits store aligned with `store`, shard by shard, resumably (see module doc)."""

    def __init__(
        self,
        out: str | Path,
        store: TokenStore,
        cfg: LogitsConfig,
        *,
        vocab_size: int,
        teacher: str = "",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        positions: dict | None = None,
    ):
        """`positions`: for a position-selected store, what chose its positions (recorded in the
        manifest; every batch then says which positions of each instance to keep, `kept=`)."""
        self.dir = Path(out)
        self.positions = positions
        self.store = store
        if cfg.shard_instances is None:
            cfg = replace(cfg, shard_instances=DEFAULT_SHARD_INSTANCES)
        self.cfg = cfg.validate()
        assert cfg.shard_instances is not None  # the default was filled in above
        self.shard_instances: int = cfg.shard_instances
        if vocab_size < store.vocab_size:
            raise PredistillError(
                f"teacher vocabulary {vocab_size} is smaller than the token store's {store.vocab_size}"
            )
        self.vocab_size = vocab_size
        self.enc = Encoding.of(cfg, vocab_size)
        self.symbols, self._order_bytes = None, b""
        if self.enc.entropy_coded:
            order = id_order(store, self.enc.n_ranked)
            self._order_bytes = order.astype("<u4").tobytes()
            self.enc = replace(self.enc, id_order_sha256=hashlib.sha256(self._order_bytes).hexdigest())
            self.symbols = IdSymbols(order, self.enc, vocab_size)
        self.chunk_rows = chunk_rows
        self.lengths = store.lengths.astype(np.int64)
        self.n_positions = np.maximum(self.lengths - 1, 0)
        self.n_shards = math.ceil(len(store) / self.shard_instances) if len(store) else 0
        self.settings = {
            "format": FORMAT,
            "version": VERSION if positions is None else SELECTED_VERSION,
            "config": asdict(cfg),
            "store_hash": store.hash,
            "tokenizer_hash": store.tokenizer_hash,
            "vocab_size": vocab_size,
            "teacher": teacher,
            "encoding": self.enc.describe(),
        } | ({} if positions is None else {"positions": positions})
        self.complete = self._prepare_dir()
        order_path = self.dir / ID_ORDER_FILE
        if (
            self.enc.entropy_coded
            and not self.complete
            and not (order_path.is_file() and sha256_file(order_path) == self.enc.id_order_sha256)
        ):
            write_bytes_atomic(order_path, self._order_bytes)  # before any shard that uses it
        self._done = np.array([self._shard_done(s) for s in range(self.n_shards)], dtype=bool)
        # per unfinished shard: instance → (its entries, its kept positions or None for all)
        self._pending: dict[int, dict[int, tuple[Entries, np.ndarray | None]]] = {}

    # directory state ---------------------------------------------------------------------------
    def _prepare_dir(self) -> bool:
        manifest_path = self.dir / "manifest.json"
        if manifest_path.is_file():
            try:
                old = parse_json(manifest_path.read_text())
            except ValueError:
                old = None
            old = old if isinstance(old, dict) else {}
            if old.get("complete") and {k: old.get(k) for k in self.settings} == self.settings:
                return True
            raise PredistillError(
                f"{self.dir} already holds a logits store made with other settings or another "
                "token store; remove it or choose another output directory"
            )
        if (
            not (self.dir / WRITER_FILE).is_file()
            and self.dir.exists()
            and any(not p.name.endswith(".tmp") and p.name != "shards" for p in self.dir.iterdir())
        ):
            raise PredistillError(f"{self.dir} exists and is not a logits store; refusing to write into it")
        check_plan(self.dir, self.settings, "logits store", name=WRITER_FILE)
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        return False

    def _shard_range(self, s: int) -> tuple[int, int]:
        a = s * self.shard_instances
        return a, min(a + self.shard_instances, len(self.store))

    def _shard_done(self, s: int) -> bool:
        marker = self.dir / "shards" / f"{_shard_name(s)}.json"
        return read_marker(marker, marker.with_suffix(".bin"), shard=s) is not None

    def todo_instances(self) -> np.ndarray:
        """Instance ids (ascending) the caller still has to feed: those of unfinished shards."""
        if self.complete:
            return np.zeros(0, np.int64)
        parts = [np.arange(*self._shard_range(int(s))) for s in np.flatnonzero(~self._done)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    # feeding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def add_hidden(
        self,
        instance_ids,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        kept: Sequence[np.ndarray] | None = None,
    ) -> None:
        """One teacher batch: hidden [B, L, H] final hidden states, weight [V, H] lm head, tokens
        [B, L] the input ids, lengths [B]; for a position-selected store, `kept` gives each row's
        positions to keep (bool [length − 1]). Log-probs are computed `chunk_rows` rows at a time."""
        batch = self.entries_of_hidden(instance_ids, hidden, weight, tokens, lengths, kept)
        if batch is not None:
            self.accept(*batch)

    def entries_of_hidden(
        self,
        instance_ids,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        kept: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, Entries, list[np.ndarray] | None] | None:
        """The entries `add_hidden` would store, without storing them: (instances, stored positions
        per instance, entries, kept masks or None). Ranks compute these for their own batches and
        one writer `accept`s them."""
        rows, keys, inst, npos, masks = self._select_rows(instance_ids, tokens, lengths, hidden.shape[:2], kept)
        if rows is None:
            return None
        h = hidden.reshape(-1, hidden.shape[-1])[rows.to(hidden.device)]
        w = weight.detach().float()
        parts = []
        for start in range(0, len(rows), self.chunk_rows):
            logits = h[start : start + self.chunk_rows].float() @ w.t()
            parts.append(compute_entries(logits, self.cfg, keys[start : start + self.chunk_rows]))
        return inst, npos, Entries.concat(parts, self.cfg), masks

    def accept(
        self, inst: np.ndarray, npos: np.ndarray, entries: Entries, masks: Sequence[np.ndarray] | None = None
    ) -> None:
        """Store computed entries (`npos`: stored positions per instance; `masks`: each instance's
        kept positions, for a position-selected store); instances already stored or buffered keep
        their first sighting."""
        masks = self._check_masks(inst, npos, masks)
        new = np.array(
            [
                not self._done[int(i) // self.shard_instances]
                and int(i) not in self._pending.get(int(i) // self.shard_instances, {})
                for i in inst
            ],
            dtype=bool,
        )
        if not new.all():
            parts = entries.split(npos)
            inst, npos = inst[new], npos[new]
            masks = None if masks is None else [m for m, keep in zip(masks, new) if keep]
            if not len(inst):
                return
            entries = Entries.concat([p for p, keep in zip(parts, new) if keep], self.cfg)
        self._accept(inst, npos, entries, masks)

    def _require_masks(self, given: bool) -> None:
        """Kept masks come exactly with a position-selected store."""
        if given != (self.positions is not None):
            raise PredistillError(
                "kept positions were given to a logits store that keeps every position"
                if given
                else "a position-selected logits store needs, for each batch row (instance), the positions to keep"
            )

    def _check_masks(self, inst, npos, masks) -> list[np.ndarray] | None:
        """Kept masks given exactly when the store is position-selected, one per instance, each
        as long as the instance's positions and keeping `npos` of them."""
        self._require_masks(masks is not None)
        if masks is None:
            return None
        masks = [np.asarray(m, dtype=bool) for m in masks]
        if len(masks) != len(inst) or any(
            m.shape != (int(self.n_positions[int(i)]),) or int(m.sum()) != int(n) for i, n, m in zip(inst, npos, masks)
        ):
            raise PredistillError("kept masks do not match the instances' positions")
        return masks

    @torch.no_grad()
    def add_logits(
        self, instance_ids, logits: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> None:
        """One batch of logits or log-probs [B, L, V] (e.g. a model saving online logits as it trains)."""
        rows, keys, inst, npos, masks = self._select_rows(instance_ids, tokens, lengths, logits.shape[:2])
        if rows is None:
            return
        flat = logits.reshape(-1, logits.shape[-1])
        rows = rows.to(logits.device)
        parts = [
            compute_entries(flat[rows[s : s + self.chunk_rows]], self.cfg, keys[s : s + self.chunk_rows])
            for s in range(0, len(rows), self.chunk_rows)
        ]
        self._accept(inst, npos, Entries.concat(parts, self.cfg), masks)

    def _select_rows(self, instance_ids, tokens, lengths, shape, kept=None):
        """Flat row indices of the positions still wanted (of each wanted instance, all of its
        positions or its `kept` ones), their sampling keys, the instances, their stored position
        counts and kept masks (None: every position)."""
        if self.complete:
            return None, None, None, None, None
        instance_ids = _numpy_ints(instance_ids)
        lengths = _numpy_ints(lengths)
        batch, width = shape
        if len(instance_ids) != batch or len(lengths) != batch:
            raise PredistillError(
                f"batch of {batch} rows got {len(instance_ids)} instance ids and {len(lengths)} lengths"
            )
        self._require_masks(kept is not None)
        if kept is not None and len(kept) != batch:
            raise PredistillError(f"batch of {batch} rows got {len(kept)} kept masks")
        if ((instance_ids < 0) | (instance_ids >= len(self.store))).any():
            raise PredistillError(f"instance id out of range for a token store of {len(self.store)}")
        if (lengths != self.lengths[instance_ids]).any():
            b = int(np.flatnonzero(lengths != self.lengths[instance_ids])[0])
            raise PredistillError(
                f"instance {instance_ids[b]} has {self.lengths[instance_ids[b]]} tokens in the store "
                f"but the batch gives {lengths[b]}: the logits store needs every position"
            )
        wanted, seen = [], set()
        for b, i in enumerate(instance_ids):
            s = i // self.shard_instances
            if self._done[s] or int(i) in self._pending.get(s, {}) or int(i) in seen:
                continue  # already written or buffered: the first sighting wins
            if tokens is not None and not np.array_equal(
                torch.as_tensor(tokens[b, : lengths[b]]).cpu().numpy(), self.store[int(i)]
            ):
                raise PredistillError(f"batch row {b} does not hold the tokens of instance {i} of {self.store.dir}")
            seen.add(int(i))
            wanted.append(b)
        if not wanted:
            return None, None, None, None, None
        picked = np.asarray(wanted)
        inst, npos = instance_ids[picked], self.n_positions[instance_ids[picked]]
        if npos.max(initial=0) > width:
            raise PredistillError(f"batch is {width} positions wide but instance lengths need {npos.max()}")
        masks = None
        if kept is not None:
            masks = [np.asarray(kept[b], dtype=bool) for b in picked]
            if any(m.shape != (int(p),) for m, p in zip(masks, npos)):
                raise PredistillError("each row's kept positions must be a mask over its instance's positions")
        local_parts = [np.arange(p) for p in npos] if masks is None else [np.flatnonzero(m) for m in masks]
        local = np.concatenate([np.zeros(0, np.int64), *local_parts]).astype(np.int64)
        rows = np.concatenate([np.zeros(0, np.int64)] + [b * width + t for b, t in zip(picked, local_parts)])
        stored = np.array([len(t) for t in local_parts], np.int64)
        keys = global_positions(self.store, np.repeat(inst, stored), local)
        return torch.from_numpy(rows.astype(np.int64)), keys, inst, stored, masks

    def _accept(self, inst: np.ndarray, npos: np.ndarray, entries: Entries, masks=None) -> None:
        for k, (i, part) in enumerate(zip(inst, entries.split(npos))):
            s = int(i) // self.shard_instances
            self._pending.setdefault(s, {})[int(i)] = (part, None if masks is None else masks[k])
            a, b = self._shard_range(s)
            if len(self._pending[s]) == b - a:
                self._write_shard(s)

    def _write_shard(self, s: int) -> None:
        a, b = self._shard_range(s)
        pending = self._pending.pop(s)
        entries = Entries.concat([pending[i][0] for i in range(a, b)], self.cfg)
        kept = None
        stored = self.n_positions[a:b]
        next_tokens = [np.asarray(self.store[i][1:], np.int64) for i in range(a, b)]
        if self.positions is not None:
            masks = [m if (m := pending[i][1]) is not None else np.ones(0, bool) for i in range(a, b)]
            kept = np.concatenate([np.zeros(0, bool), *masks])
            stored = np.array([int(m.sum()) for m in masks], np.int64)
            next_tokens = [t[m] for t, m in zip(next_tokens, masks)]
        data, sections, clipped = encode_shard(
            entries, stored, self.enc, self.symbols, np.concatenate([np.zeros(0, np.int64), *next_tokens]), kept
        )
        path = self.dir / "shards" / f"{_shard_name(s)}.bin"
        write_shard(
            path,
            path.with_suffix(".json"),
            data,
            shard=s,
            first_instance=a,
            n_instances=b - a,
            n_positions=int(self.n_positions[a:b].sum()),
            n_entries=int(len(entries.ids)),
            logprob_clipped=clipped,
            bytes=len(data),
            sections=sections,
            **({} if kept is None else {"n_distilled_positions": int(stored.sum())}),
        )
        self._done[s] = True

    def finish(self, *, others_may_be_writing: bool = False) -> dict | None:
        """Write the manifest (complete flag last) once every shard is in; return it. With
        `others_may_be_writing` (ranks writing other shards of the same store), return None while
        a shard of theirs is still missing: the last writer to finish completes the store."""
        if self.complete:
            return read_manifest(self.dir, FORMAT, "logits store")
        for s in np.flatnonzero(~self._done):  # shards other writers finished since this one opened
            self._done[s] = self._shard_done(int(s))
        # a store with no positions at all still gets its (empty) shards written here
        for s in np.flatnonzero(~self._done):
            a, b = self._shard_range(int(s))
            if self.n_positions[a:b].sum() == 0:
                none = None if self.positions is None else np.zeros(0, bool)
                for i in range(a, b):
                    self._pending.setdefault(int(s), {})[i] = (Entries.empty(self.cfg), none)
                self._write_shard(int(s))
        if not self._done.all():
            if others_may_be_writing:
                return None
            missing = self.todo_instances()
            raise PredistillError(
                f"{self.dir}: {len(missing)} instances (from {missing[0]}) have no entries yet; "
                "feed todo_instances() before finish()"
            )
        metas = [json.loads((self.dir / "shards" / f"{_shard_name(s)}.json").read_text()) for s in range(self.n_shards)]
        order_bytes = (self.dir / ID_ORDER_FILE).stat().st_size if self.enc.entropy_coded else 0
        total_bytes = sum(m["bytes"] for m in metas) + order_bytes
        n_positions = int(self.n_positions.sum())
        n_entries = sum(m["n_entries"] for m in metas)
        manifest = {
            **self.settings,
            "n_instances": len(self.store),
            "n_shards": self.n_shards,
            "n_positions": n_positions,
            "n_entries": n_entries,
            "entries_per_position": n_entries / max(n_positions, 1),
            "logprob_clipped": sum(m["logprob_clipped"] for m in metas),
            "id_order_bytes": order_bytes,
            "total_bytes": total_bytes,
            "bytes_per_token": total_bytes / max(n_positions, 1),
        }
        if self.positions is not None:  # bytes_per_token stays over every position
            distilled = sum(m["n_distilled_positions"] for m in metas)
            manifest |= {
                "n_distilled_positions": distilled,
                "distilled_fraction": distilled / max(n_positions, 1),
                "bytes_per_distilled_position": total_bytes / max(distilled, 1),
            }
        write_manifest(self.dir, manifest)
        self.complete = True
        return read_manifest(self.dir, FORMAT, "logits store")


# ------------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------------
def _needs_token_store(directory: Path) -> PredistillError:
    return PredistillError(
        f"{directory}: a version-2 logits store is coded against its token store (next tokens, "
        "instance lengths); open it with its token store (LogitsStore(path, store))"
    )


class _Shard:
    def __init__(self, directory: Path, s: int, enc: Encoding, n_positions: np.ndarray | None):
        marker = directory / "shards" / f"{_shard_name(s)}.json"
        # verified once per open: a shard changed since the store was finished is refused here,
        # not discovered as garbage targets (or an IndexError) mid-training
        meta = read_marker(marker, marker.with_suffix(".bin"), shard=s)
        if meta is None:
            raise PredistillError(
                f"{marker.with_suffix('.bin')}: missing or changed since the logits store was "
                "written (sha256 mismatch); rewrite the store"
            )
        raw = (
            np.memmap(directory / "shards" / f"{_shard_name(s)}.bin", dtype=np.uint8, mode="r")
            if meta["bytes"]
            else np.zeros(0, np.uint8)
        )
        self.first = meta["first_instance"]
        self.sections = {name: raw[off : off + n] for name, (off, n) in meta["sections"].items()}
        self.entry_off = self.sections["inst_entry_offsets"].view("<i8")
        if "inst_position_offsets" in self.sections:
            self.pos_off = self.sections["inst_position_offsets"].view("<i8")
        else:  # v2: from the token store
            if n_positions is None:
                raise _needs_token_store(directory)
            mine = n_positions[self.first : self.first + len(self.entry_off) - 1]
            self.pos_off = np.concatenate([[0], np.cumsum(mine)]).astype(np.int64)
        # every position's offset; `pos_off` becomes the stored (kept) positions' offsets (v3)
        self.all_off = self.pos_off
        self.kept: np.ndarray | None = None
        if "kept" in self.sections:
            total = int(self.all_off[-1])
            self.kept = np.unpackbits(self.sections["kept"], count=total, bitorder="little").astype(bool)
            self.rank = np.cumsum(self.kept) - 1  # a kept position's index among the shard's stored ones
            self.pos_off = np.concatenate([[0], np.cumsum(self.kept)]).astype(np.int64)[self.all_off]
            if int(self.pos_off[-1]) != meta.get("n_distilled_positions"):
                raise PredistillError(
                    f"{marker}: {int(self.pos_off[-1])} kept positions, the marker says "
                    f"{meta.get('n_distilled_positions')} (corrupt store)"
                )
        self.decoders: dict[str, tuple[entropy.Decoder, np.ndarray]] = {}
        if enc.entropy_coded:
            coded = [("ids", enc.id_direct, enc.id_raw_bits)]
            if "counts" in self.sections:
                coded.append(("counts", enc.count_direct, enc.count_raw_bits))
            for name, n_direct, raw_bits in coded:
                code = entropy.Code.from_bytes(self.sections[f"{name}_code"], n_direct, raw_bits)
                self.decoders[name] = (entropy.Decoder(code), self.sections[f"{name}_inst_bits"].view("<i8"))

    def positions(self, local: int) -> int:
        """Instance `local`'s positions, kept or not."""
        return int(self.all_off[local + 1] - self.all_off[local])

    def stored_index(self, local: int, t: np.ndarray) -> np.ndarray:
        """Positions `t` of instance `local` → their index among its stored positions (−1: not kept)."""
        if self.kept is None:
            return t
        at = int(self.all_off[local]) + t
        return np.where(self.kept[at], self.rank[at] - int(self.pos_off[local]), -1)

    def stored_positions(self, local: int) -> np.ndarray:
        """The positions of instance `local` that hold entries, ascending."""
        n = self.positions(local)
        if self.kept is None:
            return np.arange(n)
        return np.flatnonzero(self.kept[int(self.all_off[local]) : int(self.all_off[local]) + n])

    def coded(self, name: str, local: int, idx: np.ndarray) -> np.ndarray:
        """Values `idx` (shard-wide entry indices, all of instance `local`) of an entropy-coded stream."""
        decoder, bits = self.decoders[name]
        e0 = int(self.entry_off[local])
        values = decoder.decode(self.sections[name], int(bits[local]), int(bits[local + 1]))
        if len(values) != int(self.entry_off[local + 1]) - e0:
            raise PredistillError(
                f"logits shard stream {name!r} decodes to {len(values)} entries for instance "
                f"{self.first + local}, its offsets say {int(self.entry_off[local + 1]) - e0}"
            )
        return values[idx - e0]


class LogitsStore:
    """Read-only view of a logits store (see module doc for use in a training loop)."""

    def __init__(self, directory: str | Path, store: TokenStore | None = None):
        self.dir = Path(directory)
        self.manifest = read_manifest(self.dir, FORMAT, "logits store")
        if self.manifest.get("version") not in READABLE_VERSIONS:
            raise PredistillError(
                f"{self.dir}: logits store version {self.manifest.get('version')}, "
                f"this predistill reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        self._check_manifest()
        try:
            self.cfg = LogitsConfig(**self.manifest["config"])
            self.enc = Encoding.from_manifest(self.manifest["encoding"])
        except (TypeError, ValueError) as e:
            raise PredistillError(
                f"{self.dir / MANIFEST}: config or encoding unreadable ({e}) (corrupted logits store)"
            ) from None
        if not isinstance(self.cfg.shard_instances, int) or self.cfg.shard_instances < 1:
            raise PredistillError(
                f"{self.dir / MANIFEST}: config.shard_instances is not a count ≥ 1 (corrupted logits store)"
            )
        self.shard_instances: int = self.cfg.shard_instances
        self._shards: dict[int, _Shard] = {}
        # sizes at open (a stat per shard): a truncated or missing shard is refused here, not at
        # the training step that first reads it; contents are verified per shard on first read
        shard_dir = self.dir / "shards"
        sizes = [
            (shard_dir / f"{_shard_name(s)}.bin").stat().st_size
            if (shard_dir / f"{_shard_name(s)}.bin").is_file()
            else -1
            for s in range(self.manifest["n_shards"])
        ]
        order_path = self.dir / ID_ORDER_FILE
        if self.enc.entropy_coded:
            sizes.append(order_path.stat().st_size if order_path.is_file() else -1)
        if -1 in sizes or sum(sizes) != self.manifest["total_bytes"]:
            raise PredistillError(
                f"{self.dir}: shard files are missing or truncated ({sum(max(n, 0) for n in sizes)} "
                f"bytes, the manifest says {self.manifest['total_bytes']}); rewrite the store"
            )
        self.symbols = None
        if self.enc.entropy_coded:
            data = order_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != self.enc.id_order_sha256:
                raise PredistillError(
                    f"{order_path}: changed since the logits store was written (sha256 mismatch); rewrite the store"
                )
            self.symbols = IdSymbols(np.frombuffer(data, "<u4").astype(np.int64), self.enc, self.manifest["vocab_size"])
        self.tokens = store  # v2 ids are coded against the next token
        if store is not None:
            self.check_store(store)

    def _check_manifest(self) -> None:
        """The manifest's schema, before any field is used; a declared shard count must fit the files."""
        where = self.dir / MANIFEST
        check_fields(
            self.manifest,
            where,
            {
                "config": dict,
                "encoding": dict,
                "n_shards": COUNT,
                "n_instances": COUNT,
                "n_positions": COUNT,
                "total_bytes": COUNT,
                "vocab_size": COUNT,
                "store_hash": str,
                "tokenizer_hash": str,
                "bytes_per_token": NUMBER,
            },
        )
        shard_dir = self.dir / "shards"
        on_disk = len(os.listdir(shard_dir)) if shard_dir.is_dir() else 0
        if self.manifest["n_shards"] > min(on_disk, max(self.manifest["n_instances"], 1)):
            raise PredistillError(
                f"{where}: n_shards = {self.manifest['n_shards']} for {self.manifest['n_instances']} "
                f"instances and {on_disk} files in shards/ (corrupted logits store)"
            )
        if self.manifest.get("version") == SELECTED_VERSION:
            check_fields(self.manifest, where, {"positions": dict, "n_distilled_positions": COUNT})
        encoding = self.manifest["encoding"]
        bad = [k for k, v in encoding.items() if not isinstance(v, (bool, int, float, str))]
        if bad:
            raise PredistillError(f"{where}: encoding.{bad[0]} is not a scalar (corrupted logits store)")

    @property
    def bytes_per_token(self) -> float:
        return self.manifest["bytes_per_token"]

    @property
    def n_positions(self) -> int:
        return self.manifest["n_positions"]

    @property
    def positions(self) -> dict | None:
        """What chose a position-selected store's positions (None: every position holds entries)."""
        return self.manifest.get("positions")

    def check_store(self, store: TokenStore) -> None:
        """Refuse a token store other than the one this logits store was made from (both hashes named)."""
        check_same_store(self.manifest["store_hash"], store, f"logits store {self.dir}")
        if self.manifest["tokenizer_hash"] != store.tokenizer_hash:
            raise PredistillError(
                f"logits store {self.dir} was made with tokenizer {self.manifest['tokenizer_hash'][:12]}, "
                f"but {store.dir} uses {store.tokenizer_hash[:12]}"
            )

    def _shard(self, s: int) -> _Shard:
        if s not in self._shards:
            if not 0 <= s < self.manifest["n_shards"]:
                raise PredistillError(f"{self.dir}: no shard {s} (instance out of range)")
            n_positions = None if self.tokens is None else np.maximum(self.tokens.lengths - 1, 0)
            self._shards[s] = _Shard(self.dir, s, self.enc, n_positions)
        return self._shards[s]

    def instance_entries(self, instance_id: int) -> Entries:
        """All entries of one instance, decoded (quantised log-probs), positions in order (of a
        position-selected store: its kept positions, `instance_positions`)."""
        sh = self._shard(int(instance_id) // self.shard_instances)
        local = int(instance_id) - sh.first
        p0, p1 = int(sh.pos_off[local]), int(sh.pos_off[local + 1])
        e0, e1 = int(sh.entry_off[local]), int(sh.entry_off[local + 1])
        n = self._entries_per_position(sh, local, p1 - p0)
        return self._decode(sh, local, n, np.arange(e0, e1), np.repeat(sh.stored_positions(local), n))

    def instance_positions(self, instance_id: int) -> np.ndarray:
        """The positions of one instance that hold entries (all of them unless position-selected)."""
        sh = self._shard(int(instance_id) // self.shard_instances)
        return sh.stored_positions(int(instance_id) - sh.first)

    def _entries_per_position(self, sh: _Shard, local: int, count: int) -> np.ndarray:
        """Entries at positions 0..count−1 of instance `local`."""
        p0, p1 = int(sh.pos_off[local]), int(sh.pos_off[local + 1])
        if "n_entries" in sh.sections:
            return unpack_bits(sh.sections["n_entries"], self.enc.n_bits, np.arange(p0, p0 + count)) + 1
        # v2 sample mode: a position ends where the running sum of counts reaches a multiple of N
        e0, e1 = int(sh.entry_off[local]), int(sh.entry_off[local + 1])
        ends = np.flatnonzero(np.cumsum(sh.coded("counts", local, np.arange(e0, e1)) + 1) % self.cfg.samples == 0)
        n = np.diff(np.concatenate([[-1], ends]))
        if len(n) != p1 - p0 or (len(ends) and ends[-1] != e1 - e0 - 1):
            raise PredistillError(
                f"{self.dir}: the counts of instance {sh.first + local} do not split into its "
                f"{p1 - p0} positions (corrupt store)"
            )
        return n[:count]

    def _decode(self, sh: _Shard, local: int, n: np.ndarray, idx: np.ndarray, entry_pos: np.ndarray) -> Entries:
        """Entries `idx` (shard-wide indices) of instance `local`; `entry_pos` is each one's position."""
        if self.enc.entropy_coded:
            if self.tokens is None:
                raise _needs_token_store(self.dir)
            next_tokens = np.asarray(self.tokens[sh.first + local], np.int64)[entry_pos + 1]
            assert self.symbols is not None  # read in __init__ for an entropy-coded store
            ids = self.symbols.ids(sh.coded("ids", local, idx), next_tokens)
        else:
            ids = unpack_bits(sh.sections["ids"], self.enc.id_bits, idx)
        lps = counts = None
        if self.enc.logprob_bits:
            lps = dequantize_logprobs(
                unpack_bits(sh.sections["logprobs"], self.enc.logprob_bits, idx),
                self.enc.logprob_bits,
                self.enc.logprob_min,
            )
        if "counts" in sh.sections:
            counts = (
                sh.coded("counts", local, idx)
                if self.enc.entropy_coded
                else unpack_bits(sh.sections["counts"], self.enc.count_bits, idx)
            ) + 1
        return Entries(n, ids, lps, counts)

    def read(self, instance_ids, positions) -> TeacherTargets:
        """Teacher targets for N (instance, position) pairs: tensors [N, Kmax].

        Positions past an instance's last one (t ≥ len − 1), and positions a position-selected
        store did not keep, come back fully masked (padding: not distilled).
        """
        instance_ids = np.asarray(instance_ids, np.int64).reshape(-1)
        positions = np.asarray(positions, np.int64).reshape(-1)
        n_rows = len(instance_ids)
        n_all = np.zeros(n_rows, np.int64)
        entry_idx = []  # per row group: (row indices, first entry index, shard)
        order = np.argsort(instance_ids, kind="stable")
        uniq, first = np.unique(instance_ids[order], return_index=True)
        for inst, rows in zip(uniq, np.split(order, first[1:])):
            sh = self._shard(int(inst) // self.shard_instances)
            local = int(inst) - sh.first
            t = positions[rows]
            valid = (t >= 0) & (t < sh.positions(local))
            rows, t = rows[valid], t[valid]
            stored = sh.stored_index(local, t)
            rows, t, stored = rows[stored >= 0], t[stored >= 0], stored[stored >= 0]
            if not len(rows):
                continue
            # entry starts within the instance: exclusive cumsum of the per-stored-position counts
            n_inst = self._entries_per_position(sh, local, int(stored.max()) + 1)
            starts = int(sh.entry_off[local]) + np.concatenate([[0], np.cumsum(n_inst)])[stored]
            n_all[rows] = n_inst[stored]
            entry_idx.append((rows, starts, sh, local, t))
        k_max = int(n_all.max(initial=1)) or 1
        ids = np.zeros((n_rows, k_max), np.int64)
        lps = np.zeros((n_rows, k_max), np.float32)
        mask = np.arange(k_max)[None, :] < n_all[:, None]
        for rows, starts, sh, local, t in entry_idx:
            sub_mask = mask[rows]
            idx = (starts[:, None] + np.arange(k_max)[None, :])[sub_mask]
            entries = self._decode(sh, local, n_all[rows], idx, np.repeat(t, n_all[rows]))
            sub_ids = np.zeros(sub_mask.shape, np.int64)
            sub_lps = np.zeros(sub_mask.shape, np.float32)
            sub_ids[sub_mask] = entries.ids
            sub_lps[sub_mask] = entry_logweights(entries, self.cfg)
            ids[rows], lps[rows] = sub_ids, sub_lps
        return TeacherTargets(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(mask))

    def read_batch(self, instance_ids, length: int) -> TeacherTargets:
        """Targets for positions 0..length−1 of each instance: tensors [B, length, Kmax].

        Matches a training batch whose inputs are tokens[:, :length] and targets tokens[:, 1:length+1];
        positions an instance does not have are masked.
        """
        instance_ids = np.asarray(instance_ids, np.int64).reshape(-1)
        b = len(instance_ids)
        flat = self.read(np.repeat(instance_ids, length), np.tile(np.arange(length), b))
        return flat.reshape(b, length, -1)
