"""`predistill export --store DIR --format megatron --out PREFIX`: a token store in another
toolkit's format, so that a corpus prepared (or refined by MiniPLM's Difference Sampling and
materialised) here trains in Megatron-LM.

`megatron`: PREFIX.bin + PREFIX.idx (megatron.py), one sequence per stored instance, in store
order, ids in uint16 when the vocabulary fits, else int32. A Megatron document ends after each
instance that ends with the store's EOS (and after the last one): a document cut across instances
by `prepare` is one document again, so `prepare --source megatron:PREFIX` reads back the same token
stream. Only the store given is written: export its held-out split with `--store DIR/val --out PREFIX_val`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from predistill.core.artifacts import PredistillError
from predistill.core.config import add_config_arguments, config_from_args, option
from predistill.formats import megatron
from predistill.formats.store import TokenStore

FORMATS = ("megatron",)


@dataclass
class ExportConfig:
    store: str = option("", "token store to export", required=True)
    format: str = option("megatron", "megatron: Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx)", choices=FORMATS)
    out: str = option("", "output prefix (megatron: writes OUT.bin and OUT.idx)", required=True)


def run(cfg: ExportConfig):
    if cfg.format not in FORMATS:
        raise PredistillError(f"unknown --format {cfg.format!r}; known: {', '.join(FORMATS)}")
    store = TokenStore(cfg.store)  # checks the store's hashes
    store.refuse_if_masked("a Megatron export")
    for p in megatron.paths(cfg.out):
        if p.is_dir():
            raise PredistillError(f"{p} is a directory; --out is a file prefix")
        if p.is_symlink():
            raise PredistillError(f"{p} is a symbolic link; refusing to write through it")
    if any(p.exists() for p in megatron.paths(cfg.out)):  # replaced only when it is an indexed dataset itself
        try:
            megatron.IndexedDataset(cfg.out)
        except PredistillError:
            raise PredistillError(
                f"{cfg.out}.bin/.idx exist and are not a Megatron indexed dataset; refusing to overwrite them"
            ) from None
    n = len(store)
    # a document ends where an instance's last token is EOS (read from the token array: one pass over the store)
    last = np.asarray(store.tokens[store.offsets[1:] - 1]) if n else np.zeros(0)
    ends = (np.flatnonzero(last == store.eos_id) + 1).tolist()
    if n and (not ends or ends[-1] != n):
        ends.append(n)
    return megatron.write(cfg.out, (store[i] for i in range(n)), store.vocab_size, ends)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ExportConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(ExportConfig, args)
    if cfg is None:
        return
    bin_path, idx_path = run(cfg)
    print(f"predistill: wrote {bin_path} and {idx_path}")
