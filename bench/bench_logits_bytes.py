"""Bytes/token of the logits store for each truncation / sampling setting, on the real teacher.

    python bench/bench_logits_bytes.py [--tokens 3000] [--work DIR]

Builds a small token store (prepare.run, tokenizer smollm2-135m) from the first documents of
`builtin:shakespeare` and `builtin:python` (cut to about --tokens tokens in all), runs the
SmolLM2-135M teacher over it once, keeps its final hidden states, and writes one logits store per
setting from them (the lm-head projection, truncation/sampling and encoding are what differ).
Prints a markdown table: entries/position, bytes/token as the manifest measures it, the teacher
mass the entries hold (topk), and the mean KL(p_teacher ‖ stored distribution renormalised) in nats,
a fidelity proxy until the student-quality half of the curve (which needs `train`) is added:
`measure(settings, ...)` takes any list of LogitsConfig and returns one row per setting.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from common import emit

from predistill.formats.logits import LogitsConfig, LogitsStore, LogitsStoreWriter
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model
from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.text.sources import parse_sources

DEFAULT_SETTINGS = [
    *(LogitsConfig(mode="topk", top_p=0.95, top_k=k) for k in (1, 2, 4, 5, 8, 16, 50)),
    *(LogitsConfig(mode="topk", top_p=p, top_k=50) for p in (0.5, 0.8, 0.9)),
    LogitsConfig(mode="topk", top_p=0.95, top_k=4, logprob_bits=6),
    LogitsConfig(mode="topk", top_p=0.95, top_k=50, logprob_bits=16, logprob_min=-30.0),
    *(LogitsConfig(mode="sample", samples=n) for n in (1, 2, 4, 8, 12, 16, 32)),
]


def build_store(work: Path, n_tokens: int) -> Path:
    """A token store of about n_tokens teacher tokens, half Shakespeare, half Python."""
    jsonl = []
    for src in parse_sources(["builtin:shakespeare", "builtin:python"]):
        text = next(iter(src.documents()))[: n_tokens * 2]  # ≈ n_tokens/2 tokens at ~4 chars/token
        path = work / f"{src.name}.jsonl"
        path.write_text(json.dumps({"text": text}) + "\n")
        jsonl.append(f"{src.name}=jsonl:{path}")
    out = work / "store"
    if not out.exists():
        prepare(PrepareConfig(sources=jsonl, tokenizer="smollm2-135m", out=str(out), max_len=512))
    return out


@torch.no_grad()
def teacher_hidden(store: TokenStore, cache: Path) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The teacher's final hidden states per instance and its lm head (cached in `cache`)."""
    if cache.is_file():
        saved = torch.load(cache)
        if saved["store_hash"] == store.hash:
            return saved["hidden"], saved["weight"]
    model, _ = load_model("smollm2-135m")
    model.eval()
    hidden = {}
    for ids, tokens, _lengths in store.iter_batches(1):
        hidden[int(ids[0])] = model.model(input_ids=tokens).last_hidden_state[0]
    weight = model.lm_head.weight.detach().clone()
    torch.save({"store_hash": store.hash, "hidden": hidden, "weight": weight}, cache)
    return hidden, weight


@torch.no_grad()
def fidelity(
    store: TokenStore, logits: LogitsStore, hidden: dict[int, torch.Tensor], weight: torch.Tensor
) -> tuple[float, float]:
    """(mean retained teacher mass, mean KL(p ‖ stored distribution renormalised over its entries))."""
    mass, kl, n = 0.0, 0.0, 0
    for i in range(len(store)):
        n_pos = int(store.lengths[i]) - 1
        if n_pos <= 0:
            continue
        logp = torch.log_softmax(hidden[i][:n_pos] @ weight.t(), -1)
        t = logits.read(np.full(n_pos, i), np.arange(n_pos))
        p_at = logp.gather(1, t.ids).exp() * t.mask
        mass += p_at.sum().item()
        q = torch.softmax(t.logprobs.masked_fill(~t.mask, float("-inf")), -1)
        # KL(p‖q) with q zero off the entries is infinite; report KL of the renormalised restriction
        p_r = p_at / p_at.sum(-1, keepdim=True)
        kl += (p_r * (p_r.clamp(min=1e-30).log() - q.clamp(min=1e-30).log()) * t.mask).sum().item()
        n += n_pos
    return mass / n, kl / n


