"""Student quality vs bytes/token: the PD student's held-out loss for each logits-store setting.

    python bench/bench_pd_curve.py [--work /tmp/pd-curve]

The student-quality half of the curve that picks the logits store's default (issue 5, item 6;
the bytes half with fidelity proxies is bench/bench_logits_bytes.py). Steps, all cached in --work
so a rerun skips what is done:

1. the demo corpus, exactly as recipes/demo.toml's `corpus` stage makes it (builtin:shakespeare +
   builtin:python, tokenizer smollm2-135m, max_len 128, val_fraction 0.25, 19 000 tokens/domain);
2. one SmolLM2-135M pass over the train split, keeping the final hidden states (fp32, one row per
   token, aligned with the token store's offsets) in teacher_hidden.npy;
3. per setting, a logits store written from those hidden states with LogitsStoreWriter (fixed
   batching), and its measured bytes/token from the manifest;
4. per store, the demo's PD student (preset:tiny, 1.2e12 FLOPs, WSD, kld at τ = 2, α 0.9 WSD) and
   once the LM-only student with the same config minus KD; held-out loss = the run manifest's
   final_val_loss (MiniPLM's definition, on the corpus's val split).

Prints a markdown table (setting, entries/position, bytes/token, held-out loss, Δ vs LM-only)
and writes it as JSON to WORK/pd_curve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from predistill.artifacts import read_manifest
from predistill.kd import KDConfig
from predistill.logits import LogitsConfig, LogitsStoreWriter
from predistill.models import load_model
from predistill.prepare import PrepareConfig
from predistill.prepare import run as prepare
from predistill.store import TokenStore
from predistill.train import TrainConfig
from predistill.train import run as train

TEACHER = "smollm2-135m"
DEFAULT = LogitsConfig(mode="topk")  # top-0.95-5, 8-bit log-probs
SETTINGS = [
    *(LogitsConfig(mode="topk", top_p=0.95, top_k=k) for k in (1, 2, 5, 16, 50)),
    LogitsConfig(mode="topk", top_p=0.5, top_k=50),
    *(LogitsConfig(mode="sample", samples=n) for n in (4, 8)),
]
# recipes/demo.toml, stage "corpus"
CORPUS = dict(sources=["builtin:shakespeare", "builtin:python"], tokenizer=TEACHER, max_len=128,
              val_fraction=0.25, max_tokens_per_domain=19000)
# recipes/demo.toml, stage "pd" (eval_every left out: only the final val loss is used)
STUDENT = dict(model="preset:tiny", flops_budget=1.2e12, batch_size=16, seq_len=128, lr=3e-3, lr_schedule="wsd",
               eval_instances=256)
PD = dict(kd=KDConfig(loss="kld", temperature=2.0), alpha=0.9, alpha_schedule="wsd")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def describe(cfg: LogitsConfig) -> str:
    if cfg.mode == "topk":
        return f"top-{cfg.top_p}-{cfg.top_k}"
    return f"RS-KD sample N={cfg.samples}"


def slug(cfg: LogitsConfig) -> str:
    return f"top{cfg.top_p}-k{cfg.top_k}" if cfg.mode == "topk" else f"sample-n{cfg.samples}"


def build_corpus(work: Path) -> Path:
    return prepare(PrepareConfig(out=str(work / "corpus"), **CORPUS))  # skips a complete store of this config


@torch.no_grad()
def teacher_pass(store: TokenStore, work: Path, batch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Final hidden states of the teacher, [n_tokens, H] fp32 (row offsets[i] + t is instance i's
    position t), cached in WORK/teacher_hidden.npy; and the lm head weight [V, H]."""
    path, marker = work / "teacher_hidden.npy", work / "teacher_hidden.json"
    model, _ = load_model(TEACHER)
    model.eval()
    weight = model.lm_head.weight.detach().float().clone()
    n_tokens, width = int(store.offsets[-1]), model.config.hidden_size
    expect = {"store_hash": store.hash, "teacher": TEACHER, "shape": [n_tokens, width], "batch_size": batch_size}
    if marker.is_file() and path.is_file() and json.loads(marker.read_text()) == expect:
        log(f"teacher pass: cached in {path}")
        return np.load(path, mmap_mode="r"), weight
    tmp = path.with_name(path.name + ".tmp")
    hidden = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_tokens, width))
    start, done = time.perf_counter(), 0
    # fixed batching in store order: right padding + causal attention, no mask needed (as `score`)
    for ids, tokens, lengths in store.iter_batches(batch_size):
        h = model.model(input_ids=tokens, use_cache=False).last_hidden_state.float().numpy()
        for b, i in enumerate(ids):
            a = int(store.offsets[i])
            hidden[a:a + int(lengths[b])] = h[b, :int(lengths[b])]
        done += int(lengths.sum())
        if (ids[0] // batch_size) % 20 == 0:
            log(f"teacher pass: {done}/{n_tokens} tokens, {time.perf_counter() - start:.0f}s")
    hidden.flush()
    del hidden
    os.replace(tmp, path)
    marker.write_text(json.dumps(expect))
    log(f"teacher pass: {n_tokens} tokens in {time.perf_counter() - start:.1f}s")
    return np.load(path, mmap_mode="r"), weight


def write_store(cfg: LogitsConfig, store: TokenStore, hidden: np.ndarray, weight: torch.Tensor, out: Path,
                batch_size: int) -> tuple[dict, float]:
    start = time.perf_counter()
    writer = LogitsStoreWriter(out, store, cfg, vocab_size=weight.shape[0], teacher=TEACHER)
    for ids, tokens, lengths in store.iter_batches(batch_size, ids=writer.todo_instances()):
        h = torch.zeros(len(ids), tokens.shape[1], hidden.shape[1])
        for b, i in enumerate(ids):
            a = int(store.offsets[i])
            h[b, :int(lengths[b])] = torch.from_numpy(np.array(hidden[a:a + int(lengths[b])]))
        writer.add_hidden(ids, h, weight, tokens, lengths)
    manifest = writer.finish()
    return manifest, time.perf_counter() - start


def train_student(store_dir: Path, out: Path, kd_logits: Path | None) -> tuple[dict, float]:
    start = time.perf_counter()
    extra = dict(kd_logits=str(kd_logits), **PD) if kd_logits else {}
    train(TrainConfig(store=str(store_dir), out=str(out), **STUDENT, **extra))
    return read_manifest(out, "run"), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/pd-curve", help="cache directory (default /tmp/pd-curve)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher / writer batch (default 8)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])

    corpus = build_corpus(work)
    store = TokenStore(corpus)
    hidden, weight = teacher_pass(store, work, args.batch_size)

    lm_manifest, lm_s = train_student(corpus, work / "runs" / "lm", None)
    lm_loss = lm_manifest["final_val_loss"]
    log(f"LM-only: val loss {lm_loss:.4f} ({lm_s:.0f}s)")
    rows = [{"setting": "LM only (no KD)", "config": None, "entries_per_position": None, "bytes_per_token": None,
             "heldout_loss": lm_loss, "delta_vs_lm": 0.0, "steps": lm_manifest["steps"], "train_s": lm_s}]
    for cfg in SETTINGS:
        ldir = work / "logits" / slug(cfg)
        manifest, write_s = write_store(cfg, store, hidden, weight, ldir, args.batch_size)
        log(f"{describe(cfg)}: {manifest['bytes_per_token']:.2f} B/token ({write_s:.0f}s)")
        run_manifest, train_s = train_student(corpus, work / "runs" / slug(cfg), ldir)
        loss = run_manifest["final_val_loss"]
        log(f"{describe(cfg)}: val loss {loss:.4f}, Δ {loss - lm_loss:+.4f} ({train_s:.0f}s)")
        rows.append({"setting": describe(cfg), "config": asdict(cfg),
                     "entries_per_position": manifest["entries_per_position"],
                     "bytes_per_token": manifest["bytes_per_token"], "heldout_loss": loss,
                     "delta_vs_lm": loss - lm_loss, "steps": run_manifest["steps"], "write_s": write_s,
                     "train_s": train_s})

    val = TokenStore(corpus / "val")
    total_s = time.perf_counter() - t0
    print(f"`{command}` — teacher {TEACHER}, demo corpus: {int(store.offsets[-1])} train tokens in {len(store)} "
          f"instances, held-out loss on {len(val)} val instances ({int(val.offsets[-1])} tokens); student "
          f"preset:tiny, {rows[0]['steps']} steps, seed 0; total {total_s / 60:.1f} min\n")
    print("| setting | entries/pos | bytes/token | student held-out loss | Δ vs LM-only |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        name = r["setting"]
        if r["config"] is not None and LogitsConfig(**r["config"]) == DEFAULT:
            name = f"**{name} (default)**"
        ent = "—" if r["entries_per_position"] is None else f"{r['entries_per_position']:.2f}"
        bpt = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.2f}"
        delta = "—" if r["config"] is None else f"{r['delta_vs_lm']:+.4f}"
        print(f"| {name} | {ent} | {bpt} | {r['heldout_loss']:.4f} | {delta} |")
    (work / "pd_curve.json").write_text(json.dumps({"command": command, "total_s": total_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
