"""A saved tokenizer directory, as predistill reads one: the `tokenizer` stage's artifact and the
copy inside every token store. Whatever the source (a directory here, a model spec through
`models.load_tokenizer`), a tokenizer is made ready the same way (`ready`): it must have an EOS
token (documents end with it), pads with it (MiniPLM pads with EOS and masks it out), and decodes
exactly."""

from __future__ import annotations

import sys
from pathlib import Path

from predistill.core.artifacts import PredistillError, reason_of


def ready(tokenizer, spec: str):
    """`tokenizer` (named `spec` in messages) as every stage uses it. Tokenizers with no fast (Rust)
    implementation are kept, with a warning: they tokenise more slowly, and `prepare` can cut their
    instances only after boundary tokens."""
    if not getattr(tokenizer, "is_fast", False):
        print(
            f"predistill: warning: tokenizer '{spec}' has no fast (Rust) implementation; using the slow one "
            "(tokenising is slower; instances are cut after boundary tokens only)",
            file=sys.stderr,
        )
    if tokenizer.eos_token_id is None:
        raise PredistillError(f"tokenizer '{spec}' has no EOS token; documents need one to end with")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # decode exactly: the "clean-up" turns " ." into "." and breaks decode → encode round trips
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def load_dir(directory: Path):
    """The tokenizer saved in `directory` (never a hub lookup); a damaged one is a one-line error."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # noqa: BLE001 — a damaged directory fails in many ways (a JSON error, an ImportError)
        raise PredistillError(
            f"cannot load tokenizer '{directory}': {reason_of(e)} (is the directory damaged, or not a tokenizer?)"
        ) from None
    return ready(tokenizer, str(directory))
