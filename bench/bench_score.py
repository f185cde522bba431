"""Scoring throughput: predistill's forward pass vs a naive HF loop, as a ratio within one run.

    python bench/bench_score.py [--model smollm2-135m] [--batch 8] [--seq 256] [--rounds 3] [--threads N]

Both paths score the same random right-padded batch (lengths seq/2..seq) and must agree:
- naive:  model(input_ids, attention_mask).logits → log_softmax over the full [B, L, V] fp32
          tensor → gather the targets → masked mean (what a plain HF scoring loop does);
- ablation: ours but with the attention mask (isolates the chunked-head gain);
- ours:   the body once without a mask (right padding + causal attention make it exact), then
          the lm head in chunks of `--chunk` positions, only at predicted positions
          (predistill.stages.score.mean_logprobs): the [B, L, V] logits never exist.
The two are measured alternately, `--rounds` times each, and the medians compared, so a load
spike on a shared CPU hits both. The ratio is the headline (goal ≥ 1.3× on CPU).

    python bench/bench_score.py --e2e [--work DIR] [--tokens-per-domain 20000] [--max-len 256] [--rounds 3]

End to end (issue 13): a token store from the builtin corpora (≈ 46k tokens by default; built once
into --work) scored by `predistill score` as a user runs it (a subprocess: start-up, loading,
hashing, reading, writing included), by a plain HF loop (a subprocess, `PLAIN_LOOP`), and — the
ceilings — by the teacher body alone and body + head matmul over the same batches, in-process.
The sides alternate each round; medians are compared. One more command run, with timing hooks
(`HOOKED_SCORE`), says where the command's time goes; a torch.profiler pass over the command's
forward (`op_profile`) says where the forward's goes — GEMMs, attention, the rest — and how fast
its GEMMs run against this machine's own large-square sgemm (what is left to speed up once they
match it). One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from predistill.modeling.models import load_model, model_body
from predistill.training.forward import ForwardBatch, mean_logprobs


def naive_scores(model, tokens, lengths):
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        predicted = mask[:, 1:].float()
        return ((logp * predicted).sum(1) / predicted.sum(1)).numpy()


def our_scores(model, tokens, lengths, chunk, with_mask=False):
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long() if with_mask else None
    with torch.inference_mode():
        hidden = model_body(model)(input_ids=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        batch = ForwardBatch(
            ids=np.arange(len(tokens)),
            tokens=tokens,
            lengths=lengths,
            hidden=hidden,
            lm_head_weight=model.get_output_embeddings().weight,
            shard=None,
        )
        return mean_logprobs(batch, chunk)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--e2e", action="store_true", help="time the `score` command end to end (see above)")
    p.add_argument("--work", default="/tmp/predistill-bench-score", help="--e2e: store cache and outputs")
    p.add_argument(
        "--tokens-per-domain", type=int, default=20000, help="--e2e: store size (prepare's --max-tokens-per-domain)"
    )
    p.add_argument("--max-len", type=int, default=256, help="--e2e: prepare's --max-len")
    p.add_argument("--profile-instances", type=int, default=64, help="--e2e: instances in the op profile")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e:
        return e2e(args)
    model, tokenizer = load_model(args.model)
    model.eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
    lengths[0] = args.seq
    tokens = torch.randint(0, len(tokenizer), (args.batch, args.seq), generator=g)
    tokens[torch.arange(args.seq)[None, :] >= lengths[:, None]] = tokenizer.eos_token_id
    n_tokens = int(lengths.sum())

    a, b = naive_scores(model, tokens, lengths), our_scores(model, tokens, lengths, args.chunk)  # warm-up + check
    max_diff = float(np.abs(a - b).max())
    times = {
        "naive HF (full logits, log_softmax, gather)": [],
        "predistill (no mask, chunked lm head)": [],
        "ablation: chunked lm head, with mask": [],
    }
    for _ in range(args.rounds):
        for name, fn in zip(
            times,
            (
                lambda: naive_scores(model, tokens, lengths),
                lambda: our_scores(model, tokens, lengths, args.chunk),
                lambda: our_scores(model, tokens, lengths, args.chunk, with_mask=True),
            ),
        ):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    naive_name, ours_name, _ = list(times)
    print(
        f"model {args.model}, batch {args.batch} × ≤{args.seq} tokens ({n_tokens} real), vocab {len(tokenizer)}, "
        f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds; max |Δ mean log p| = {max_diff:.2e}"
    )
    print("| path | median s/batch | tokens/s |\n|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {n_tokens / t:.0f} |")
    print(f"| **speed-up (ours / naive)** | | **{med[naive_name] / med[ours_name]:.2f}×** |")


# ------------------------------------------------------------------------------------------------
# --e2e: the `score` command as a user runs it vs a plain HF loop vs the body's own rate
# ------------------------------------------------------------------------------------------------

# "The code a user would otherwise write": store order, batches of B, right padding, attention mask,
# full logits → log_softmax → gather → masked mean. Reads the store with numpy only.
# argv: model_dir store out.npy batch [device (cpu)] [dtype (float32)]; bench/gpu_check.py runs it on a GPU.
PLAIN_LOOP = r'''
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM

model_dir, store, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
dtype = getattr(torch, sys.argv[6] if len(sys.argv) > 6 else "float32")
tokens = np.fromfile(f"{store}/tokens.bin", dtype=json.load(open(f"{store}/manifest.json"))["dtype"])
offsets = np.load(f"{store}/offsets.npy")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
n, scores = len(offsets) - 1, []
with torch.no_grad():
    for b0 in range(0, n, batch):
        rows = [torch.from_numpy(tokens[offsets[i]:offsets[i + 1]].astype(np.int64)) for i in range(b0, min(b0 + batch, n))]
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, :len(r)], mask[k, :len(r)] = r, 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = mask[:, 1:].float()
        scores.append(((logp * m).sum(1) / m.sum(1)).cpu().numpy())
np.save(out, np.concatenate(scores))
'''

# `predistill score` with timing hooks around its parts (the same code path as the CLI; the hooks
# cost microseconds per call). Times are exclusive: no hooked function calls another.
HOOKED_SCORE = r'''
import json, os, sys, time
t_main = time.time()
spent = {"process start (interpreter)": t_main - float(os.environ["BENCH_SPAWN"])}
start = time.perf_counter()
import predistill.cli, predistill.training.forward as fw, predistill.modeling.models as md, predistill.stages.score as sc, predistill.formats.store as st
import transformers, transformers.models.llama.modeling_llama  # transformers' lazy imports, here rather than in load
transformers.AutoModelForCausalLM, transformers.AutoTokenizer
spent["imports (torch, transformers, predistill)"] = time.perf_counter() - start

def hook(part, fn):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - t
    return timed

sc.load_model = hook("model + tokenizer load", sc.load_model)
st.TokenStore.tokenizer = hook("store tokenizer load", st.TokenStore.tokenizer)
sc.model_hash = hook("model hash", sc.model_hash)
sc.tokenizer_hash = fw.tokenizer_hash = hook("tokenizer hash", sc.tokenizer_hash)
st.TokenStore.__init__ = hook("store open + read + batching", st.TokenStore.__init__)
fw.ModelInputs.row = hook("store open + read + batching", fw.ModelInputs.row)
fw.ModelInputs.batch = hook("store open + read + batching", fw.ModelInputs.batch)
body = fw.model_body
fw.model_body = lambda model: hook("body forward", body(model))
fw.mean_logprobs = hook("head (lm head at predicted positions, log-sum-exp)", fw.mean_logprobs)
sc.LogitsStoreConsumer.consume = hook("logits store (head + writing)", sc.LogitsStoreConsumer.consume)
sc.write_score_shard = hook("writing score shards", sc.write_score_shard)
sc._complete = hook("finishing (manifests)", sc._complete)
predistill.cli.main(sys.argv[1:])
spent["other (argument parsing, plan, loop)"] = time.time() - t_main - sum(v for k, v in spent.items() if k != "process start (interpreter)")
with open(os.environ["BENCH_SPENT"], "w") as f:
    json.dump(spent, f)
'''


def emit(what: str, value: float, unit: str, readme: dict | None = None, **extra) -> None:
    common.emit("score_e2e", readme=readme, what=what, value=round(value, 4), unit=unit, **extra)


def ensure_store(work: Path, tokens_per_domain: int, max_len: int) -> Path:
    store = work / f"store-{tokens_per_domain}-{max_len}"
    if not (store / "manifest.json").is_file():
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "predistill",
                "prepare",
                "--source",
                "builtin:shakespeare",
                "--source",
                "builtin:python",
                "--tokenizer",
                "smollm2-135m",
                "--max-len",
                str(max_len),
                "--max-tokens-per-domain",
                str(tokens_per_domain),
                "--out",
                str(store),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return store


def timed_run(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def e2e(args) -> None:
    from predistill.core.sharding import plan_shards
    from predistill.formats.scores import ScoreTable
    from predistill.formats.store import TokenStore
    from predistill.modeling.models import resolve_model
    from predistill.training.forward import ModelInputs, score_ids

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store_dir = ensure_store(work, args.tokens_per_domain, args.max_len)
    store = TokenStore(store_dir)
    n_tokens = int(store.lengths.sum())
    (work / "plain_loop.py").write_text(PLAIN_LOOP)
    (work / "hooked_score.py").write_text(HOOKED_SCORE)
    py = sys.executable
    score_cmd = [
        py,
        "-m",
        "predistill",
        "score",
        "--model",
        args.model,
        "--store",
        str(store_dir),
        "--batch-size",
        str(args.batch),
        "--no-progress",
    ]
    plain_cmd = [
        py,
        str(work / "plain_loop.py"),
        resolve_model(args.model).hf,
        str(store_dir),
        str(work / "plain.npy"),
        str(args.batch),
    ]

    # in-process: the same batches as the command (run_forward_pass's order), for the ceilings
    model, tokenizer = load_model(args.model)
    model.eval()
    inputs = ModelInputs(store, tokenizer)
    batches = []
    for shard in plan_shards(len(store), 512):
        rows = [inputs.row(i) for i in shard.ids]
        order = sorted(range(len(rows)), key=lambda k: (-len(rows[k]), k))
        batches += [
            inputs.batch([rows[k] for k in order[b : b + args.batch]]) for b in range(0, len(order), args.batch)
        ]
    body, weight = model_body(model), model.get_output_embeddings().weight
    buf = torch.empty(args.chunk, weight.shape[0])

    def body_only(head: bool) -> None:
        with torch.inference_mode():
            for tokens, lengths in batches:
                hidden = body(input_ids=tokens, use_cache=False).last_hidden_state
                if head:  # the head's matmul at predicted positions (chunks, one buffer), no log-sum-exp
                    predicted = torch.arange(tokens.shape[1] - 1)[None, :] < (lengths - 1)[:, None]
                    h = hidden[:, :-1][predicted]
                    for c in range(0, len(h), args.chunk):
                        torch.matmul(h[c : c + args.chunk], weight.t(), out=buf[: len(h[c : c + args.chunk])])

    sides = {
        "plain HF loop (subprocess)": lambda: timed_run(plain_cmd),
        "predistill score (subprocess)": lambda: timed_run(score_cmd + ["--out", str(fresh(work / "out"))]),
        "ceiling: body only (in-process)": lambda: clock(lambda: body_only(False)),
        "ceiling: body + head matmul (in-process)": lambda: clock(lambda: body_only(True)),
        "predistill forward function (in-process)": lambda: clock(
            lambda: score_ids(model, inputs, np.arange(len(store)), batch_size=args.batch, progress=False)
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(fn())
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f}s", file=sys.stderr, flush=True)
    logits_s = timed_run(score_cmd + ["--out", str(fresh(work / "out")), "--logits-out", str(fresh(work / "logits"))])
    spent_file = work / "spent.json"
    env = {**os.environ, "BENCH_SPAWN": repr(time.time()), "BENCH_SPENT": str(spent_file)}
    hooked_s = timed_run(
        [py, str(work / "hooked_score.py"), "score", *score_cmd[4:], "--out", str(fresh(work / "out"))], env=env
    )
    spent = json.loads(spent_file.read_text())

    ours = ScoreTable(work / "out").logprob
    plain = np.load(work / "plain.npy")
    max_diff = float(np.nanmax(np.abs(ours - plain)))
    med = {name: statistics.median(t) for name, t in times.items()}
    names = list(med)
    print(
        f"## `predistill score` end to end: {args.model}, {len(store)} instances, {n_tokens} tokens "
        f"(max_len {args.max_len}), batch {args.batch}, {torch.get_num_threads()} threads, {args.rounds} alternating "
        f"rounds (medians); max |Δ score| ours vs plain = {max_diff:.1e}\n"
    )
    print("| side | median s | tokens/s |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {med[name]:.1f} | {n_tokens / med[name]:.0f} |")
        emit(name, n_tokens / med[name], "tokens/s", seconds=round(med[name], 2), rounds=args.rounds)
    print(f"| predistill score --logits-out (subprocess, once) | {logits_s:.1f} | {n_tokens / logits_s:.0f} |")
    emit(
        "predistill score --logits-out (subprocess, once)", n_tokens / logits_s, "tokens/s", seconds=round(logits_s, 2)
    )
    plain_s, ours_s, body_s, body_head_s, fn_s = (med[n] for n in names)
    ratios = {
        "ours / plain HF loop (end to end)": plain_s / ours_s,
        "ours / ceiling: body only": body_s / ours_s,
        "ours / ceiling: body + head matmul": body_head_s / ours_s,
        "forward function / ceiling: body + head matmul": body_head_s / fn_s,
    }
    print()
    headline = "ours / plain HF loop (end to end)"
    for what, value in ratios.items():
        print(f"- {what}: **{value:.2f}×**")
        emit(
            what,
            value,
            "ratio",
            readme=None
            if what != headline
            else {
                "what": f"`predistill score` end to end vs a plain HF scoring loop (SmolLM2-135M, {n_tokens} tokens, "
                f"batch {args.batch})",
                "result": f"**{value:.2f}×** the plain loop's tokens/s; {ratios['ours / ceiling: body + head matmul']:.2f}× "
                f"of body + head matmul, {ratios['ours / ceiling: body only']:.2f}× of the body alone (the lm "
                "head is 21% of the forward FLOPs and a score needs it)",
                "goal": "≥ 1.25× the plain loop",
            },
        )
    total = sum(spent.values())
    print(f"\n### Where the command's time goes (timing hooks, one run: {hooked_s:.1f}s wall)\n")
    print("| part | s | share |\n|---|---:|---:|")
    for part, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {s:.2f} | {s / total:.1%} |")
        emit(f"time: {part}", s, "s", share=round(s / total, 4))

    ops = op_profile(model, inputs, args.profile_instances, args.batch)
    forward = sum(ops["spent"].values())
    print(
        f"\n### Where the forward's time goes (torch.profiler, self time, first {args.profile_instances} instances)\n"
    )
    print("| op class | share |\n|---|---:|")
    for part, s in ops["spent"].items():
        print(f"| {part} | {s / forward:.1%} |")
        emit(f"forward share: {part}", s / forward, "fraction")
    # GEMMs at (or above) the large-square rate leave only the other ops to speed up
    print(
        f"\n- GEMMs run at {ops['gemm_gflops']:.0f} GFLOP/s; this machine's 2048³ sgemm at "
        f"{ops['sgemm_gflops']:.0f} GFLOP/s ({ops['gemm_gflops'] / ops['sgemm_gflops']:.0%})"
    )
    emit("GEMM rate in the forward", ops["gemm_gflops"], "GFLOP/s")
    emit("machine sgemm rate (2048³, best of 5)", ops["sgemm_gflops"], "GFLOP/s")


def op_profile(model, inputs, n_instances: int, batch: int) -> dict:
    """Self time by op class in the scoring forward (fused kernels, as the command runs it) over the
    first `n_instances`, the GEMMs' achieved rate (the profiler's FLOP count), and this machine's
    large-square fp32 sgemm rate (best of 5, 2048³) for scale."""
    from torch.profiler import ProfilerActivity, profile

    from predistill.modeling.kernels import fuse_kernels
    from predistill.training.forward import score_ids

    fuse_kernels(model)
    ids = np.arange(min(n_instances, len(inputs.store)))
    score_ids(model, inputs, ids[:batch], batch_size=batch, progress=False)  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        score_ids(model, inputs, ids, batch_size=batch, progress=False)
    spent = {"GEMM (aten::mm/addmm/bmm)": 0.0, "attention (SDPA)": 0.0, "everything else": 0.0}
    gemm_flops = 0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            spent["GEMM (aten::mm/addmm/bmm)"] += seconds
            gemm_flops += event.flops
        elif "scaled_dot_product" in event.key:
            spent["attention (SDPA)"] += seconds
        else:
            spent["everything else"] += seconds
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    square = min(clock(lambda: torch.mm(a, b)) for _ in range(5))
    return {
        "spent": spent,
        "gemm_gflops": gemm_flops / spent["GEMM (aten::mm/addmm/bmm)"] / 1e9,
        "sgemm_gflops": 2 * 2048**3 / square / 1e9,
    }


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
