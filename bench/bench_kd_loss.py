"""KD loss: peak memory and time of predistill.training.kd vs a naive full-logits implementation.

    python bench/bench_kd_loss.py [--rows 4096] [--vocab 49152] [--hidden 576] [--k 8] [--reps 2]

Each implementation runs in a fresh subprocess (so one's peak cannot hide the other's). Memory is
the growth of the process's peak resident set size (`resource.getrusage(...).ru_maxrss`, a
kernel-kept high-water mark, so nothing between samples is missed) from just before the first
forward+backward to just after it; the inputs are allocated before the baseline, the gradients and
every temporary are inside it. PyTorch's CPU allocator hands large blocks back to the OS on free,
so RSS tracks live tensors; torch.profiler/tracemalloc do not see them reliably on CPU.
Time is the median wall time of `--reps` further forward+backward passes.

Cases (PD* setting: kld, τ = 2.0, tail dropped), rows = batch×sequence positions:
- offline: student hidden [rows, H] + lm head [V, H] + stored top-k entries [rows, K];
  ours = kd.fused_lm_kd_loss at α = 1 (what `train` runs: chunked, the gradient computed in the forward);
  naive = logits = h·Wᵀ for all rows, log_softmax, gather, the same loss on the entries.
- online: teacher and student hidden states and lm heads, full-vocabulary KL;
  ours = kd.online_kd_loss (gradient computed in the forward, chunk by chunk); naive = both [rows, V]
  logits at once.
Values and gradients of ours and naive are compared (max abs difference printed).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import emit

from predistill.formats.logits import TeacherTargets
from predistill.training.kd import KDConfig, fused_lm_kd_loss, kd_terms, online_kd_loss, teacher_temperature

CFG = KDConfig(loss="kld", temperature=2.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_inputs(case: str, rows: int, vocab: int, hidden: int, k: int):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_()
    if case == "offline":
        ids = torch.randint(0, vocab, (rows, k), generator=g)
        lps = torch.log_softmax(torch.randn(rows, k, generator=g) * 2, -1) + torch.log(torch.tensor(0.9))
        mask = torch.arange(k)[None, :] < torch.randint(1, k + 1, (rows, 1), generator=g)
        return h, w, TeacherTargets(ids, lps, mask)
    ht = torch.randn(rows, hidden, generator=g)
    wt = torch.randn(vocab, hidden, generator=g) * 0.05
    return h, w, (ht, wt)


def naive_offline(h, w, targets: TeacherTargets):
    logq = torch.log_softmax(h @ w.t(), dim=-1)  # [rows, V] all at once
    s = logq.gather(1, targets.ids)
    tau = teacher_temperature(targets.logprobs, targets.mask, CFG)
    return kd_terms(s, targets.logprobs, targets.mask, tau, CFG).mean()


def naive_online(h, w, teacher):
    ht, wt = teacher
    with torch.no_grad():
        z_t = ht @ wt.t()
    logq = torch.log_softmax(h @ w.t(), dim=-1)
    log_f = torch.log_softmax(z_t / CFG.temperature, dim=-1)
    return (log_f.exp() * (log_f - logq)).sum(-1).mean()


def run_impl(case: str, impl: str, h, w, extra):
    if case == "offline":
        if impl == "naive":
            return naive_offline(h, w, extra)
        # what `train` runs (α = 1: the LM term weighs nothing): the fused LM + KD loss
        next_tokens = torch.zeros(h.shape[0], dtype=torch.long)
        _, kd_sum, _, _ = fused_lm_kd_loss(h, w, next_tokens, extra, CFG, weights=(0.0, 1.0))
        return kd_sum / h.shape[0]
    return online_kd_loss(h, w, extra[0], extra[1], CFG)[0] if impl == "ours" else naive_online(h, w, extra)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    h, w, extra = make_inputs(args.case, args.rows, args.vocab, args.hidden, args.k)
    base = peak_rss_mb()
    loss = run_impl(args.case, args.impl, h, w, extra)
    loss.backward()
    peak = peak_rss_mb() - base
    out = {
        "peak_mb": peak,
        "loss": loss.item(),
        "grad_h": h.grad[:64].tolist(),
        "grad_w_norm": w.grad.norm().item(),
        "grad_w_row": w.grad[int(extra.ids[0, 0]) if args.case == "offline" else 0].tolist(),
    }
    times = []
    for _ in range(args.reps):
        h.grad = w.grad = None
        start = time.perf_counter()
        run_impl(args.case, args.impl, h, w, extra).backward()
        times.append(time.perf_counter() - start)
    out["seconds"] = statistics.median(times) if times else float("nan")
    print(json.dumps(out))


def spawn(args, case: str, impl: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--case",
        case,
        "--impl",
        impl,
        "--rows",
        str(args.rows),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--k",
        str(args.k),
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="positions per micro-batch (default 4096 = 4×1024)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary (default SmolLM2's 49 152)")
    p.add_argument("--hidden", type=int, default=576, help="hidden size (default SmolLM2-135M's 576)")
    p.add_argument("--k", type=int, default=8, help="stored entries per position (offline case)")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions after the memory run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", choices=("offline", "online", "both"), default="both")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("ours", "naive"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    cases = ("offline", "online") if args.case == "both" else (args.case,)
    print(
        f"`python bench/bench_kd_loss.py {' '.join(sys.argv[1:])}` — rows {args.rows}, vocab {args.vocab}, "
        f"hidden {args.hidden}, K {args.k}, chunk {CFG.chunk_size} rows offline / {CFG.online_chunk_size} online, "
        f"{args.threads} threads, kld τ=2\n"
    )
    print(
        "| case | naive peak MB | ours peak MB | memory ratio | naive s | ours s | time ratio | max |Δloss| | max |Δgrad| |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        naive, ours = spawn(args, case, "naive"), spawn(args, case, "ours")
        d_loss = abs(naive["loss"] - ours["loss"])
        d_grad = max(
            max(abs(a - b) for a, b in zip(naive["grad_h"][r], ours["grad_h"][r])) for r in range(len(ours["grad_h"]))
        )
        d_grad = max(d_grad, max(abs(a - b) for a, b in zip(naive["grad_w_row"], ours["grad_w_row"])))
        print(
            f"| {case} | {naive['peak_mb']:.0f} | {ours['peak_mb']:.0f} | {ours['peak_mb'] / naive['peak_mb']:.3f} | "
            f"{naive['seconds']:.2f} | {ours['seconds']:.2f} | {ours['seconds'] / naive['seconds']:.2f} | "
            f"{d_loss:.2e} | {d_grad:.2e} |"
        )
        mem, time_ratio = ours["peak_mb"] / naive["peak_mb"], ours["seconds"] / naive["seconds"]
        what = {
            "offline": f"offline KD loss (kld, τ=2, K={args.k}) vs naive full logits",
            "online": "online (Vanilla) KD loss vs naive full logits of both models",
        }[case]
        emit(
            "kd_loss",
            case=case,
            rows=args.rows,
            vocab=args.vocab,
            hidden=args.hidden,
            naive_peak_mb=round(naive["peak_mb"]),
            ours_peak_mb=round(ours["peak_mb"]),
            memory_ratio=round(mem, 3),
            naive_s=round(naive["seconds"], 3),
            ours_s=round(ours["seconds"], 3),
            time_ratio=round(time_ratio, 3),
            max_loss_diff=d_loss,
            max_grad_diff=d_grad,
            readme={
                "what": f"{what} ({args.rows} rows, V={args.vocab})",
                "result": f"peak memory **{mem:.2f}×**, time **{time_ratio:.2f}×**, values and gradients "
                f"equal (max |Δ| {max(d_loss, d_grad):.0e})",
                "goal": "≤ 0.25× memory, ≤ 1.2× time",
            },
        )


if __name__ == "__main__":
    main()
