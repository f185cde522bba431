"""`predistill score`: the mean token log-prob of every instance of a token store under one model.

This is MiniPLM's per-instance statistic: for instance x (the stored token sequence, no BOS
added), mean over t ≥ 1 of log p(x_t | x_<t) in fp32. The first token has no prediction and
padding is masked out. When the model's tokenizer is not the store's, each instance is decoded
and re-tokenised with the model's tokenizer (documents split at the store's EOS, joined with the
model's EOS), so a teacher of another family scores the same instances.

The score table format is defined in `predistill.formats.scores`.

Shard s holds instances [s·shard_size, (s+1)·shard_size). Each shard is written atomically
(temp file + rename) and then its marker; a rerun recomputes only shards without a valid marker,
so a killed run resumes where it stopped and rerunning a finished table is a no-op. Under
`torchrun` (RANK / WORLD_SIZE), rank r computes shards r, r+W, r+2W, …; the table is finished by
rank 0 after a barrier, or — for ranks started by hand without a rendezvous — by whichever process
finds every shard done (a plain rerun does it). With `--logits-out`, a rank owns whole logits
shards (runs of score shards), so no logits shard is written by two processes.

The teacher forward is shared (`predistill.training.forward`): `run_forward_pass` runs the model body once
per batch and hands a `ForwardBatch` (instance ids, input tokens, lengths, final hidden states, lm-head weight) to
every `ForwardConsumer` it is given. `ShardScoreWriter` is one consumer; `LogitsStoreConsumer`
(around `predistill.formats.logits.LogitsStoreWriter`) is another: `--logits-out LDIR` writes the teacher's
logits store in the same pass. Its manifest references the score table (`scored_with`) instead of
counting the pass's FLOPs again; see docs/score.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from predistill.core.artifacts import (
    MANIFEST,
    PredistillError,
    check_plan,
    hold_output,
    is_complete,
    read_manifest,
    write_manifest,
)
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.core.sharding import Dist, Shard, init_distributed, plan_shards, rank_and_world, run_sharded
from predistill.formats.logits import FORMAT as LOGITS_FORMAT
from predistill.formats.logits import LogitsConfig, LogitsStoreWriter
from predistill.formats.scores import (
    FORMAT,
    PLAN,
    SHARD_DIR,
    finish_table,
    markers_hash,
    shard_marker,
    write_score_shard,
)
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import FORMAT as TOKEN_RECORD_FORMAT
from predistill.formats.tokrecord import TokenRecord, TokenRecordWriter
from predistill.modeling.kernels import fuse_kernels
from predistill.modeling.models import (
    DTYPES,
    check_plain_head,
    forward_params,
    load_model,
    model_hash,
    resolve_device,
    resolve_dtype,
    tokenizer_hash,
)
from predistill.training.forward import (
    ForwardBatch,
    ForwardConsumer,
    ModelInputs,
    ScoreCollector,
    run_forward_pass,
    token_logprobs_and_entropies,
)
from predistill.training.positions import STORE_RULES, PositionChoice, record_values

BACKENDS = ("torch",)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@dataclass
class ScoreConfig:
    model: str = option(
        "",
        "model spec: smollm2-135m, an HF directory or hub id, a run directory, or preset:NAME (random weights)",
        required=True,
    )
    store: str = option("", "token store to score", required=True)
    out: str = option(
        "", "score table directory (resumed if it holds a partial table)", required=True, effect=Effect.NONE
    )
    batch_size: int = option(8, "instances per forward", interval="[1, inf)")
    shard_size: int = option(
        512, "instances per shard file; the unit of resume and of work per rank", interval="[1, inf)"
    )
    max_len: int | None = option(
        None,
        "truncate instances (after re-tokenisation) to this many model tokens (default: whole instances)",
        interval="[1, inf)",
    )
    chunk_size: int = option(
        256, "positions per lm-head chunk; peak logits memory is chunk × vocab × 4 bytes", interval="[1, inf)"
    )
    # the switch leaves room for a GPU engine (vLLM prompt_logprobs) beside plain PyTorch
    backend: str = option("torch", "inference engine", choices=BACKENDS)
    device: str = option("auto", "auto (this rank's GPU if any), cpu, cuda, cuda:N", effect=Effect.ROUNDING)
    dtype: str = option(
        "auto",
        "weights/activations; auto = float32 on CPU (bfloat16 is faster only on CPUs with bf16 instructions), bfloat16 on "
        "GPU; log-probs are fp32 either way",
        choices=DTYPES,
    )
    seed: int = option(0, "weight seed for preset: models", interval="[0, 4294967295]")
    progress: bool = option(
        True, "progress bar (--no-progress: none)", flag="--no-progress", action="store_false", effect=Effect.NONE
    )
    # `--logits-out`: also write the teacher's logits store in the same forward pass. Not part of the
    # score table's identity (the score files are the same with or without it): the store has its own.
    logits_out: str | None = option(
        None,
        "also write the teacher's logits store here, in the same forward pass as the scores (docs/logits.md)",
        metavar="LDIR",
        effect=Effect.NONE,
    )
    logits: LogitsConfig | None = option(
        default_factory=LogitsConfig,  # --logits-mode, --top-k, --samples, …
        effect=Effect.NONE,
    )
    # a position-selected store (the store's identity records the choice as `positions`)
    logits_positions: str = option(
        "all",
        "--logits-out keeps a distribution at every position (all), or at the top --logits-position-fraction of "
        "each instance's positions by the teacher's entropy, by log p_teacher − log p_ref (difference), or at "
        "random (the control; docs/positions.md)",
        choices=("all", *STORE_RULES),
        effect=Effect.NONE,
    )
    logits_position_fraction: float = option(
        1.0,
        "fraction of each instance's positions a position-selected store keeps",
        interval="(0, 1]",
        effect=Effect.NONE,
    )
    logits_position_seed: int = option(
        0, "seed of --logits-positions random", interval="[0, 4294967295]", effect=Effect.NONE
    )
    logits_reference_record: str | None = option(
        None,
        "--logits-positions difference: the reference model's token record of this store (score --token-record)",
        metavar="TDIR",
        effect=Effect.NONE,
    )
    # `--token-record`: per predicted position, the log-prob and the entropy, from the same pass (its own identity)
    token_record: str | None = option(
        None,
        "also write the model's per-token record here: log-prob of each next token and entropy of its "
        "distribution, 4 bytes per position (docs/score.md)",
        metavar="TDIR",
        effect=Effect.NONE,
    )

    def identity(self) -> dict:
        """The fields that change the scores: a rerun must match them to reuse finished shards."""
        return identity(self)

    def position_choice(self, store: TokenStore) -> PositionChoice | None:
        """The positions a position-selected --logits-out keeps (None: every position)."""
        if self.logits_positions == "all":
            if self.logits_position_fraction != 1.0 or self.logits_reference_record:
                raise PredistillError(
                    "--logits-position-fraction and --logits-reference-record need --logits-positions RULE"
                )
            return None
        if not self.logits_out:
            raise PredistillError("--logits-positions selects the positions of a logits store: add --logits-out")
        reference = TokenRecord(self.logits_reference_record, store) if self.logits_reference_record else None
        return PositionChoice(
            self.logits_positions, self.logits_position_fraction, self.logits_position_seed, reference
        )

    def logits_config(self) -> LogitsConfig:
        """The logits store's settings; its shards default to the score shards."""
        cfg = self.logits if self.logits is not None else LogitsConfig()
        return replace(cfg, shard_instances=cfg.shard_instances or self.shard_size)


