"""The GPU check: predistill's heavy paths on one device, as a table (run it via gpu_check.sh).

    bash bench/gpu_check.sh [--out DIR]    # on a GPU: ~10 minutes on one H100/H200 (estimated)
    bash bench/gpu_check.sh --dry          # the same script on CPU with tiny sizes (the test suite runs it)

What it measures, each through the commands a user runs (`predistill.stages.score.run`, `predistill.stages.train.run`):
1. teacher scoring tokens/s and MFU: SmolLM2-135M (bf16), and a randomly initialised
   `preset:miniplm-500m` as a larger teacher; the first pass also writes the logits store;
2. student training tokens/s and MFU: `preset:miniplm-200m`, LM only;
3. the step time of offline KD (that logits store) and of online KD (SmolLM2-135M as the online
   teacher) over an LM-only step, and each phase's peak device memory;
4. `predistill score` against the plain HF scoring loop (bench_score.PLAIN_LOOP: store order, right
   padding, attention mask, full logits → log_softmax), both as subprocesses, start-up included, in
   the same dtype (bf16), same batch: the scoring ratio issue 13 asks of the GPU.
MFU = achieved FLOPs/s (2·N per scored token, 6·N per trained token, N = `models.forward_params`)
over the device's dense bf16 peak (`PEAK_FLOPS`). One JSON line per result goes to OUT/gpu_check.jsonl,
and the Markdown table to stdout. `--dry` swaps in tiny presets and a few thousand tokens, so the
script's every path runs on CPU in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class Sizes:
    tokens_per_domain: int  # corpus size (prepare --max-tokens-per-domain)
    max_len: int
    big_teacher: str
    student: str
    steps: int
    batch_size: int
    seq_len: int


FULL = Sizes(
    tokens_per_domain=1_000_000,
    max_len=1024,
    big_teacher="preset:miniplm-500m",
    student="preset:miniplm-200m",
    steps=30,
    batch_size=16,
    seq_len=1024,
)
DRY = Sizes(
    tokens_per_domain=500,
    max_len=32,
    big_teacher="preset:mini",
    student="preset:tiny",
    steps=3,
    batch_size=2,
    seq_len=32,
)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def reset_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def mfu(flops_per_s: float) -> float | None:
    peak = peak_flops()
    return flops_per_s / peak if peak else None


def score_phase(name: str, model: str, store: Path, out: Path, logits_out: Path | None = None) -> dict:
    from predistill.core.artifacts import read_manifest
    from predistill.stages.score import ScoreConfig
    from predistill.stages.score import run as score

    reset_memory()
    t0 = time.perf_counter()
    table = score(
        ScoreConfig(
            model=model,
            store=str(store),
            out=str(out),
            batch_size=16,
            progress=False,
            logits_out=str(logits_out) if logits_out else None,
        )
    )
    seconds = time.perf_counter() - t0
    m = read_manifest(table, "score_table")
    tokens_per_s = m["n_tokens_scored"] / seconds
    flops_per_s = m["flops"] / seconds
    return {
        "phase": name,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(flops_per_s),
        "seconds": seconds,
        "peak_memory_gib": peak_memory_gib(),
        "note": "end to end: load, hash, forward, write",
    }


def score_vs_plain_phase(store: Path, out: Path, batch: int, rounds: int) -> dict:
    """Both scorers as a user starts them, alternately `rounds` times; medians. The scores agree to the dtype."""
    import numpy as np
    from bench_score import PLAIN_LOOP, fresh, timed_run

    from predistill.formats.scores import ScoreTable
    from predistill.modeling.models import resolve_model

    device, dtype = ("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", "float32")
    (out / "plain_loop.py").write_text(PLAIN_LOOP)
    ours_cmd = [
        sys.executable,
        "-m",
        "predistill",
        "score",
        "--model",
        "smollm2-135m",
        "--store",
        str(store),
        "--out",
        str(out / "ours"),
        "--batch-size",
        str(batch),
        "--dtype",
        dtype,
        "--no-progress",
    ]
    plain_cmd = [
        sys.executable,
        str(out / "plain_loop.py"),
        resolve_model("smollm2-135m").hf,
        str(store),
        str(out / "plain.npy"),
        str(batch),
        device,
        dtype,
    ]
    seconds: dict[str, list[float]] = {"ours": [], "plain": []}
    for _ in range(rounds):
        for side, cmd in (("plain", plain_cmd), ("ours", ours_cmd)):
            fresh(out / "ours")
            seconds[side].append(timed_run(cmd))
    ours, plain = (statistics.median(seconds[side]) for side in ("ours", "plain"))
    max_diff = float(np.nanmax(np.abs(ScoreTable(out / "ours").logprob - np.load(out / "plain.npy"))))
    n_tokens = int(np.load(store / "offsets.npy")[-1])
    return {
        "phase": f"score vs plain HF loop ({dtype}, batch {batch}, subprocesses)",
        "tokens_per_s": n_tokens / ours,
        "mfu": None,
        "seconds": ours,
        "peak_memory_gib": None,
        "over_plain_loop": plain / ours,
        "plain_seconds": plain,
        "max_abs_score_diff": max_diff,
        "note": "end to end: start-up included",
    }


def train_phase(name: str, sizes: Sizes, store: Path, out: Path, **kd) -> dict:
    from predistill.stages.train import TrainConfig
    from predistill.stages.train import run as train

    reset_memory()
    run_dir = train(
        TrainConfig(
            model=sizes.student,
            store=str(store),
            out=str(out),
            steps=sizes.steps,
            batch_size=sizes.batch_size,
            seq_len=sizes.seq_len,
            lr=3e-4,
            warmup=0,
            eval_instances=sizes.batch_size,
            **kd,
        )
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 3 :] or rows  # the first steps warm up kernels and allocators
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {
        "phase": name,
        "tokens_per_s": tokens_per_s,
        "step_seconds": statistics.median(r["tokens"] / r["step"] / r["tokens_per_s"] for r in steady),
        "mfu": mfu(manifest["student_flops_per_token"] * tokens_per_s),
        "peak_memory_gib": peak_memory_gib(),
        "note": "student FLOPs only" if kd else "",
    }


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    parser.add_argument("--out", default="gpu-check-out", help="working directory (and gpu_check.jsonl)")
    args = parser.parse_args()
    sizes = DRY if args.dry else FULL
    if not args.dry and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; use --dry to run the script on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from predistill.stages.prepare import PrepareConfig
    from predistill.stages.prepare import run as prepare

    store = prepare(
        PrepareConfig(
            sources=["builtin:shakespeare", "builtin:python"],
            tokenizer="smollm2-135m",
            out=str(out / "store"),
            max_len=sizes.max_len,
            max_tokens_per_domain=sizes.tokens_per_domain,
        )
    )
    results = [
        score_phase(
            "score: SmolLM2-135M (+ logits store)",
            "smollm2-135m",
            store,
            out / "scores-smollm2",
            logits_out=out / "logits",
        ),
        score_phase(f"score: {sizes.big_teacher} (random weights)", sizes.big_teacher, store, out / "scores-big"),
    ]
    lm = train_phase(f"train: {sizes.student}, LM only", sizes, store, out / "lm")
    offline = train_phase(
        "train: + offline KD (logits store)",
        sizes,
        store,
        out / "offline-kd",
        kd_logits=str(out / "logits"),
        alpha=0.5,
        alpha_schedule="constant",
    )
    online = train_phase(
        "train: + online KD (SmolLM2-135M)",
        sizes,
        store,
        out / "online-kd",
        kd_teacher="smollm2-135m",
        alpha=0.5,
        alpha_schedule="constant",
    )
    for r in (offline, online):
        r["step_time_over_lm_only"] = r["step_seconds"] / lm["step_seconds"]
    results += [lm, offline, online]
    results.append(score_vs_plain_phase(store, out, batch=16, rounds=1 if args.dry else 2))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run: numbers mean nothing)"
    with open(out / "gpu_check.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps({"bench": "gpu_check", "device": device, "dry": args.dry, **r}) + "\n")
    print(f"## GPU check on {device}\n")
    print(
        "| phase | tokens/s | MFU | step time / LM-only | × plain loop | peak memory (GiB) |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    for r in results:
        print(
            f"| {r['phase']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r.get('step_time_over_lm_only'), '.2f')} | {fmt(r.get('over_plain_loop'), '.2f')} | "
            f"{fmt(r['peak_memory_gib'], '.1f')} |"
        )


if __name__ == "__main__":
    main()
