"""`predistill select-positions`: a position-selected logits store, made from one that keeps every
position, without running the teacher again.

The rule (`predistill.training.positions.PositionChoice`) reads the teacher's token record of the
same pass (`score --logits-out L --token-record R`) for `entropy` and `difference`, plus the
reference's record for `difference`; `random` reads none. Each kept position's entries are copied
from the full store as they are, so the result has the same bytes as `score --logits-positions`
would have written in the teacher pass (tested): one teacher pass serves every rule and fraction of
a study. The new store's manifest names the store it was selected from and carries its
`scored_with` (the teacher pass's cost is counted once, in its score table). Resumable shard by
shard, like every logits store; rerunning a complete one is a no-op. `--samples K` keeps K of an
RS-KD store's draws per kept position (`formats.logits.thin_draws`): the teacher's highest-entropy
positions are the costliest to store (≈ 2× the average's bytes with 8 draws).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from predistill.core.artifacts import PredistillError, read_manifest, write_manifest
from predistill.core.config import add_config_arguments, config_from_args, option
from predistill.formats.logits import LogitsStore, LogitsStoreWriter, global_positions, thin_draws
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import TokenRecord
from predistill.training.positions import STORE_RULES, PositionChoice, record_values


@dataclass
class SelectPositionsConfig:
    logits: str = option("", "a logits store that keeps every position (score --logits-out)", required=True)
    store: str = option("", "its token store", required=True)
    out: str = option("", "the position-selected logits store to write (resumed if partial)", required=True)
    rule: str = option(
        "entropy",
        "keep the top --fraction of each instance's positions by the teacher's entropy, by log p_teacher − "
        "log p_ref (difference), or at random (the control)",
        choices=STORE_RULES,
    )
    fraction: float = option(0.2, "fraction of each instance's positions to keep (at least one)", interval="(0, 1]")
    seed: int = option(0, "seed of --rule random", interval="[0, 4294967295]")
    samples: int | None = option(
        None,
        "keep this many of an RS-KD store's draws at each kept position (a uniform subsample: fewer bytes; default: all)",
        interval="[1, 65535]",
    )
    teacher_record: str | None = option(
        None, "entropy, difference: the teacher's token record, written in the pass that wrote --logits", metavar="TDIR"
    )
    reference_record: str | None = option(
        None, "difference: the reference model's token record of the store (score --token-record)", metavar="TDIR"
    )


def _check_same_teacher(record: TokenRecord, full: LogitsStore) -> None:
    """The record must be the logits store's teacher's: same model spec, and the same weights as the
    score table of its pass when that table is still there."""
    model = record.manifest["model"]
    if model.get("spec") != full.manifest.get("teacher"):
        raise PredistillError(
            f"--teacher-record {record.dir} is the record of {model.get('spec')!r}, but {full.dir} holds the "
            f"distributions of {full.manifest.get('teacher')!r}"
        )
    table = (full.manifest.get("scored_with") or {}).get("score_table")
    if isinstance(table, str) and (Path(table) / "manifest.json").is_file():
        scored = read_manifest(table, "score_table", "score table").get("model") or {}
        if scored.get("hash") != model.get("hash"):
            raise PredistillError(
                f"--teacher-record {record.dir} was made with other weights than the pass that wrote {full.dir} "
                f"(model {str(model.get('hash'))[:12]} vs {str(scored.get('hash'))[:12]})"
            )


def run(cfg: SelectPositionsConfig) -> dict:
    out = Path(cfg.out)
    if out.is_symlink():
        raise PredistillError(f"{out} is a symbolic link; refusing to write through it")
    if out.resolve() == Path(cfg.logits).resolve():
        raise PredistillError(f"--out {out} is the --logits store itself; choose another directory")
    store = TokenStore(cfg.store)
    full = LogitsStore(cfg.logits, store)  # refuses another token store, naming both hashes
    if full.positions is not None:
        raise PredistillError(
            f"{cfg.logits} is already position-selected ({full.positions.get('rule')}); select from a store "
            "that keeps every position"
        )
    reference = TokenRecord(cfg.reference_record, store) if cfg.reference_record else None
    choice = PositionChoice(cfg.rule, cfg.fraction, cfg.seed, reference)
    teacher = None
    if choice.needs_teacher:
        if not cfg.teacher_record:
            raise PredistillError(f"--rule {cfg.rule} reads the teacher's token record: add --teacher-record")
        teacher = TokenRecord(cfg.teacher_record, store)
        _check_same_teacher(teacher, full)
    elif cfg.teacher_record:
        raise PredistillError("--rule random reads no token record; drop --teacher-record")
    cfg_out = full.cfg
    if cfg.samples is not None and cfg.samples != full.cfg.samples:
        if full.cfg.mode != "sample" or cfg.samples > full.cfg.samples:
            raise PredistillError(
                f"--samples {cfg.samples}: {cfg.logits} holds "
                + (
                    f"{full.cfg.samples} draws per position"
                    if full.cfg.mode == "sample"
                    else "top-p-k entries, not draws"
                )
                + "; a store can only keep fewer of its own draws"
            )
        cfg_out = replace(full.cfg, samples=cfg.samples)
    writer = LogitsStoreWriter(
        out,
        store,
        cfg_out,
        vocab_size=full.manifest["vocab_size"],
        teacher=full.manifest["teacher"],
        positions=choice.describe(),
    )
    if writer.complete:
        print(f"predistill: {out} is already complete; nothing to do", file=sys.stderr)
    n_positions = np.maximum(store.lengths.astype(np.int64) - 1, 0)
    for i in writer.todo_instances().tolist():  # none when complete
        n = int(n_positions[i])
        rows = None if teacher is None else record_values(np.stack(teacher.instance(i), axis=1))
        keep = choice.keep(i, n, rows)
        entries = full.instance_entries(i).at(keep)
        if cfg_out.samples != full.cfg.samples:
            keys = global_positions(store, np.full(int(keep.sum()), i), np.flatnonzero(keep))
            entries = thin_draws(entries, full.cfg.samples, cfg_out.samples, keys, full.cfg.seed)
        writer.accept(np.array([i]), np.array([int(keep.sum())]), entries, [keep])
    manifest = writer.finish()
    assert manifest is not None  # one writer: finish completes the store or raises
    # (also on a rerun: a run killed between its manifest and this annotation is completed here)
    annotated = manifest | {
        "selected_from": {
            "logits_store": str(full.dir.resolve()),
            "total_bytes": full.manifest["total_bytes"],
            **({"samples": full.cfg.samples} if cfg_out.samples != full.cfg.samples else {}),
        }
    }
    if "scored_with" in full.manifest:
        annotated["scored_with"] = full.manifest["scored_with"]
    if annotated != manifest:
        write_manifest(out, annotated)
    return annotated


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, SelectPositionsConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(SelectPositionsConfig, args)
    if cfg is None:
        return
    m = run(cfg)
    print(
        f"predistill: wrote {cfg.out}: distributions at {m['n_distilled_positions']} of {m['n_positions']} positions "
        f"({m['positions']['rule']}), {m['bytes_per_token']:.3f} bytes/token over all positions "
        f"(from {m['selected_from']['total_bytes'] / max(m['n_positions'], 1):.3f})"
    )
