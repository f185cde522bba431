"""`predistill prepare`: text sources → token store (see store.py for the format).

A pretokenized source (`megatron:PREFIX`) gives token ids instead of text: they are checked against
the tokenizer's vocabulary and chunked like encoded text (cuts after word-boundary tokens).

Instances follow MiniPLM: each document is encoded without special tokens and ends with EOS;
documents of one domain are concatenated and cut into instances of at most `max_len + 1` tokens
(one more than the training context, so inputs and shifted targets both have `max_len`). A cut is
moved back to the last EOS / newline / sentence end in the window where the text before the cut
pre-tokenises the same on its own (so a decoded instance re-tokenises to the same ids; see
`encode_document`), unless that would keep less than half
of the window, and the rest carries over into the next instance. The held-out split is made of
whole documents (document i of a domain when ⌊(i+1)·f⌋ > ⌊i·f⌋: spread evenly, exactly ⌊n·f⌋
of n), so no document straddles the two stores. `max_tokens_per_domain` stops reading a domain
once the documents read (train + val, EOS included) hold that many tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import multiprocessing as mp
import os
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from predistill.core.artifacts import (
    PredistillError,
    parse_json,
    read_manifest,
    write_json_atomic,
)
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.formats.store import FORMAT, IDENTITY_AT, TokenStoreWriter
from predistill.text.chunking import Chunker, boundary_table, encode_document, encode_document_slow
from predistill.text.sources import Source, parse_sources


@dataclass
class PrepareConfig:
    sources: list[str] = option(
        default_factory=list,
        help="a domain of the corpus: jsonl:PATH[:FIELD], "
        "parquet:PATH[:FIELD], txt:GLOB, hf:DIR[:FIELD], builtin:shakespeare, builtin:python, "
        "megatron:PREFIX; prefix NAME= to name the domain; or store:DIR alone (a token store "
        "re-tokenised instance by instance, for cross-tokenizer KD)",
        flag="--source",
        required=True,
        metavar="SPEC",
    )
    tokenizer: str = option("", "tokenizer or model spec: smollm2-135m, an HF directory or hub id", required=True)
    out: str = option("", "token store directory to write", required=True, effect=Effect.NONE)
    max_len: int = option(1024, "training context; instances hold ≤ max-len+1 tokens", interval="[8, inf)")
    val_fraction: float = option(0.0, "fraction of each domain's documents held out in OUT/val/", interval="[0, 1)")
    workers: int = option(1, "tokenizer processes", interval="[1, inf)", effect=Effect.ROUNDING)  # the same bytes
    skip_bad: bool = option(
        False, "skip (and count, as n_skipped in the manifest) malformed, empty or undecodable documents"
    )
    max_tokens_per_domain: int | None = option(
        None,
        "stop reading a domain once its train+val instances hold ≥ N tokens (default: read all)",
        metavar="N",
        interval="[1, inf)",
    )
    checkpoint_tokens: int = option(
        1 << 24,
        "make progress durable every N tokens read: a killed prepare resumes there (the store is the same bytes)",
        metavar="N",
        interval="[1, inf)",
        effect=Effect.NONE,
    )


# Tokenisation runs in worker processes; each builds its tokenizer once from the serialised form.
# This module must stay light to import (no torch, no transformers): spawned workers import it.
_worker_tokenizer = None
_worker_is_boundary = None


def _init_worker(tokenizer, is_boundary: np.ndarray | None = None) -> None:
    """`tokenizer`: a fast tokenizer's JSON definition, or a slow tokenizer itself (pickled)."""
    global _worker_tokenizer, _worker_is_boundary
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else tokenizer
    _worker_is_boundary = is_boundary


