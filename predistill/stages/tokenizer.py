"""`predistill tokenizer`: train a byte-level BPE tokenizer on text sources, save it as an HF
tokenizer directory (loadable by `AutoTokenizer.from_pretrained` and by every `--tokenizer`).

`--source store:DIR` trains on a token store's text (its train split, each instance decoded exactly
and split at its EOS tokens): the vocabulary of a student that will read that very corpus."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from predistill.core.artifacts import PredistillError, write_manifest
from predistill.core.config import Effect, add_config_arguments, config_from_args, identity, option
from predistill.core.output import Output
from predistill.formats.store import TokenStore
from predistill.text.sources import parse_sources

STORE_SOURCE = "store:"

EOS = "<|endoftext|>"
FORMAT = "tokenizer"


@dataclass
class TokenizerConfig:
    sources: list[str] = option(
        default_factory=list,
        help="text to train on (same specs as `prepare`), or store:DIR: a token store's text",
        flag="--source",
        required=True,
        metavar="SPEC",
    )
    out: str = option("", "directory for the HF tokenizer", required=True, effect=Effect.NONE)
    vocab_size: int = option(8192, "target vocabulary size, EOS included", interval="[257, inf)")
    min_frequency: int = option(2, "minimum pair count for a merge", interval="[0, inf)")
    skip_bad: bool = option(False, "skip (and count) malformed or empty documents")


def run(cfg: TokenizerConfig) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not cfg.sources:
        raise PredistillError("tokenizer needs at least one --source")
    if cfg.vocab_size < 257:
        raise PredistillError(f"--vocab-size {cfg.vocab_size} is too small: a byte-level BPE needs > 256")
    out = Path(cfg.out)
    config = identity(cfg, blank=True)
    stores = [TokenStore(spec.removeprefix(STORE_SOURCE)) for spec in cfg.sources if spec.startswith(STORE_SOURCE)]
    if stores:  # what a store holds is part of the identity: another store at the same path is other text
        config["store_hashes"] = [store.hash for store in stores]
    output = Output(out, FORMAT, "tokenizer directory", {"config": config})
    if output.complete():
        return out
    sources = parse_sources([spec for spec in cfg.sources if not spec.startswith(STORE_SOURCE)], cfg.skip_bad)
    if pretokenized := [s.kind + ":" + s.location for s in sources if s.pretokenized]:
        raise PredistillError(f"{pretokenized[0]} holds token ids, not text: a tokenizer is trained on text sources")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    def texts():
        for source in sources:
            yield from source.documents()
        for store in stores:
            eos = store.tokenizer().eos_token
            for i in range(len(store)):
                yield from (doc for doc in store.decode(i).split(eos) if doc)

    bpe.train_from_iterator(texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        model_max_length=1 << 30,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )  # exact decode
    with output.staged() as tmp:
        tokenizer.save_pretrained(tmp)
        write_manifest(
            tmp,
            {
                "format": FORMAT,
                "version": 1,
                "config": config,
                "vocab_size": len(tokenizer),
                "eos_id": tokenizer.eos_token_id,
                "n_skipped": {s.name: s.n_skipped for s in sources},
            },
        )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TokenizerConfig)


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(TokenizerConfig, args)
    if cfg is None:
        return
    out = run(cfg)
    print(f"predistill: wrote tokenizer {out}")