# ------------------------------------------------------------------------------------------------
# the scorer (one consumer)
# ------------------------------------------------------------------------------------------------


class ShardScoreWriter(ScoreCollector):
    """The scorer: writes one .npy + .done per shard into SCORES/shards/."""

    def __init__(self, out: Path, chunk_size: int = 256):
        super().__init__(chunk_size)
        self.shard_dir = Path(out) / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._skip = False

    def is_shard_done(self, shard: Shard) -> bool:
        return shard_marker(self.shard_dir, shard) is not None

    def start_shard(self, shard: Shard) -> None:
        self.logprob, self.n_tokens = {}, {}
        # forwarded for another consumer (e.g. the logits store) though this shard is finished:
        # ignore its batches rather than rewrite a finished shard
        self._skip = self.is_shard_done(shard)

    def consume(self, batch: ForwardBatch) -> None:
        if not self._skip:
            super().consume(batch)

    def finish_shard(self, shard: Shard) -> None:
        if self._skip:
            return
        write_score_shard(self.shard_dir, shard, *self.arrays(shard.ids))


# ------------------------------------------------------------------------------------------------
# the token record (another consumer of the same pass)
# ------------------------------------------------------------------------------------------------


class TokenRecordConsumer(ForwardConsumer):
    """Feeds a `TokenRecordWriter`: per predicted position the log-prob and the entropy, shard by
    shard in the table's own sharding (a finished shard's batches are ignored, never rewritten)."""

    def __init__(self, writer: TokenRecordWriter, chunk_size: int):
        self.writer, self.chunk_size = writer, chunk_size
        self._rows: dict[int, np.ndarray] = {}
        self._skip = False

    def is_shard_done(self, shard: Shard) -> bool:
        return self.writer.shard_done(shard)

    def start_shard(self, shard: Shard) -> None:
        self._rows, self._skip = {}, self.is_shard_done(shard)

    def consume(self, batch: ForwardBatch) -> None:
        if not self._skip:
            for i, rows in zip(batch.ids.tolist(), token_logprobs_and_entropies(batch, self.chunk_size)):
                self._rows[i] = rows

    def finish_shard(self, shard: Shard) -> None:
        if not self._skip:
            rows = [self._rows[int(i)] for i in shard.ids]
            self.writer.write(shard, np.concatenate(rows) if rows else np.zeros((0, 2), np.float32))