def _encode_item(item: tuple[str | np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, int]:
    text, n_skipped = item
    assert _worker_is_boundary is not None  # set by `_init_worker` in every worker
    if isinstance(text, np.ndarray):  # already ids (megatron:): checked, not encoded; cuts at word boundaries
        vocab = len(_worker_is_boundary)
        if len(text) and (int(text.min()) < 0 or int(text.max()) >= vocab):
            bad = int(text.max()) if int(text.max()) >= vocab else int(text.min())
            raise PredistillError(
                f"a pretokenized document holds id {bad}, outside the tokenizer's vocabulary "
                f"[0, {vocab}): it was tokenised with another tokenizer"
            )
        return text, 2 * _worker_is_boundary[text].astype(np.int8), n_skipped
    from tokenizers import Tokenizer

    encode = encode_document if isinstance(_worker_tokenizer, Tokenizer) else encode_document_slow
    return (*encode(_worker_tokenizer, text, _worker_is_boundary), n_skipped)


def _is_val(index: int, fraction: float) -> bool:
    """Evenly spread: document i is held out when ⌊(i+1)·f⌋ > ⌊i·f⌋, so after n documents exactly
    ⌊n·f⌋ are held out (the ⌈1/f⌉-th, ...). f is taken as the decimal the user wrote (0.29 is
    29/100, not the binary float below it), so no document shifts to a neighbour by rounding."""
    if fraction <= 0:
        return False
    f = _exact_fraction(fraction)
    return (index + 1) * f.numerator // f.denominator > index * f.numerator // f.denominator


@functools.lru_cache(maxsize=16)
def _exact_fraction(fraction: float) -> Fraction:
    return Fraction(repr(fraction))


def _documents(source: Source, stop: threading.Event):
    """(text, documents skipped so far) for each document, until `stop` is set.

    With a worker pool this generator runs in the pool's feeder thread, ahead of the consumer;
    carrying the skip count with each document keeps the recorded `n_skipped` exact (the count
    at the last document used) whatever the read-ahead."""
    docs = source.documents()
    while not stop.is_set():
        try:
            text = next(docs)
        except StopIteration:
            return
        yield text, source.n_skipped


def run(cfg: PrepareConfig) -> Path:
    out = Path(cfg.out)
    if not cfg.sources:
        raise PredistillError("prepare needs at least one --source")
    if cfg.max_len < 8:
        raise PredistillError(f"--max-len {cfg.max_len} is too small (need ≥ 8)")
    if not 0 <= cfg.val_fraction < 1:
        raise PredistillError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.workers < 1:
        raise PredistillError(f"--workers must be ≥ 1, got {cfg.workers}")
    if cfg.max_tokens_per_domain is not None and cfg.max_tokens_per_domain < 1:
        raise PredistillError(f"--max-tokens-per-domain must be ≥ 1, got {cfg.max_tokens_per_domain}")
    if cfg.checkpoint_tokens < 1:
        raise PredistillError(f"--checkpoint-tokens must be ≥ 1, got {cfg.checkpoint_tokens}")
    if out.exists() and not out.is_dir():
        raise PredistillError(f"{out} exists and is not a directory; refusing to overwrite it")
    if any(spec.startswith(STORE_SOURCE) for spec in cfg.sources):
        return _derive(cfg, out)
    sources = parse_sources(cfg.sources, cfg.skip_bad)  # also checks that every source can be read
    tokenizer, tok_info = _tokenizer(cfg.tokenizer)
    # a store is the same bytes wherever it was written and however many processes tokenised it
    config = identity(cfg, blank=True)
    output = Output(
        out, FORMAT, "token store", {"config": config, "tokenizer_hash": tok_info["hash"]}, located=IDENTITY_AT
    )
    if output.complete():
        return out

    is_boundary = boundary_table(tokenizer)
    eos = tokenizer.eos_token_id
    limit = cfg.max_tokens_per_domain
    totals = [s.count() for s in sources]
    known = [t for t in totals if t is not None]
    total = sum(known) if len(known) == len(totals) and limit is None else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the inputs as they are now: a killed prepare resumed after a source changed starts over
    plan = {"config": config, "tokenizer_hash": tok_info["hash"], "inputs": [s.fingerprint() for s in sources]}
    with output.staged(resume=lambda staging: _progress(staging, plan) is not None) as tmp:
        progress = _progress(tmp, plan) or {}
        names = ["train", "val"] if cfg.val_fraction > 0 else ["train"]
        resume = progress.get("writers", {})
        splits = {
            name: TokenStoreWriter(tmp if name == "train" else tmp / "val", len(tokenizer), resume.get(name))
            for name in names
        }
        stats = progress.get("stats", {split: [] for split in splits})
        first_domain = progress.get("domain", 0)
        if progress:
            print(
                f"predistill: resuming {tmp}: domain {first_domain + 1} of {len(sources)}, document "
                f"{progress['index']}",
                file=sys.stderr,
            )
        bar = tqdm(total=total, unit="doc", desc="prepare", dynamic_ncols=True)
        definition = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else tokenizer
        pool = (
            mp.get_context("spawn").Pool(cfg.workers, _init_worker, (definition, is_boundary))
            if cfg.workers > 1
            else None
        )
        if pool is None:
            _init_worker(definition, is_boundary)
        try:
            for domain, source in enumerate(sources):
                if domain < first_domain:
                    continue  # finished before the kill: its stats were restored
                state = progress if domain == first_domain else {}
                chunkers = {split: Chunker(cfg.max_len, is_boundary) for split in splits}
                for split, saved in state.get("chunkers", {}).items():
                    chunkers[split].buffer = np.asarray(saved["buffer"], dtype=np.int64)
                    chunkers[split].can_end = np.asarray(saved["can_end"], dtype=np.int8)
                counts = state.get("counts") or {
                    split: {"n_documents": 0, "n_instances": 0, "n_tokens": 0} for split in splits
                }
                start = state.get("index", 0)
                bar.update(start)
                stop = threading.Event()
                # documents read before the kill are skipped, not tokenised again
                docs = itertools.islice(_documents(source, stop), start, None)
                encoded = pool.imap(_encode_item, docs, chunksize=4) if pool else map(_encode_item, docs)
                n_read = state.get("n_read", 0)  # tokens read from this domain (train + val), for the limit
                n_skipped = state.get("n_skipped", 0)
                since_checkpoint = 0
                for index, (ids, can_end, n_skipped) in enumerate(encoded, start):
                    split = "val" if _is_val(index, cfg.val_fraction) else "train"
                    counts[split]["n_documents"] += 1
                    if source.pretokenized and len(ids) and ids[-1] == eos:  # it carries its EOS: no second one
                        ids, can_end = ids[:-1], can_end[:-1]
                    can_end = np.append(can_end, 2)  # after the EOS: always
                    for instance in chunkers[split].add(np.append(ids, eos), can_end):
                        _emit(splits[split], instance, domain, counts[split])
                    bar.update(1)
                    n_read += len(ids) + 1
                    since_checkpoint += len(ids) + 1
                    if limit is not None and n_read >= limit:
                        stop.set()
                        if pool:  # let the feeder stop; its read-ahead (and any error in it) is discarded
                            with contextlib.suppress(PredistillError):
                                for _ in encoded:
                                    pass
                        break
                    if since_checkpoint >= cfg.checkpoint_tokens:
                        _save_progress(tmp, plan, splits, stats, domain, index + 1, n_read, n_skipped, counts, chunkers)
                        since_checkpoint = 0
                else:
                    n_skipped = source.n_skipped  # bad records after the last good one count too
                for split, chunker in chunkers.items():
                    for instance in chunker.flush():
                        _emit(splits[split], instance, domain, counts[split])
                    stats[split].append(
                        {
                            "name": source.name,
                            "kind": source.kind,
                            "location": source.location,
                            **counts[split],
                            "n_skipped": n_skipped,
                            **source.provenance(),
                        }
                    )
                _save_progress(tmp, plan, splits, stats, domain + 1, 0, 0, 0, None, {})
        finally:
            bar.close()
            if pool:
                pool.terminate()
                pool.join()
        if sum(s["n_documents"] for s in stats["train"]) == 0:
            raise PredistillError("no documents to train on (all sources empty or held out)")
        if "val" in splits and splits["val"].n_instances == 0:
            raise PredistillError(
                f"--val-fraction {cfg.val_fraction} holds out no document: every domain has fewer "
                f"than {int(np.ceil(1 / cfg.val_fraction))} documents; raise it"
            )
        (tmp / PROGRESS).unlink()
        # val first: the top-level manifest (complete: true) is the last file written
        for split, writer in reversed(splits.items()):
            tokenizer.save_pretrained(writer.dir / "tokenizer")
            writer.finish(
                {
                    "split": split,
                    "config": config,
                    "tokenizer": tok_info,
                    "eos_id": eos,
                    "domains": stats[split],
                    "n_documents": sum(s["n_documents"] for s in stats[split]),
                }
            )
    return out


STORE_SOURCE = "store:"


def _tokenizer(spec: str):
    from predistill.modeling.models import load_tokenizer, tokenizer_hash  # heavy: keep it out of the workers

    tokenizer = load_tokenizer(spec)
    return tokenizer, {
        "spec": spec,
        "hash": tokenizer_hash(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
    }


def _derive(cfg: PrepareConfig, out: Path) -> Path:
    """`--source store:DIR`: the token store DIR re-tokenised instance by instance — instance i of OUT
    spells the same text as instance i of DIR, and so does its val split — recording DIR's hash, so
    that a teacher's logits over DIR can teach a student that reads OUT (predistill.text.crosstok)."""
    from predistill.formats.store import TokenStore
    from predistill.text.retokenize import write_retokenized

    if len(cfg.sources) != 1:
        raise PredistillError(
            f"{STORE_SOURCE}DIR re-tokenises one token store instance by instance; it cannot be "
            "mixed with other --source specs"
        )
    if cfg.val_fraction:
        raise PredistillError(f"{STORE_SOURCE}DIR carries the store's own val split over; drop --val-fraction")
    if cfg.max_tokens_per_domain is not None:
        raise PredistillError(
            f"{STORE_SOURCE}DIR keeps every instance (instance i stays instance i); drop --max-tokens-per-domain"
        )
    location = cfg.sources[0].removeprefix(STORE_SOURCE)
    src = TokenStore(location)  # refuses a missing, incomplete or corrupt store
    src.refuse_if_masked(f"re-tokenising it ({STORE_SOURCE}DIR)")
    tokenizer, tok_info = _tokenizer(cfg.tokenizer)
    # one output instance per input instance: max_len, workers and the document options do not apply
    config = {"sources": cfg.sources, "tokenizer": cfg.tokenizer}
    derived = {"path": str(Path(location).resolve()), "hash": src.hash}
    output = Output(
        out,
        FORMAT,
        "token store",
        {"config": config, "tokenizer_hash": tok_info["hash"], "derived_from_hash": src.hash},
        located=IDENTITY_AT,
    )
    if output.complete():
        return out
    val = TokenStore(src.dir / "val") if (src.dir / "val").is_dir() else None
    with output.staged() as tmp:
        # val first: the top-level manifest (complete: true) is the last file written
        for split, store, directory in [("val", val, tmp / "val"), ("train", src, tmp)]:
            if store is None:
                continue
            manifest = write_retokenized(
                store,
                np.arange(len(store)),
                directory,
                tokenizer,
                tok_info,
                split=split,
                config=config,
                progress=True,
                extra={
                    "derived_from": {"path": str(store.dir.resolve()), "hash": store.hash}
                    if split == "val"
                    else derived
                },
            )
            if manifest["n_instances"] != len(store):
                raise PredistillError(
                    f"{store.dir}: {len(store)} instances re-tokenised into {manifest['n_instances']}"
                )
    return out


PROGRESS = "progress.json"


def _progress(staging: Path, plan: dict) -> dict | None:
    """The last checkpoint of an interrupted prepare into `staging`, if it was made with `plan`."""
    try:
        progress = parse_json((staging / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) and progress.get("plan") == plan else None


def _save_progress(
    staging: Path,
    plan: dict,
    splits: dict,
    stats: dict,
    domain: int,
    index: int,
    n_read: int,
    n_skipped: int,
    counts: dict | None,
    chunkers: dict,
) -> None:
    """A checkpoint: the writers' appended data made durable first, then the state that resumes
    from it — the next document, the open domain's counts and the chunkers' carried remainder."""
    writers = {split: writer.checkpoint() for split, writer in splits.items()}
    write_json_atomic(
        staging / PROGRESS,
        {
            "plan": plan,
            "writers": writers,
            "stats": stats,
            "domain": domain,
            "index": index,
            "n_read": n_read,
            "n_skipped": n_skipped,
            "counts": counts,
            "chunkers": {
                split: {"buffer": c.buffer.tolist(), "can_end": c.can_end.tolist()} for split, c in chunkers.items()
            },
        },
    )


def _emit(writer: TokenStoreWriter, instance: np.ndarray, domain: int, counts: dict) -> None:
    writer.append(instance, domain)
    counts["n_instances"] += 1
    counts["n_tokens"] += len(instance)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, PrepareConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(PrepareConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    m = read_manifest(out, FORMAT)
    print(
        f"predistill: wrote {out}: {m['n_instances']} instances, {m['n_tokens']} tokens ({m['dtype']})"
        + (f"; held-out {out / 'val'}" if cfg.val_fraction > 0 else "")
    )
