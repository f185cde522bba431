"""Training throughput and the chunked LM loss's memory/time against the naive full-logits loss.

    python bench/bench_train.py            # Markdown tables and one JSON line per result (bench/common.py)
    python bench/bench_train.py --e2e      # the `train` command end to end vs a plain script (below)

Part 3: the step time of LM + offline KD (top-5 entries, one shared vocabulary pass) against an
LM-only step, alternating in one process.
Part 1: tokens/s of `predistill train`'s step (forward + chunked loss + backward + AdamW) for the
`tiny` and `small` (~10M non-embedding) presets with the SmolLM2 vocabulary (49 152).
Part 2: LM loss on [N × H] hidden states with a [V × H] head, chunked (predistill.training.losses) vs
naive (logits → cross_entropy), values and gradients compared. Each variant runs in a fresh
subprocess; its peak memory is the process's peak RSS minus its RSS just before the loss, so
the two numbers are comparable within one run even on a noisy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import emit

N_TOKENS, HIDDEN, VOCAB = 4096, 576, 49152

# one process per loop: the peak RSS growth over two training steps (activations, gradients,
# optimizer state), so one loop's peak cannot hide the other's; and the peak of live tensor bytes
# in those steps (common.TensorPeak), which glibc's retained free memory does not inflate
STEP_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from bench_train import VOCAB, ours, train_step, vocab_model
from common import TensorPeak
loop, batch, seq = sys.argv[1], 8, 256
model = vocab_model("small")
inputs = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))
mask = torch.ones(batch, seq, dtype=torch.bool)
if loop.startswith("ours"):
    loss_model, opt = ours(model, activation_checkpointing=loop == "ours-ckpt")
else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark: building the model peaked higher than a step does
base = status_kb("VmRSS")
with TensorPeak(model.parameters()) as tensors:
    for _ in range(2):
        train_step(loss_model if loop.startswith("ours") else model, opt, inputs, mask)
print(json.dumps({"peak_mb": (status_kb("VmHWM") - base) / 1024, "tensor_mb": tensors.peak / 2**20}))
"""


def step_memory(loop: str) -> dict[str, float]:
    """{"peak_mb": RSS growth, "tensor_mb": live tensor peak} of two steps of `loop`."""
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-c", STEP_CHILD, loop, str(Path(__file__).resolve().parent)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


LOSS_CHILD = r"""
import json, resource, sys, time, torch
from predistill.training.losses import fused_lm_loss, lm_loss
variant, n, h, v = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
hidden = torch.randn(n, h, requires_grad=True)
weight = (torch.randn(v, h) * 0.02).requires_grad_()
targets = torch.randint(0, v, (n,))
mask = torch.ones(n, dtype=torch.bool)
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4
base = rss_kb()
t0 = time.perf_counter()
if variant == "chunked":
    loss, _ = lm_loss(hidden, weight, targets, mask)
elif variant == "fused":
    total, _ = fused_lm_loss(hidden, weight, targets)
    loss = total / n
else:
    loss = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
loss.backward()
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": loss.item(), "seconds": seconds, "peak_mb": (peak - base) / 1024,
                  "grad_h": hidden.grad.abs().sum().item(), "grad_w": weight.grad.abs().sum().item()}))
"""


def loss_variant(variant: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOSS_CHILD, variant, str(N_TOKENS), str(HIDDEN), str(VOCAB)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def train_step(model, opt, inputs, mask) -> None:
    """One step: predistill's LossModel (body → fused chunked loss), or a plain HF model the way a
    user writes it (`model(ids).logits` → cross-entropy)."""
    import torch

    from predistill.stages.train import LossModel

    if isinstance(model, LossModel):
        lm_sum, _, _, _ = model(inputs, inputs, mask)
        (lm_sum / mask.sum()).backward()
    else:
        logits = model(input_ids=inputs).logits
        torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), inputs.view(-1)).backward()
    opt.step()
    opt.zero_grad()


