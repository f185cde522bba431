"""Student quality vs bytes/token: the PD student's held-out loss for each logits-store setting.

    python bench/bench_pd_curve.py [--work /tmp/pd-curve]
    # issue 13's scale: students on ≥ 500k tokens, 3 paired seeds, the stores that matter
    python bench/bench_pd_curve.py --work /tmp/pd-curve-500k --tokens-per-domain 320000 --val-fraction 0.05 \
        --steps 256 --seeds 0 1 2 --settings top0.95-k50 sample-n8 --temperature 1

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

With several seeds (a seed fixes the student's init and data order, the same for every setting, so
the differences are paired) the table gives mean ± std over seeds and the paired Δ vs LM-only with
its standard error. Prints a markdown table, one JSON line per trained student, and writes it all
as JSON to WORK/pd_curve.json.
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
from common import emit

from predistill.core.artifacts import read_manifest
from predistill.formats.logits import LogitsConfig, LogitsStoreWriter
from predistill.formats.store import TokenStore
from predistill.modeling.models import load_model
from predistill.stages.prepare import PrepareConfig
from predistill.stages.prepare import run as prepare
from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train
from predistill.training.kd import KDConfig

TEACHER = "smollm2-135m"
DEFAULT = LogitsConfig()  # the store default (RS-KD, 8 draws)
SETTINGS = [
    *(LogitsConfig(mode="topk", top_p=0.95, top_k=k) for k in (1, 2, 5, 16, 50)),
    LogitsConfig(mode="topk", top_p=0.5, top_k=50),
    *(LogitsConfig(mode="sample", samples=n) for n in (4, 8)),
]
# recipes/demo.toml, stage "corpus"
CORPUS = dict(
    sources=["builtin:shakespeare", "builtin:python"],
    tokenizer=TEACHER,
    max_len=128,
    val_fraction=0.25,
    max_tokens_per_domain=19000,
)
# recipes/demo.toml, stage "pd" (eval_every left out: only the final val loss is used)
STUDENT = dict(
    model="preset:tiny",
    flops_budget=1.2e12,
    batch_size=16,
    seq_len=128,
    lr=3e-3,
    lr_schedule="wsd",
    decay_ratio=0.01,
    eval_instances=256,
)  # the 1% decay its published curve used
PD = dict(kd=KDConfig(loss="kld", temperature=2.0), alpha=0.9, alpha_schedule="wsd")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def describe(cfg: LogitsConfig) -> str:
    if cfg.mode == "topk":
        return f"top-{cfg.top_p}-{cfg.top_k}"
    return f"RS-KD sample N={cfg.samples}"


def slug(cfg: LogitsConfig) -> str:
    return f"top{cfg.top_p}-k{cfg.top_k}" if cfg.mode == "topk" else f"sample-n{cfg.samples}"


def build_corpus(work: Path, **overrides) -> Path:
    # skips a complete store of this config
    return prepare(PrepareConfig(out=str(work / "corpus"), **dict(CORPUS, **overrides)))


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
            hidden[a : a + int(lengths[b])] = h[b, : int(lengths[b])]
        done += int(lengths.sum())
        if (ids[0] // batch_size) % 20 == 0:
            log(f"teacher pass: {done}/{n_tokens} tokens, {time.perf_counter() - start:.0f}s")
    hidden.flush()
    del hidden
    os.replace(tmp, path)
    marker.write_text(json.dumps(expect))
    log(f"teacher pass: {n_tokens} tokens in {time.perf_counter() - start:.1f}s")
    return np.load(path, mmap_mode="r"), weight


def write_store(
    cfg: LogitsConfig, store: TokenStore, hidden: np.ndarray, weight: torch.Tensor, out: Path, batch_size: int
) -> tuple[dict, float]:
    start = time.perf_counter()
    writer = LogitsStoreWriter(out, store, cfg, vocab_size=weight.shape[0], teacher=TEACHER)
    for ids, tokens, lengths in store.iter_batches(batch_size, ids=writer.todo_instances()):
        h = torch.zeros(len(ids), tokens.shape[1], hidden.shape[1])
        for b, i in enumerate(ids):
            a = int(store.offsets[i])
            h[b, : int(lengths[b])] = torch.from_numpy(np.array(hidden[a : a + int(lengths[b])]))
        writer.add_hidden(ids, h, weight, tokens, lengths)
    manifest = writer.finish()
    return manifest, time.perf_counter() - start


def train_student(store_dir: Path, out: Path, kd_logits: Path | None, student: dict, pd: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    extra = dict(kd_logits=str(kd_logits), **pd) if kd_logits else {}
    train(TrainConfig(store=str(store_dir), out=str(out), **student, **extra))
    return read_manifest(out, "run"), time.perf_counter() - start


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/pd-curve", help="cache directory (default /tmp/pd-curve)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher / writer batch (default 8)")
    p.add_argument(
        "--tokens-per-domain",
        type=int,
        default=CORPUS["max_tokens_per_domain"],
        help="corpus size per domain (default: the demo's)",
    )
    p.add_argument("--val-fraction", type=float, default=CORPUS["val_fraction"])
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the demo's FLOPs budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (paired across settings)")
    p.add_argument("--settings", nargs="+", default=None, help=f"subset of {[slug(c) for c in SETTINGS]}")
    p.add_argument(
        "--temperature", type=float, default=PD["kd"].temperature, help="KD temperature (default 2, the demo's)"
    )
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    settings = [c for c in SETTINGS if args.settings is None or slug(c) in args.settings]
    if args.settings is not None and len(settings) != len(set(args.settings)):
        raise SystemExit(f"unknown setting in {args.settings}; known: {[slug(c) for c in SETTINGS]}")
    student = dict(STUDENT)
    if args.steps is not None:
        student.pop("flops_budget")
        student["steps"] = args.steps
    pd = dict(PD, kd=KDConfig(loss=PD["kd"].loss, temperature=args.temperature))

    corpus = build_corpus(work, max_tokens_per_domain=args.tokens_per_domain, val_fraction=args.val_fraction)
    store = TokenStore(corpus)
    hidden, weight = teacher_pass(store, work, args.batch_size)
    stores = {}
    for cfg in settings:
        ldir = work / "logits" / slug(cfg)
        manifest, write_s = write_store(cfg, store, hidden, weight, ldir, args.batch_size)
        log(f"{describe(cfg)}: {manifest['bytes_per_token']:.2f} B/token ({write_s:.0f}s)")
        stores[slug(cfg)] = (cfg, ldir, manifest, write_s)

    runs = []
    for seed in args.seeds:
        for name, ldir in [("lm", None), *((k, v[1]) for k, v in stores.items())]:
            out = work / "runs" / f"{name}-seed{seed}"
            run_manifest, train_s = train_student(corpus, out, ldir, dict(student, seed=seed), pd)
            run = {
                "setting": name,
                "seed": seed,
                "heldout_loss": run_manifest["final_val_loss"],
                "steps": run_manifest["steps"],
                "train_tokens": run_manifest.get("tokens"),
                "flops": run_manifest.get("flops"),
                "bytes_per_token": None if ldir is None else stores[name][2]["bytes_per_token"],
                "train_s": train_s,
            }
            emit("pd_curve_run", **run)
            runs.append(run)

    rows = []
    lm = {r["seed"]: r["heldout_loss"] for r in runs if r["setting"] == "lm"}
    for name in ["lm", *stores]:
        losses = {r["seed"]: r["heldout_loss"] for r in runs if r["setting"] == name}
        mean, std = mean_std(list(losses.values()))
        diff_mean, diff_std = mean_std([losses[s] - lm[s] for s in losses])
        cfg, _, manifest, write_s = stores.get(name, (None, None, None, None))
        rows.append(
            {
                "setting": "LM only (no KD)" if cfg is None else describe(cfg),
                "config": None if cfg is None else asdict(cfg),
                "entries_per_position": None if cfg is None else manifest["entries_per_position"],
                "bytes_per_token": None if cfg is None else manifest["bytes_per_token"],
                "heldout_loss": mean,
                "heldout_std": std,
                "seeds": sorted(losses),
                "delta_vs_lm": diff_mean,
                "delta_se": diff_std / len(losses) ** 0.5,
                "write_s": write_s,
            }
        )

    val = TokenStore(corpus / "val")
    total_s = time.perf_counter() - t0
    steps = runs[0]["steps"]
    print(
        f"`{command}` — teacher {TEACHER}: {int(store.offsets[-1])} train tokens in {len(store)} instances, "
        f"held-out loss on {min(len(val), STUDENT['eval_instances'])} val instances; student preset:tiny, "
        f"{steps} steps × {STUDENT['batch_size']}×{STUDENT['seq_len']}, KD {pd['kd'].loss} τ={args.temperature} "
        f"α={pd['alpha']} {pd['alpha_schedule']}; seeds {args.seeds}; total {total_s / 60:.1f} min\n"
    )
    print("| setting | entries/pos | bytes/token | held-out loss (mean ± std) | paired Δ vs LM-only (± s.e.) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        name = r["setting"]
        if r["config"] is not None and LogitsConfig(**r["config"]) == DEFAULT:
            name = f"**{name} (default)**"
        ent = "—" if r["entries_per_position"] is None else f"{r['entries_per_position']:.2f}"
        bpt = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.2f}"
        delta = "—" if r["config"] is None else f"{r['delta_vs_lm']:+.4f} ± {r['delta_se']:.4f}"
        print(f"| {name} | {ent} | {bpt} | {r['heldout_loss']:.4f} ± {r['heldout_std']:.4f} | {delta} |")
    tokens = runs[0]["train_tokens"]
    for r in rows[1:]:
        emit(
            "pd_curve",
            **{k: v for k, v in r.items() if k != "config"},
            train_tokens=tokens,
            readme={
                "what": f"PD student quality per byte: {r['setting']} store vs LM-only (preset:tiny, "
                f"{tokens} training tokens, {len(r['seeds'])} paired seeds)",
                "result": f"held-out {r['heldout_loss']:.3f} ± {r['heldout_std']:.3f}, paired Δ vs LM-only "
                f"**{r['delta_vs_lm']:+.3f} ± {r['delta_se']:.3f}** (s.e.) at "
                f"{r['bytes_per_token']:.2f} B/token",
                "goal": "≤ 8 B/token with quality ≥ top-0.95-50's",
            },
        )
    (work / "pd_curve.json").write_text(
        json.dumps({"command": command, "total_s": total_s, "rows": rows, "runs": runs}, indent=2)
    )


if __name__ == "__main__":
    main()
