"""Re-tokenisation: how a model or store with another tokenizer sees a token store's instances.

`retokenize` is the one rule (documents split at the source EOS, decoded exactly, encoded without
special tokens, joined with the target EOS); `write_retokenized` is the one writer of a
re-tokenised store split, used by `sample --materialize` (cross-family students) and by `generate`
(the held-out split of a teacher with another tokenizer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from predistill.formats.store import TokenStore, TokenStoreWriter
from predistill.text.chunking import Chunker, boundary_table


def retokenize(ids: np.ndarray, source_tokenizer, source_eos: int, target_tokenizer) -> np.ndarray:
    """Re-encode a stored instance with another tokenizer.

    The instance is split at the source EOS (document ends); each piece is decoded to text and
    encoded without special tokens; pieces are joined with the target EOS, keeping a final EOS
    where the source had one. This is how both cross-tokenizer scoring and cross-family
    materialisation see an instance.
    """
    ids = np.asarray(ids, dtype=np.int64)
    ends = np.flatnonzero(ids == source_eos)
    bounds = np.concatenate([[-1], ends, [len(ids)]])
    target_eos = target_tokenizer.eos_token_id
    out: list[int] = []
    for k in range(len(bounds) - 1):
        piece = ids[bounds[k] + 1 : bounds[k + 1]]
        if len(piece):
            # exact decode: no "cleaned up" spaces, so the text is what the source ids spell
            text = source_tokenizer.decode(
                piece.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            out.extend(target_tokenizer.encode(text, add_special_tokens=False))
        if k < len(ends):
            out.append(target_eos)
    return np.asarray(out, dtype=np.int64)


def write_retokenized(
    src: TokenStore,
    ids: np.ndarray,
    directory: str | Path,
    tokenizer,
    tok_info: dict,
    *,
    split: str,
    config,
    extra: dict,
    max_len: int | None = None,
    progress: bool = False,
) -> dict:
    """Write instances `ids` of `src` (in that order) as a token store in `tokenizer`'s ids.

    Instances are copied when `tok_info["hash"]` is the source's tokenizer, else re-tokenised;
    `max_len` re-cuts the result into instances of ≤ max_len+1 tokens the way `prepare` does (per
    domain, flushing a domain's remainder as soon as the next instance is of another domain, so the
    output keeps corpus order). Returns the manifest (`config` and `extra` are recorded in it)."""
    ids = np.asarray(ids, dtype=np.int64)
    writer = TokenStoreWriter(directory, tok_info["vocab_size"])
    same_tokenizer = tok_info["hash"] == src.tokenizer_hash
    eos = tokenizer.eos_token_id
    is_boundary = boundary_table(tokenizer) if max_len else None
    counts = {d: {"n_documents": 0, "n_instances": 0, "n_tokens": 0} for d in range(len(src.domain_names))}
    chunkers: dict[int, Chunker] = {}

    def emit(row: np.ndarray, d: int) -> None:
        writer.append(row, d)
        counts[d]["n_instances"] += 1
        counts[d]["n_tokens"] += len(row)
        counts[d]["n_documents"] += int((row == eos).sum())

    bar = tqdm(
        total=int(src.lengths[ids].sum()) if len(ids) else 0,
        unit="tok",
        unit_scale=True,
        desc=f"re-tokenise {split}",
        dynamic_ncols=True,
        disable=not progress,
        file=sys.stderr,
    )
    try:  # the bar ends its line before an error is printed
        for i in ids.tolist():
            d = int(src.domain_ids[i])
            row = (
                np.asarray(src[i], dtype=np.int64)
                if same_tokenizer
                else retokenize(src[i], src.tokenizer(), src.eos_id, tokenizer)
            )
            if max_len is None:
                if len(row):
                    emit(row, d)
            else:
                assert is_boundary is not None  # computed above for a max_len (callers require ≥ 8)
                for other in [o for o in chunkers if o != d]:
                    for piece in chunkers.pop(other).flush():
                        emit(piece, other)
                for piece in chunkers.setdefault(d, Chunker(max_len, is_boundary)).add(row):
                    emit(piece, d)
            bar.update(len(src[i]))
    finally:
        bar.close()
    for d, chunker in sorted(chunkers.items()):
        for piece in chunker.flush():
            emit(piece, d)
    meta = src.manifest["domains"]
    domains = [
        {
            "name": name,
            "kind": (meta[d] or {}).get("kind"),
            "location": (meta[d] or {}).get("location"),
            **counts[d],
            "n_skipped": 0,
        }
        for d, name in enumerate(src.domain_names)
    ]
    tokenizer.save_pretrained(writer.dir / "tokenizer")
    return writer.finish(
        {
            "split": split,
            "config": config,
            "tokenizer": tok_info,
            "eos_id": eos,
            "domains": domains,
            "n_documents": sum(c["n_documents"] for c in counts.values()),
            **extra,
        }
    )