def vocab_model(preset: str):
    """A from-scratch preset with SmolLM2's vocabulary size (a word-level stand-in tokenizer)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from predistill.modeling.models import load_model

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t0")
    return load_model(f"preset:{preset}", tok)[0]


def ours(model, activation_checkpointing: bool = False):
    """(LossModel, optimizer) built from a loaded student as `train` builds them (fused kernels,
    optional activation checkpointing, the default loss chunk, fused AdamW)."""
    from predistill.stages.train import LossModel, TrainConfig, make_optimizer, prepare_student

    cfg = TrainConfig(lr=1e-4, activation_checkpointing=activation_checkpointing)
    prepare_student(model, cfg)
    loss_model = LossModel(model, cfg.loss_chunk)
    return loss_model, make_optimizer(loss_model, cfg)


def throughput(preset: str, steps: int = 6, batch: int = 8, seq: int = 256, precisions=("fp32",)) -> dict[str, float]:
    """tokens/s of `train`'s step per precision (`train --precision`), the precisions alternating
    step by step on copies of one model, so a noisy machine slows them alike."""
    import contextlib
    import copy

    import torch

    model = vocab_model(preset)
    loops = {p: ours(copy.deepcopy(model)) for p in precisions}
    inputs = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(steps):
        for precision, (loss_model, opt) in loops.items():
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            t0 = time.perf_counter()
            with autocast:
                lm_sum, _, _, _ = loss_model(inputs, inputs, mask)
            (lm_sum / mask.sum()).backward()
            opt.step()
            opt.zero_grad()
            times[precision].append(time.perf_counter() - t0)
    # the first step warms up allocators
    return {p: batch * seq / (sum(t[1:]) / len(t[1:])) for p, t in times.items()}


class SyntheticLogits:
    """An offline KD source with fixed top-5 teacher entries (what a logits store's read_batch
    returns), so the step time of LM + offline KD can be compared with an LM-only step."""

    def __init__(self, batch: int, seq: int, k: int = 5):
        import torch

        from predistill.formats.logits import TeacherTargets
        from predistill.training.kd import KDConfig

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, VOCAB, (batch, seq, k), generator=g)
        logprobs = torch.log_softmax(torch.randn(batch, seq, k, generator=g), -1) - 0.3
        self.targets = TeacherTargets(ids, logprobs, torch.ones(batch, seq, k, dtype=torch.bool))
        self.cfg = KDConfig.from_temperature("2.0", loss="kld")

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        from predistill.training.kd import fused_lm_kd_loss

        return fused_lm_kd_loss(hidden, weight, targets, self.targets, self.cfg, mask, weights=(1 - alpha, alpha))


def step_times(preset: str = "tiny", steps: int = 6, batch: int = 8, seq: int = 256) -> dict[str, float]:
    """Median seconds per training step, LM-only vs LM + offline KD, alternating in one process."""
    import statistics

    import torch

    loss_model, opt = ours(vocab_model(preset))
    inputs = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    kd = SyntheticLogits(batch, seq)
    times: dict[str, list[float]] = {"lm": [], "lm+offline kd": []}
    for step in range(2 * steps):
        name = "lm" if step % 2 == 0 else "lm+offline kd"
        t0 = time.perf_counter()
        lm_sum, kd_sum, _, _ = loss_model(inputs, inputs, mask, None, kd if name != "lm" else None, 0.9)
        ((0.1 * lm_sum + 0.9 * kd_sum) / mask.sum()).backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:  # the first round warms up allocators
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def step_vs_plain_loop(preset: str = "small", steps: int = 6, batch: int = 8, seq: int = 256) -> dict[str, float]:
    """Median seconds of one training step: predistill's (body → fused chunked LM loss → AdamW) vs
    the plain loop a user would write (`model(ids).logits` → cross-entropy → AdamW), alternating in
    one process on two copies of the same model."""
    import copy
    import statistics

    import torch

    plain_model = vocab_model(preset)
    (ours_model, ours_opt), (ckpt_model, ckpt_opt) = (
        ours(copy.deepcopy(plain_model)),
        ours(copy.deepcopy(plain_model), activation_checkpointing=True),
    )
    models = {"ours": ours_model, "plain": plain_model, "ours-ckpt": ckpt_model}
    opts = {"ours": ours_opt, "ours-ckpt": ckpt_opt, "plain": torch.optim.AdamW(plain_model.parameters(), lr=1e-4)}
    inputs = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(len(models) * (steps + 1)):
        name = list(models)[step % len(models)]
        t0 = time.perf_counter()
        train_step(models[name], opts[name], inputs, mask)
        if step >= len(models):  # the first round warms up
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main(parts: list[str]) -> None:
    if "loss" in parts:
        loss_part()
    if "step" in parts:
        step_part()
    if "kd" in parts:
        kd_part()
    if "precision" in parts:
        precision_part()
    if "throughput" in parts:
        throughput_part()


def loss_part() -> None:
    print(f"## Chunked LM loss vs naive full logits (N={N_TOKENS}, H={HIDDEN}, V={VOCAB}, fp32, CPU)\n")
    variants = {name: loss_variant(name) for name in ("naive", "chunked", "fused")}
    naive = variants["naive"]
    for name, r in variants.items():
        assert abs(naive["loss"] - r["loss"]) < 1e-4, (name, naive, r)
        assert abs(naive["grad_h"] - r["grad_h"]) / naive["grad_h"] < 1e-4, (name, naive, r)
    print("| variant | peak extra memory (MB) | time (s) | memory / naive | time / naive |\n|---|---|---|---|---|")
    for name, r in variants.items():
        print(
            f"| {name} | {r['peak_mb']:.0f} | {r['seconds']:.2f} | {r['peak_mb'] / naive['peak_mb']:.3f} | "
            f"{r['seconds'] / naive['seconds']:.2f} |"
        )
    for name, r in variants.items():
        fused = name == "fused"
        emit(
            "lm_loss",
            variant=name,
            n=N_TOKENS,
            hidden=HIDDEN,
            vocab=VOCAB,
            peak_mb=round(r["peak_mb"], 1),
            seconds=round(r["seconds"], 3),
            memory_vs_naive=round(r["peak_mb"] / naive["peak_mb"], 3),
            time_vs_naive=round(r["seconds"] / naive["seconds"], 3),
            readme=None
            if not fused
            else {
                "what": f"LM loss vs naive full logits (N={N_TOKENS}, H={HIDDEN}, V={VOCAB})",
                "result": f"fused (gradient computed in the forward, what `train` uses): peak memory "
                f"**{r['peak_mb'] / naive['peak_mb']:.2f}×**, time **{r['seconds'] / naive['seconds']:.2f}×**; "
                f"chunked with recomputation: {variants['chunked']['peak_mb'] / naive['peak_mb']:.2f}×, "
                f"{variants['chunked']['seconds'] / naive['seconds']:.2f}×; values and gradients equal",
                "goal": "memory-light, exact, not slower",
            },
        )


def step_part() -> None:
    print("\n## A training step vs the plain loop (preset:small, 49k vocabulary, batch 8 × 256, fp32, CPU)\n")
    step = step_vs_plain_loop()
    memory = {loop: step_memory(loop) for loop in ("plain", "ours", "ours-ckpt")}
    rss = {loop: m["peak_mb"] for loop, m in memory.items()}
    tensors = {loop: m["tensor_mb"] for loop, m in memory.items()}
    print("| loop | median s | peak RSS growth over two steps (MB) | peak live tensors (MB) |\n|---|---|---|---|")
    for loop, name in (
        ("plain", "plain (`model(ids).logits` → cross-entropy → AdamW)"),
        ("ours", "predistill (fused kernels → fused chunked loss → fused AdamW)"),
        ("ours-ckpt", "predistill --activation-checkpointing"),
    ):
        print(f"| {name} | {step[loop]:.3f} | {rss[loop]:.0f} | {tensors[loop]:.0f} |")
    print(
        f"\nspeed-up: **{step['plain'] / step['ours']:.2f}×**, memory (RSS) **{rss['ours'] / rss['plain']:.2f}×**, "
        f"live tensors **{tensors['ours'] / tensors['plain']:.2f}×**; with activation checkpointing "
        f"{step['plain'] / step['ours-ckpt']:.2f}×, {rss['ours-ckpt'] / rss['plain']:.2f}×, "
        f"{tensors['ours-ckpt'] / tensors['plain']:.2f}×\n"
    )
    sides = {
        "train_step_vs_plain_ckpt": (
            "ours-ckpt",
            "the same step with `train --activation-checkpointing` (the body's activations recomputed in backward)",
            "",
        ),
        "train_step_vs_plain": (
            "ours",
            "a `preset:small` training step (batch 8×256, 49k vocabulary) vs the "
            "plain loop (`model(ids).logits` → cross-entropy → AdamW)",
            ", medians, alternating in one process",
        ),
    }
    for bench, (side, what, how) in sides.items():
        emit(
            bench,
            preset="small",
            batch=8,
            seq=256,
            plain_s=round(step["plain"], 3),
            ours_s=round(step[side], 3),
            speedup=round(step["plain"] / step[side], 3),
            plain_peak_mb=round(rss["plain"]),
            ours_peak_mb=round(rss[side]),
            memory_ratio=round(rss[side] / rss["plain"], 3),
            plain_tensor_mb=round(tensors["plain"]),
            ours_tensor_mb=round(tensors[side]),
            tensor_memory_ratio=round(tensors[side] / tensors["plain"], 3),
            readme={
                "what": what,
                "result": f"**{step['plain'] / step[side]:.2f}×** faster ({step[side]:.2f} s vs "
                f"{step['plain']:.2f} s{how}); peak live tensors "
                f"**{tensors[side] / tensors['plain']:.2f}×** ({tensors[side]:.0f} vs "
                f"{tensors['plain']:.0f} MB), peak RSS growth {rss[side] / rss['plain']:.2f}× "
                f"({rss[side]:.0f} vs {rss['plain']:.0f} MB)",
                "goal": "≥ 1.2× at ≤ 0.35× memory",
            },
        )


def kd_part() -> None:
    print("## Offline-KD step vs LM-only step (preset:tiny, batch 8 × 256, top-5 entries, fp32, CPU)\n")
    times = step_times()
    print("| step | median s |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} |")
    ratio = times["lm+offline kd"] / times["lm"]
    print(f"\noffline-KD / LM-only step time: **{ratio:.2f}**\n")
    emit(
        "kd_step_vs_lm",
        preset="tiny",
        batch=8,
        seq=256,
        lm_s=round(times["lm"], 3),
        kd_s=round(times["lm+offline kd"], 3),
        ratio=round(ratio, 3),
        readme={
            "what": "offline-KD step vs LM-only step (`preset:tiny`, batch 8×256, top-5 entries, kld τ=2, α=0.9)",
            "result": f"**{ratio:.2f}×** (LM and KD share one vocabulary pass with the gradient computed in it)",
            "goal": "≤ 1.05×",
        },
    )


def throughput_part() -> None:
    print("## Training throughput (batch 8 × 256 tokens, fp32, CPU)\n")
    print("| preset | tokens/s |\n|---|---|")
    for preset in ("tiny", "small"):
        tps = throughput(preset)["fp32"]
        print(f"| {preset} | {tps:.0f} |")
        emit("train_throughput", preset=preset, batch=8, seq=256, tokens_per_s=round(tps))


def precision_part() -> None:
    """`train --precision bf16` (autocast) against fp32 on this CPU: the speed-up it buys where the
    CPU has bf16 instructions (avx512_bf16, AMX), and what it costs where it has none."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    print(f"## bf16 autocast vs fp32 training step (batch 8 × 256, SmolLM2's vocabulary, CPU: {isa})\n")
    print("| preset | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |\n|---|---|---|---|")
    for preset in ("tiny", "small"):
        tps = throughput(preset, steps=5, precisions=("fp32", "bf16"))
        ratio = tps["bf16"] / tps["fp32"]
        print(f"| {preset} | {tps['fp32']:.0f} | {tps['bf16']:.0f} | {ratio:.2f}× |")
        emit(
            "train_bf16_vs_fp32",
            preset=preset,
            batch=8,
            seq=256,
            cpu=isa,
            fp32_tokens_per_s=round(tps["fp32"]),
            bf16_tokens_per_s=round(tps["bf16"]),
            ratio=round(ratio, 2),
            readme={
                "what": f"`train --precision bf16` vs fp32 step (`preset:{preset}`, 49k vocab, CPU {isa})",
                "result": f"**{ratio:.2f}×** the tokens/s",
                "goal": "> 1× where the CPU has bf16 instructions",
            },
        )