# ------------------------------------------------------------------------------------------------
# the logits store (a second consumer of the same teacher pass)
# ------------------------------------------------------------------------------------------------


class LogitsStoreConsumer(ForwardConsumer):
    """Feeds a `LogitsStoreWriter` from the teacher pass that computes the scores.

    Score shards and logits shards differ in size: a score shard is done for this consumer when
    none of its instances is among the writer's todo instances (taken when the consumer is made).
    Every todo instance reaches the writer exactly once, in the pass's batching (fixed per score
    shard), so a rerun computes the same batches. `run` requires the logits shard size to be a
    multiple of the score shard size: then every batch is wholly wanted or wholly finished, and a
    resumed run gives the writer exactly the rows a clean run gave it (byte-identical files).
    """

    def __init__(self, writer: LogitsStoreWriter, choice: PositionChoice | None = None, chunk_size: int = 256):
        self.writer, self.choice, self.chunk_size = writer, choice, chunk_size
        self.todo = np.zeros(len(writer.store), dtype=bool)
        self.todo[writer.todo_instances()] = True
        self.n_fed = 0

    def is_shard_done(self, shard: Shard) -> bool:
        return not self.todo[shard.ids].any()

    def consume(self, batch: ForwardBatch) -> None:
        want = self.todo[batch.ids]
        if not want.any():
            return
        if batch.hidden is None:  # a soft-capped or scaled head (models.is_plain_head): the pass gave logits
            raise PredistillError(
                "--logits-out needs a model whose lm head is a plain linear projection (no logit "
                "soft-capping or scaling): its entries are computed from the final hidden states"
            )
        kept = None
        if self.choice is not None:
            # the values the token record of this pass holds, so a later `select-positions` agrees
            rows = token_logprobs_and_entropies(batch, self.chunk_size) if self.choice.needs_teacher else None
            n_pred = np.maximum(batch.lengths.cpu().numpy() - 1, 0)
            kept = [
                self.choice.keep(int(i), int(n), None if rows is None else record_values(rows[b]))
                for b, (i, n) in enumerate(zip(batch.ids.tolist(), n_pred))
            ]
        if want.all():
            ids, hidden, tokens, lengths = batch.ids, batch.hidden, batch.tokens, batch.lengths
        else:
            sel = np.flatnonzero(want)
            index = torch.from_numpy(sel).to(batch.hidden.device)
            ids, hidden = batch.ids[sel], batch.hidden.index_select(0, index)
            tokens, lengths = batch.tokens.index_select(0, index), batch.lengths.index_select(0, index)
            kept = None if kept is None else [kept[b] for b in sel]
        self.writer.add_hidden(ids, hidden, batch.lm_head_weight, tokens, lengths, kept)
        self.todo[ids] = False  # exactly once
        self.n_fed += len(ids)


def _annotate_logits(ldir: Path, scored_with: dict, flops: int | None) -> None:
    """Add the score-table reference (and, for a separate pass, its FLOPs) to a finished logits
    store's manifest. Idempotent; rewritten only when it changes."""
    manifest = read_manifest(ldir, LOGITS_FORMAT, "logits store")
    new = {**manifest, "scored_with": scored_with}
    if flops is None:
        new.pop("flops", None)
    else:
        new["flops"] = flops
    if new != manifest:
        write_manifest(ldir, new)


