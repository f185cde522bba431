"""encode_document's cut levels: a word's characters come from the token offsets (linear in the
document), and agree with the tokenizer's own per-word lookup (`word_to_chars`, quadratic)."""

import numpy as np

from predistill.modeling.models import load_tokenizer
from predistill.text.chunking import boundary_table, encode_document

TEXTS = [
    "Héllo  \n  wörld 😀  \n\n\t x",
    "a  \n" * 40,
    "  ",
    "def f(x):\n    return x  # done\n\n",
    "One. Two!  Three?\n" * 20,
    "日本語のテキスト。  \n次",
]


def levels_by_word_lookup(tokenizer, text, is_boundary):
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    words = np.array([-1 - j if w is None else w for j, w in enumerate(enc.word_ids)])
    between = np.ones(len(words), dtype=bool)
    between[:-1] = words[1:] != words[:-1]
    for j in np.flatnonzero(between[:-1]):
        if enc.word_ids[j] is not None:
            start, end = enc.word_to_chars(enc.word_ids[j])
            if start > 0 and text[start - 1].isspace() and text[start:end].isspace():
                between[j] = False
    return ids, between.astype(np.int8) * (1 + is_boundary[ids].astype(np.int8))


def test_cut_levels_equal_the_per_word_lookup(bpe_tokenizer):
    tokenizer = load_tokenizer(str(bpe_tokenizer))
    is_boundary = boundary_table(tokenizer)
    for text in TEXTS + ["  ".join(TEXTS) * 5]:
        ids, levels = encode_document(tokenizer.backend_tokenizer, text, is_boundary)
        ref_ids, ref_levels = levels_by_word_lookup(tokenizer.backend_tokenizer, text, is_boundary)
        assert ids.tolist() == ref_ids.tolist()
        assert levels.tolist() == ref_levels.tolist(), text[:40]