# ------------------------------------------------------------------------------------------------
# --e2e: the `train` command as a user runs it (start-up, store reading, batching, the loop, the HF
# export) vs the script a user would otherwise write, on the same store, model and schedule
# ------------------------------------------------------------------------------------------------

# Reads the store with numpy only; batches of B consecutive instances, right padding, labels −100 on
# padding; `model(ids, attention_mask).logits` → cross-entropy → AdamW; save_pretrained at the end.
PLAIN_TRAIN = r'''
import json, sys
import numpy as np, torch
from transformers import AutoConfig, AutoModelForCausalLM

config_dir, store, out, steps, batch, seq = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
torch.manual_seed(0)
dtype = json.load(open(f"{store}/manifest.json"))["dtype"]
tokens, offsets = np.fromfile(f"{store}/tokens.bin", dtype=dtype), np.load(f"{store}/offsets.npy")
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
n = len(offsets) - 1
for step in range(steps):
    rows = [tokens[offsets[i % n]:offsets[i % n + 1]][:seq + 1].astype(np.int64) for i in range(step * batch, (step + 1) * batch)]
    ids = torch.zeros(batch, max(len(r) for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(rows):
        ids[k, :len(r)], mask[k, :len(r)] = torch.from_numpy(r), 1
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logits = model(ids[:, :-1], attention_mask=mask[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    opt.step()
    opt.zero_grad()
model.save_pretrained(out)
'''