def _open_logits_writer(
    cfg: ScoreConfig, store: TokenStore, inputs: ModelInputs, choice: PositionChoice | None
) -> LogitsStoreWriter:
    """Check that a logits store can be made in this pass and open its writer (refusals are one line)."""
    lcfg = cfg.logits_config()
    assert cfg.logits_out is not None and lcfg.shard_instances is not None  # the caller checks; filled in
    ldir, out = Path(cfg.logits_out), Path(cfg.out)
    if ldir.resolve() == out.resolve():
        raise PredistillError(f"--logits-out {ldir} is the score table's --out; choose another directory")
    if inputs.retokenized:
        raise PredistillError(
            f"--logits-out needs the store's own tokenizer: '{cfg.model}' tokenizes with "
            f"{tokenizer_hash(inputs.tokenizer)[:12]}, the store with {store.tokenizer_hash[:12]} (re-tokenised "
            "scoring); a teacher of another vocabulary cannot give per-position targets for this store"
        )
    longest = int(store.lengths.max(initial=0))
    if cfg.max_len is not None and cfg.max_len < longest:
        raise PredistillError(
            f"--logits-out needs every position, but --max-len {cfg.max_len} truncates instances "
            f"of up to {longest} tokens; drop --max-len"
        )
    if lcfg.shard_instances % cfg.shard_size:
        raise PredistillError(
            f"--logits-shard-size ({lcfg.shard_instances}) must be a multiple of --shard-size "
            f"({cfg.shard_size}), so that a resumed run feeds the logits store the same batches"
        )
    # the store's ids are the tokenizer's: a padded head's extra rows never reach it
    return LogitsStoreWriter(
        ldir,
        store,
        lcfg,
        vocab_size=store.vocab_size,
        teacher=cfg.model,
        chunk_rows=cfg.chunk_size,
        positions=None if choice is None else choice.describe(),
    )


def _check_token_record(cfg: ScoreConfig, store: TokenStore, inputs: ModelInputs) -> None:
    """Refuse, before anything is written, a token record this pass cannot make (one line each)."""
    assert cfg.token_record is not None  # the caller checks
    tdir = Path(cfg.token_record)
    if tdir.resolve() in (Path(cfg.out).resolve(), Path(cfg.logits_out or cfg.out).resolve()):
        raise PredistillError(f"--token-record {tdir} is another output's directory; choose its own")
    if inputs.retokenized:
        raise PredistillError(
            f"--token-record needs the store's own tokenizer: '{cfg.model}' re-tokenises {cfg.store}, so its "
            "positions are not the store's"
        )
    longest = int(store.lengths.max(initial=0))
    if cfg.max_len is not None and cfg.max_len < longest:
        raise PredistillError(
            f"--token-record needs every position, but --max-len {cfg.max_len} truncates instances of up to "
            f"{longest} tokens; drop --max-len"
        )
    if tdir.is_symlink():
        raise PredistillError(f"{tdir} is a symbolic link; refusing to write through it")


@dataclass
class TeacherPass:
    """Score's sharded work (`sharding.run_sharded` drives it): the teacher's forward pass over a
    shard feeds every consumer (the table's shards, the logits store, the token record), and a
    shard is done when each consumer has it; `finish_artifacts` finishes what the pass wrote."""

    model: torch.nn.Module
    inputs: ModelInputs
    shards: list[Shard]
    consumers: list[ForwardConsumer]
    finish_artifacts: Callable[[bool], bool]
    batch_size: int
    progress: bool
    desc: str
    rank: int = 0
    note: str = ""

    def done(self, shard: Shard) -> bool:
        return all(c.is_shard_done(shard) for c in self.consumers)

    def run(self, shards: Sequence[Shard]) -> None:
        stats = run_forward_pass(
            self.model,
            self.inputs,
            shards,
            self.consumers,
            batch_size=self.batch_size,
            progress=self.progress,
            desc=self.desc,
        )
        if stats.n_tokens:
            print(
                f"predistill score: rank {self.rank}: {stats.n_shards_run} shards, {stats.n_tokens} tokens in "
                f"{stats.seconds:.1f}s ({stats.n_tokens / max(stats.seconds, 1e-9):.0f} tokens/s){self.note}",
                file=sys.stderr,
            )

    def finish(self, others_may_be_writing: bool) -> bool:
        return self.finish_artifacts(others_may_be_writing)


def run(cfg: ScoreConfig) -> Path:
    """Score every instance of `cfg.store` with `cfg.model` into the score table `cfg.out`."""
    with contextlib.ExitStack() as held:  # the output's lock, released however the run ends
        return _run(cfg, held)


