"""prepare's per-document encoding (token ids + cut levels) vs a plain `encode`, on one long line.

    python bench/bench_prepare.py        # one JSON line per document size

The cut levels need each word's character span; taking it from the token offsets keeps
`encode_document` linear in the document (it was quadratic through `word_to_chars`).
"""

import os
import time

from common import emit

from predistill.modeling.models import load_tokenizer
from predistill.text.chunking import boundary_table, encode_document


def main() -> None:
    tokenizer = load_tokenizer("smollm2-135m")
    rust, is_boundary = tokenizer.backend_tokenizer, boundary_table(tokenizer)
    base = open(os.__file__).read().replace("\n", " ")  # one line: no newline boundaries to cut at
    seconds = {}
    for chars in (57_000, 228_000, 3_400_000):
        text = (base * (chars // len(base) + 1))[:chars]
        t0 = time.perf_counter()
        ids, _ = encode_document(rust, text, is_boundary)
        t1 = time.perf_counter()
        rust.encode(text, add_special_tokens=False)
        t2 = time.perf_counter()
        seconds[chars] = t1 - t0
        last = chars == 3_400_000
        emit(
            "prepare_encode_document",
            chars=chars,
            tokens=len(ids),
            encode_document_s=round(t1 - t0, 3),
            plain_encode_s=round(t2 - t1, 3),
            ratio=round((t1 - t0) / (t2 - t1), 2),
            readme=None
            if not last
            else {
                "what": "`prepare` on one long line (3.4 MB, no newline), SmolLM2 tokenizer",
                "result": f"{t1 - t0:.1f} s (plain `encode`: {t2 - t1:.1f} s); 57 KB → {seconds[57_000]:.2f} s, "
                f"228 KB → {seconds[228_000]:.2f} s: linear",
                "goal": "a 3 MB line < 30 s",
            },
        )


if __name__ == "__main__":
    main()