def measure(
    settings: list[LogitsConfig], store_dir: Path, hidden: dict[int, torch.Tensor], weight: torch.Tensor, work: Path
) -> list[dict]:
    """One row per setting: the manifest's bytes/token and entries/position, plus fidelity."""
    store = TokenStore(store_dir)
    rows = []
    for cfg in settings:
        out = work / "logits"
        shutil.rmtree(out, ignore_errors=True)
        writer = LogitsStoreWriter(out, store, cfg, vocab_size=weight.shape[0], teacher="smollm2-135m")
        start = time.perf_counter()
        for ids, tokens, lengths in store.iter_batches(1):
            writer.add_hidden(ids, hidden[int(ids[0])][None], weight, tokens, lengths)
        manifest = writer.finish()
        seconds = time.perf_counter() - start
        reader = LogitsStore(out, store)
        mass, kl = fidelity(store, reader, hidden, weight)
        length = int(store.lengths.max())
        start = time.perf_counter()
        for _ in range(5):  # what a training step pays: one padded batch of every instance
            reader.read_batch(np.arange(len(store)), length)
        read_us = (time.perf_counter() - start) / 5 / manifest["n_positions"] * 1e6
        print(f"{describe(cfg)}: {manifest['bytes_per_token']:.2f} B/token", file=sys.stderr, flush=True)
        rows.append(
            {
                "setting": describe(cfg),
                "entries_per_position": manifest["entries_per_position"],
                "bytes_per_token": manifest["bytes_per_token"],
                "id_order_bytes_per_token": manifest.get("id_order_bytes", 0) / manifest["n_positions"],
                "version": manifest["version"],
                "retained_mass": mass,
                "kl_renorm": kl,
                "logprob_max_abs_error": manifest["encoding"].get("logprob_max_abs_error"),
                "logprob_clipped": manifest["logprob_clipped"],
                "write_s": seconds,
                "read_us_per_position": read_us,
                "config": asdict(cfg),
            }
        )
    return rows


def describe(cfg: LogitsConfig) -> str:
    if cfg.mode == "topk":
        return f"top-{cfg.top_p}-{cfg.top_k}, lp {cfg.logprob_bits} bit"
    return f"sample N={cfg.samples}" + (f" T={cfg.sample_temperature}" if cfg.sample_temperature != 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=3000, help="teacher tokens to measure on (default 3000)")
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="only these settings (names as printed, e.g. 'sample N=8' 'top-0.95-50, lp 8 bit')",
    )
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_logits_"))
    work.mkdir(parents=True, exist_ok=True)
    store_dir = build_store(work, args.tokens)
    store = TokenStore(store_dir)
    start = time.perf_counter()
    hidden, weight = teacher_hidden(store, work / "teacher_hidden.pt")
    print(
        f"teacher forward: {store.manifest['n_tokens']} tokens in {len(store)} instances, "
        f"{time.perf_counter() - start:.1f}s",
        file=sys.stderr,
    )
    settings = [c for c in DEFAULT_SETTINGS if args.settings is None or describe(c) in args.settings]
    rows = measure(settings, store_dir, hidden, weight, work)
    n_positions = int(sum(store.lengths - 1))
    print(
        f"`{' '.join(['python', *sys.argv])}` — smollm2-135m teacher, {n_positions} positions "
        f"(builtin:shakespeare + builtin:python), vocab {weight.shape[0]} (16-bit ids)\n"
    )
    # the id ranking (version 2) is one file per store, 16 KB for a 49k vocabulary: its share shrinks
    # with the store, so it is shown apart from the per-position bytes
    print(
        "| setting | entries/pos | bytes/token | of which id ranking | teacher mass kept | KL(p‖stored), nats | "
        "lp max err | read µs/pos |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        err = "—" if r["logprob_max_abs_error"] is None else f"{r['logprob_max_abs_error']:.4f}"
        mass = f"{r['retained_mass']:.3f}"
        print(
            f"| {r['setting']} | {r['entries_per_position']:.2f} | {r['bytes_per_token']:.2f} | "
            f"{r['id_order_bytes_per_token']:.2f} | {mass} | {r['kl_renorm']:.4f} | {err} | "
            f"{r['read_us_per_position']:.2f} |"
        )
    by_name = {r["setting"]: r for r in rows}
    default = by_name.get(describe(LogitsConfig()))
    for r in rows:
        readme = None
        if r is default:
            others = "; ".join(
                f"{name}: {by_name[name]['bytes_per_token']:.2f}"
                for name in ("top-0.95-5, lp 8 bit", "top-0.95-50, lp 8 bit", "sample N=4")
                if name in by_name
            )
            readme = {
                "what": f"stored teacher signal (logits store v{r['version']}), SmolLM2-135M on "
                f"{n_positions} positions of Shakespeare + Python",
                "result": f"default RS-KD 8 samples: **{r['bytes_per_token']:.2f} B/token** (of which the "
                f"store's id ranking {r['id_order_bytes_per_token']:.2f}); {others} B/token",
                "goal": "≤ 8 B/token",
            }
        emit(
            "logits_bytes",
            readme=readme,
            positions=n_positions,
            **{k: v for k, v in r.items() if k not in ("config", "bench")},
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
