"""`predistill verify DIR...`: check every hash and schema an artifact records, up front.

Stages verify what they read when they read it — a changed logits shard is refused when training
first reaches it, which may be hours into a run. `verify` reads everything now: the manifest's
schema, then every file against the sha256 the artifact recorded for it, and the values a reader
would refuse (ids outside the vocabulary, log-probs that cannot be log-probs). One line per
artifact; the first problem is one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from predistill.core.artifacts import MANIFEST, PredistillError, parse_json, read_manifest, read_marker
from predistill.core.config import add_config_arguments, config_from_args, option
from predistill.formats import rundir
from predistill.formats.logits import FORMAT as LOGITS_FORMAT
from predistill.formats.logits import LogitsStore, shard_files
from predistill.formats.scores import FORMAT as SCORES_FORMAT
from predistill.formats.scores import ScoreTable
from predistill.formats.selection import FORMAT as SELECTION_FORMAT
from predistill.formats.selection import load_selection
from predistill.formats.store import FORMAT as STORE_FORMAT
from predistill.formats.store import TokenStore
from predistill.formats.tokrecord import FORMAT as TOKEN_RECORD_FORMAT
from predistill.formats.tokrecord import TokenRecord
from predistill.training.config import check_run_manifest


@dataclass
class VerifyConfig:
    artifacts: list[str] = option(
        default_factory=list,
        help="artifact directories to check (token stores, score tables, selections, logits stores, run directories)",
        required=True,
        positional=True,
        metavar="DIR",
    )


def verify_store(directory: Path) -> str:
    """Every chunk of tokens.bin against its sha256 (ids inside the vocabulary), for the store and its val split."""
    parts = [directory] + ([directory / "val"] if (directory / "val").is_dir() else [])
    total = 0
    for part in parts:
        store = TokenStore(part)
        store.verify_all()
        total += store.manifest["n_tokens"]
    return f"{total} tokens in {len(parts)} split(s)"


def verify_scores(directory: Path) -> str:
    table = ScoreTable(directory)  # reads and checks every shard
    return f"{len(table)} instances, {len(table.manifest['shards'])} shard(s)"


def verify_selection(directory: Path) -> str:
    return f"{len(load_selection(directory))} instances kept"


def verify_logits(directory: Path) -> str:
    store = LogitsStore(directory)  # schema, sizes, the id-order file's sha256
    for s, (data, marker) in enumerate(shard_files(directory, store.manifest["n_shards"])):
        if read_marker(marker, data, shard=s) is None:
            raise PredistillError(f"{data}: missing or changed since the logits store was written (sha256 mismatch)")
    return f"{store.n_positions} positions, {store.manifest['n_shards']} shard(s)"


def verify_token_record(directory: Path) -> str:
    manifest = read_manifest(directory, TOKEN_RECORD_FORMAT, "token record")
    if not isinstance(manifest.get("store_dir"), str):
        raise PredistillError(f"{directory}: the manifest names no token store (corrupted record)")
    record = TokenRecord(directory, TokenStore(manifest["store_dir"]))  # schema, its store's hash
    record.verify_all()
    return f"{record.manifest['n_positions']} positions, {len(record.manifest['shards'])} shard(s)"


def verify_run(directory: Path) -> str:
    manifest = read_manifest(directory, rundir.FORMAT, "run")
    check_run_manifest(manifest, directory / MANIFEST)
    try:
        config = parse_json((directory / rundir.CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise PredistillError(f"{directory / rundir.CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise PredistillError(f"{directory / rundir.CONFIG}: not a JSON object")
    export = directory / rundir.EXPORT
    weights = sorted(export.glob("*.safetensors"))
    if not (export / "config.json").is_file() or not weights:
        raise PredistillError(f"{export}: no exported model (config.json and *.safetensors)")
    from safetensors import safe_open

    for path in weights:
        try:
            with safe_open(str(path), "pt") as f:
                n = len(list(f.keys()))
        except Exception as e:  # noqa: BLE001 — safetensors raises its own types for a bad header
            raise PredistillError(f"{path}: not a readable safetensors file ({type(e).__name__})") from None
    return f"{manifest.get('steps')} steps, export of {n} tensors"


VERIFIERS: dict[str, Callable[[Path], str]] = {
    STORE_FORMAT: verify_store,
    SCORES_FORMAT: verify_scores,
    SELECTION_FORMAT: verify_selection,
    LOGITS_FORMAT: verify_logits,
    TOKEN_RECORD_FORMAT: verify_token_record,
    rundir.FORMAT: verify_run,
}


def artifact_format(directory: Path) -> str:
    if not (directory / MANIFEST).is_file():
        raise PredistillError(f"{directory}: not an artifact (no {MANIFEST})")
    try:
        manifest = parse_json((directory / MANIFEST).read_text())
    except ValueError as e:
        raise PredistillError(f"{directory / MANIFEST}: unreadable manifest ({type(e).__name__})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt not in VERIFIERS:
        raise PredistillError(f"{directory}: format {fmt!r} is not one verify checks ({', '.join(sorted(VERIFIERS))})")
    return fmt


def run(cfg: VerifyConfig) -> list[str]:
    lines = []
    for artifact in cfg.artifacts:
        directory = Path(artifact)
        fmt = artifact_format(directory)
        lines.append(f"{directory}: {fmt} ok ({VERIFIERS[fmt](directory)})")
        print(f"predistill verify: {lines[-1]}")
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, VerifyConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(VerifyConfig, args)
    if cfg is not None:
        run(cfg)
