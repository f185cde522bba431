"""Scoring throughput: predistill's forward pass vs a naive HF loop, as a ratio within one run.

    python bench/bench_score.py [--model smollm2-135m] [--batch 8] [--seq 256] [--rounds 3] [--threads N]

Both paths score the same random right-padded batch (lengths seq/2..seq) and must agree:
- naive:  model(input_ids, attention_mask).logits → log_softmax over the full [B, L, V] fp32
          tensor → gather the targets → masked mean (what a plain HF scoring loop does);
- ablation: ours but with the attention mask (isolates the chunked-head gain);
- ours:   the body once without a mask (right padding + causal attention make it exact), then
          the lm head in chunks of `--chunk` positions, only at predicted positions
          (predistill.score.mean_logprobs): the [B, L, V] logits never exist.
The two are measured alternately, `--rounds` times each, and the medians compared, so a load
spike on a shared CPU hits both. The ratio is the headline (goal ≥ 1.3× on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from predistill.forward import ForwardBatch, mean_logprobs
from predistill.models import load_model, model_body


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
        batch = ForwardBatch(ids=np.arange(len(tokens)), tokens=tokens, lengths=lengths, hidden=hidden,
                             lm_head_weight=model.get_output_embeddings().weight, shard=None)
        return mean_logprobs(batch, chunk)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    times = {"naive HF (full logits, log_softmax, gather)": [], "predistill (no mask, chunked lm head)": [],
             "ablation: chunked lm head, with mask": []}
    for _ in range(args.rounds):
        for name, fn in zip(times, (lambda: naive_scores(model, tokens, lengths),
                                    lambda: our_scores(model, tokens, lengths, args.chunk),
                                    lambda: our_scores(model, tokens, lengths, args.chunk, with_mask=True))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    naive_name, ours_name, _ = list(times)
    print(f"model {args.model}, batch {args.batch} × ≤{args.seq} tokens ({n_tokens} real), vocab {len(tokenizer)}, "
          f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds; max |Δ mean log p| = {max_diff:.2e}")
    print("| path | median s/batch | tokens/s |\n|---|---:|---:|")
    for name, t in med.items():
        print(f"| {name} | {t:.3f} | {n_tokens / t:.0f} |")
    print(f"| **speed-up (ours / naive)** | | **{med[naive_name] / med[ours_name]:.2f}×** |")


if __name__ == "__main__":
    main()