def e2e(args) -> None:
    """`predistill train` end to end vs PLAIN_TRAIN, alternating rounds, wall-clock medians."""
    import shutil
    import statistics
    from pathlib import Path

    from predistill.modeling.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"store-{args.tokens_per_domain}"
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
                str(args.seq),
                "--max-tokens-per-domain",
                str(args.tokens_per_domain),
                "--out",
                str(store),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    from predistill.formats.store import TokenStore

    model, _ = load_model(f"preset:{args.preset}", TokenStore(store).tokenizer())
    model.config.save_pretrained(work / "config")  # the plain script builds the same architecture
    (work / "plain_train.py").write_text(PLAIN_TRAIN)
    py = sys.executable
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq)]
    sides = {
        "plain loop (subprocess)": [
            py,
            str(work / "plain_train.py"),
            str(work / "config"),
            str(store),
            str(work / "plain-out"),
            str(args.steps),
            str(args.batch),
            str(args.seq),
        ],
        "predistill train (subprocess)": [
            py,
            "-m",
            "predistill",
            "train",
            "--model",
            f"preset:{args.preset}",
            "--store",
            str(store),
            "--lr",
            "3e-4",
            *common,
        ],
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, cmd in sides.items():
            for out in (work / "plain-out", work / "run"):
                shutil.rmtree(out, ignore_errors=True)
            cmd = cmd + (["--out", str(work / "run")] if "train" in cmd else [])
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name}: {times[name][-1]:.1f}s", file=sys.stderr, flush=True)
    tokens = json.loads((work / "run" / "manifest.json").read_text())["tokens"]
    med = {name: statistics.median(t) for name, t in times.items()}
    plain_s, ours_s = med["plain loop (subprocess)"], med["predistill train (subprocess)"]
    print(
        f"## `predistill train` end to end: preset:{args.preset}, {args.steps} steps × {args.batch} × {args.seq}, "
        f"{tokens} trained tokens, {args.rounds} alternating rounds (medians)\n"
    )
    print("| side | median s |\n|---|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.1f} |")
    print(f"\nspeed-up end to end: **{plain_s / ours_s:.2f}×**")
    emit(
        "train_e2e",
        preset=args.preset,
        steps=args.steps,
        batch=args.batch,
        seq=args.seq,
        tokens=tokens,
        plain_s=round(plain_s, 2),
        ours_s=round(ours_s, 2),
        speedup=round(plain_s / ours_s, 3),
        rounds=args.rounds,
        readme={
            "what": f"`predistill train` end to end (start-up, store, {args.steps} steps, HF export) vs a plain "
            f"script (`preset:{args.preset}`, batch {args.batch}×{args.seq}, 49k vocabulary)",
            "result": f"**{plain_s / ours_s:.2f}×** faster ({ours_s:.1f} s vs {plain_s:.1f} s wall, medians of "
            f"{args.rounds} alternating rounds)",
            "goal": "≥ 1.2× the plain loop",
        },
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e", action="store_true", help="time the `train` command end to end against a plain script")
    parser.add_argument("--work", default="/tmp/predistill-bench-train", help="--e2e: store cache and outputs")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--tokens-per-domain", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["loss", "step", "kd", "throughput", "precision"],
        choices=["loss", "step", "kd", "throughput", "precision"],
        help="without --e2e: which parts to run",
    )
    cli_args = parser.parse_args()
    e2e(cli_args) if cli_args.e2e else main(cli_args.parts)