def _run(cfg: ScoreConfig, held: contextlib.ExitStack) -> Path:
    out = Path(cfg.out)
    if cfg.backend not in BACKENDS:
        raise PredistillError(f"--backend {cfg.backend!r} is not available; choose from {', '.join(BACKENDS)}")
    if cfg.batch_size < 1:
        raise PredistillError(f"--batch-size must be ≥ 1, got {cfg.batch_size}")
    if cfg.max_len is not None and cfg.max_len < 2:
        raise PredistillError(f"--max-len must be ≥ 2 (one token predicts the next), got {cfg.max_len}")
    if cfg.chunk_size < 1:
        raise PredistillError(f"--chunk-size must be ≥ 1, got {cfg.chunk_size}")
    if out.exists() and not out.is_dir():
        raise PredistillError(f"{out} exists and is not a directory")
    if (out / MANIFEST).is_file() and not (out / PLAN).is_file():
        raise PredistillError(f"{out} holds another artifact; refusing to write a score table into it")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file():
        raise PredistillError(f"{out} exists and is not a score table; refusing to overwrite it")
    store = TokenStore(cfg.store)
    choice = cfg.position_choice(store)  # refuses position settings without --logits-out, before any work
    rank, world = rank_and_world()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # only a preset (no tokenizer of its own) needs the store's tokenizer: skip loading it otherwise
    preset_tokenizer = store.tokenizer() if cfg.model.startswith("preset:") else None
    model, tokenizer = load_model(cfg.model, preset_tokenizer=preset_tokenizer, seed=cfg.seed, dtype=dtype)
    check_plain_head(model, cfg.model)
    model.to(device).eval()
    fuse_kernels(model)  # the same values, computed in place (predistill.modeling.kernels)
    inputs = ModelInputs(store, tokenizer, cfg.max_len)
    plan: dict[str, Any] = {
        "config": cfg.identity(),
        "model": {
            "spec": cfg.model,
            "hash": model_hash(model),
            "forward_params": forward_params(model, len(tokenizer)),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "store_hash": store.hash,
        "store_tokenizer_hash": store.tokenizer_hash,
        "store_dir": str(store.dir.resolve()),
        "retokenized": inputs.retokenized,
        "n_instances": len(store),
        "shard_size": cfg.shard_size,
    }
    shards = plan_shards(len(store), cfg.shard_size)

    table_complete = Output(out, FORMAT, "score table", plan).complete(
        resumable=lambda o: (o / PLAN).is_file(), announce=rank == 0 and not cfg.logits_out and not cfg.token_record
    )
    if cfg.token_record:
        _check_token_record(cfg, store, inputs)
    record: TokenRecordWriter | None = None
    if table_complete:
        manifest = read_manifest(out, FORMAT, "score table")
        if cfg.token_record and is_complete(cfg.token_record, TOKEN_RECORD_FORMAT):
            record = TokenRecordWriter(cfg.token_record, store, plan["model"], cfg.shard_size)  # checks its identity
        elif cfg.token_record:
            raise PredistillError(
                f"{out} is already complete without a token record: the record is written in the table's own pass; "
                "score into a fresh --out with --token-record"
            )
        if not cfg.logits_out:
            if rank == 0 and record is not None:
                print(f"predistill: {out} and {record.dir} are already complete; nothing to do", file=sys.stderr)
            return out
    logits = _open_logits_writer(cfg, store, inputs, choice) if cfg.logits_out else None
    desc = f"score {Path(cfg.model).name}"

    if table_complete:
        # --logits-out added to a finished table: one more teacher pass, for the logits only, in the
        # table's own batching (so the logits equal those of a one-pass run); its FLOPs are its own.
        if world > 1:
            raise PredistillError(
                f"{out} is already complete: its logits-only pass runs in one process "
                "(without torchrun / RANK / WORLD_SIZE)"
            )
        assert logits is not None  # a complete table without --logits-out returned above
        scored_with = {
            "score_table": str(out.resolve()),
            "table_hash": manifest["table_hash"],
            "teacher_pass": "separate",
        }
        current = read_manifest(logits.dir, LOGITS_FORMAT, "logits store") if logits.complete else {}
        if "scored_with" in current:  # finished (in this table's pass or in a pass of its own)
            print(f"predistill: {out} and {logits.dir} are already complete; nothing to do", file=sys.stderr)
            return out

        writer = logits

        def finish_logits(others_may_be_writing: bool) -> bool:
            finished = writer.finish(others_may_be_writing=others_may_be_writing)
            if finished is not None:
                _annotate_logits(writer.dir, scored_with, 2 * plan["model"]["forward_params"] * finished["n_positions"])
            return finished is not None

        logits_pass = TeacherPass(
            model,
            inputs,
            shards,
            [LogitsStoreConsumer(logits, choice, cfg.chunk_size)],
            finish_logits,
            cfg.batch_size,
            cfg.progress,
            f"{desc} (logits)",
            note=" (logits only: the score table was already complete)",
        )
        run_sharded(logits_pass, Dist(), "score", f"the logits store {logits.dir}")
        return out

    if rank == 0:  # one job writes OUT at a time (its ranks together); a second is refused before it writes
        hold_output(out, held)
    check_plan(out, plan, "score table")
    if cfg.token_record:  # opened (and its directory made) only once the table's own checks have passed
        record = TokenRecordWriter(cfg.token_record, store, plan["model"], cfg.shard_size)
    d = init_distributed(device, need_group=False)
    consumers: list[ForwardConsumer] = [ShardScoreWriter(out, cfg.chunk_size)]
    if logits is not None:
        consumers.append(LogitsStoreConsumer(logits, choice, cfg.chunk_size))
    if record is not None:
        consumers.append(TokenRecordConsumer(record, cfg.chunk_size))
    teacher_pass = TeacherPass(
        model,
        inputs,
        shards,
        consumers,
        lambda others_may_be_writing: _complete(
            out, plan, shards, logits, record, others_may_be_writing=others_may_be_writing
        ),
        cfg.batch_size,
        cfg.progress and rank == 0,
        desc,
        rank,
    )
    # a rank owns whole logits shards (each the score shards [k·g, (k+1)·g)), so that no logits
    # shard is fed by two processes; without --logits-out, g = 1 and shard s goes to rank s mod W
    group = logits.shard_instances // cfg.shard_size if logits is not None else 1
    run_sharded(teacher_pass, d, "score", f"the score table {out}", group=group)
    return out


def _complete(
    out: Path,
    plan: dict,
    shards: list[Shard],
    logits: LogitsStoreWriter | None,
    record: TokenRecordWriter | None,
    *,
    others_may_be_writing: bool,
) -> bool:
    """Finish the artifacts if every shard is in (else False: another rank, or a rerun, will).

    The logits store and the token record are finished before the table, so a complete table with
    an incomplete logits store means the logits need a pass of their own (the `table_complete`
    branch of `run`)."""
    if record is not None and record.finish(shards, others_may_be_writing=others_may_be_writing) is None:
        return False
    if logits is not None:
        if logits.finish(others_may_be_writing=others_may_be_writing) is None:
            return False
        table_hash = markers_hash(out, shards)
        if table_hash is None:
            if others_may_be_writing:
                return False
            raise PredistillError(f"{out}: score shards missing after the pass")
        _annotate_logits(
            logits.dir, {"score_table": str(out.resolve()), "table_hash": table_hash, "teacher_pass": "shared"}, None
        )
    return finish_table(out, plan, shards) is not None


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ScoreConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(ScoreConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    if (out / MANIFEST).is_file() and rank_and_world()[0] == 0:
        m = read_manifest(out, FORMAT, "score table")
        print(
            f"predistill: wrote {out}: {m['n_instances']} instances, {m['n_tokens_scored']} tokens, "
            f"mean token log-prob {m['token_mean_logprob']:.4f}"
            + (" (re-tokenised with the model's tokenizer)" if m["retokenized"] else "")
        )
        if cfg.logits_out:
            lm = read_manifest(cfg.logits_out, LOGITS_FORMAT, "logits store")
            print(
                f"predistill: wrote {cfg.logits_out}: {lm['n_positions']} positions, "
                f"{lm['entries_per_position']:.2f} entries/position, {lm['bytes_per_token']:.2f} bytes/token "
                f"(teacher pass {lm['scored_with']['teacher_pass']} with {out})"
            )
        if cfg.token_record:
            tm = read_manifest(cfg.token_record, TOKEN_RECORD_FORMAT, "token record")
            print(
                f"predistill: wrote {cfg.token_record}: {tm['n_positions']} positions (log-prob, entropy), "
                f"{tm['bytes_per_token']:.2f} bytes/token"
            )
