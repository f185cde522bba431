"""MiniPLM_prx: predict the Difference-Sampling score with a small proxy instead of running the
teacher over the whole corpus.

The paper cut offline teacher inference ≈22× this way (9×10¹⁸ vs 2×10²⁰ FLOPs). Here:
1. a random `fraction` of the instances (default 5%) is scored by the teacher and the reference;
2. a proxy — the reference LM's body with a scalar head on the masked mean of its final hidden
   states — is trained briefly with MSE to predict the (standardised) difference
   mean log p_T − mean log p_ref on that subset;
3. the proxy predicts the difference for every instance, and `sample` keeps the top-α of it.

The cost actually spent (2·N·D per forward, 6·N·D per training token) is reported beside what
full scoring would cost, together with the Spearman rank correlation and the selection overlap
with full Difference Sampling on a check subset: the full score tables when given (exact), else a
second random subset disjoint from the training one, scored by both models (its cost is reported
separately, as evaluation, not as part of the method).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from predistill.core.artifacts import PredistillError
from predistill.core.config import Effect, option
from predistill.formats.selection import top_fraction
from predistill.formats.store import TokenStore
from predistill.modeling.models import (
    check_plain_head,
    final_hidden,
    forward_params,
    load_model,
    model_body,
    resolve_device,
)
from predistill.training.forward import ModelInputs, score_ids


@dataclass
class ProxyConfig:
    """`sample --method proxy`'s settings (flattened into sample's flags)."""

    teacher_model: str = option("", "proxy: teacher model spec (scores the proxy subset)")
    reference_model: str = option("", "proxy: reference model spec (scores the subset; its body is the proxy)")
    fraction: float = option(
        0.05, "proxy: fraction of instances scored by teacher and reference", key="proxy_fraction", interval="(0, 1)"
    )
    check_fraction: float = option(
        0.05,
        "proxy: disjoint fraction scored to measure agreement when --teacher/--reference tables are not given",
        interval="[0, 1)",
    )
    epochs: int = option(3, "proxy: training epochs over the subset", key="proxy_epochs", interval="[1, inf)")
    lr: float = option(3e-4, "proxy: AdamW learning rate", key="proxy_lr", interval="(0, inf)")
    batch_size: int = option(8, "proxy: instances per forward", interval="[1, inf)")
    max_len: int | None = option(None, "proxy: truncate instances to this many model tokens", interval="[1, inf)")
    chunk_size: int = option(256, cli=False)
    seed: int = option(0, cli=False)  # sample's --seed
    device: str = option("auto", "proxy: auto (cuda if available), cpu, cuda")
    progress: bool = option(True, cli=False, effect=Effect.NONE)  # sample's --no-progress


@dataclass
class ProxyResult:
    predicted: np.ndarray  # float32 [N]: the proxy's predicted difference for every instance
    train_ids: np.ndarray
    train_teacher: np.ndarray  # mean log p_T of the training subset
    train_reference: np.ndarray
    check_ids: np.ndarray  # instances the agreement was measured on
    check_difference: np.ndarray  # their true difference score
    stats: dict


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over the entries where both are finite."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    ra, rb = rankdata(a[ok]), rankdata(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


class DifferenceRegressor(torch.nn.Module):
    """The reference LM's body + a scalar head on the masked mean of the final hidden states."""

    def __init__(self, lm):
        super().__init__()
        self.body = model_body(lm)
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        # zero head: training starts from predicting the mean, so early stopping cannot hurt much
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # right padding + causal attention: valid positions never see the pads (no mask needed)
        hidden = final_hidden(self.body, tokens)
        valid = (torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]).to(hidden.dtype)
        pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled).squeeze(-1)


def _batches(inputs: ModelInputs, ids: np.ndarray, rows: dict[int, np.ndarray], batch_size: int):
    order = sorted(range(len(ids)), key=lambda k: (-len(rows[int(ids[k])]), k))
    for b0 in range(0, len(order), batch_size):
        sel = order[b0 : b0 + batch_size]
        tokens, lengths = inputs.batch([rows[int(ids[k])] for k in sel])
        yield np.asarray(sel), tokens, lengths


def _proxy_params(regressor: DifferenceRegressor, lm) -> int:
    """N of the proxy: the LM's (`models.forward_params`) with its vocabulary head swapped for the scalar one."""
    return (
        forward_params(lm)
        - lm.get_output_embeddings().weight.numel()
        + sum(p.numel() for p in regressor.head.parameters())
    )


def run_proxy(
    cfg: ProxyConfig, store: TokenStore, ratio: float, full_difference: np.ndarray | None = None
) -> ProxyResult:
    """Train the proxy on a scored subset and predict the difference for every instance of `store`."""
    n = len(store)
    if not 0 < cfg.fraction < 1:
        raise PredistillError(f"--proxy-fraction must be in (0, 1), got {cfg.fraction}")
    if full_difference is None and not 0 < cfg.check_fraction < 1:
        raise PredistillError(f"--check-fraction must be in (0, 1), got {cfg.check_fraction}")
    if not cfg.teacher_model or not cfg.reference_model:
        raise PredistillError("--method proxy needs --teacher-model and --reference-model (model specs)")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise PredistillError("--proxy-epochs and --batch-size must be ≥ 1")
    n_train = max(math.ceil(cfg.fraction * n), 2)
    n_check = 0 if full_difference is not None else max(math.ceil(cfg.check_fraction * n), 2)
    if n_train + n_check > n:
        raise PredistillError(
            f"the store has {n} instances: too few for a proxy subset of {n_train} and a check subset of {n_check}"
        )
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    train_ids = np.sort(perm[:n_train]).astype(np.int64)
    check_ids = np.sort(perm[n_train : n_train + n_check]).astype(np.int64)
    scored_ids = np.sort(np.concatenate([train_ids, check_ids]))
    device = resolve_device(cfg.device)

    def load(spec):
        model, tok = load_model(spec, preset_tokenizer=store.tokenizer(), seed=cfg.seed)
        check_plain_head(model, spec)
        return model.to(device).eval(), tok

    # 1. the teacher and the reference score the subset (one model in memory at a time)
    flops: dict[str, float] = {}
    scored = {}
    for role, spec in (("teacher", cfg.teacher_model), ("reference", cfg.reference_model)):
        model, tok = load(spec)
        inputs = ModelInputs(store, tok, cfg.max_len)
        logprob, _, _ = score_ids(
            model,
            inputs,
            scored_ids,
            batch_size=cfg.batch_size,
            chunk_size=cfg.chunk_size,
            progress=cfg.progress,
            desc=f"proxy: {role} subset",
        )
        scored[role] = dict(zip(scored_ids.tolist(), logprob))
        tokens_per_id = _forward_tokens(inputs, scored_ids)
        p = forward_params(model)
        flops[f"{role}_subset"] = 2.0 * p * sum(tokens_per_id[int(i)] for i in train_ids)
        flops[f"{role}_check"] = 2.0 * p * sum(tokens_per_id[int(i)] for i in check_ids)
        # full scoring cost: exact when the model reads the store's ids, else extrapolated from the subset
        ratio_tokens = sum(tokens_per_id.values()) / max(int(store.lengths[scored_ids].sum()), 1)
        full_tokens = (
            float(np.minimum(store.lengths, cfg.max_len or 1 << 62).sum())
            if not inputs.retokenized
            else float(store.lengths.sum()) * ratio_tokens
        )
        flops[f"{role}_full"] = 2.0 * p * full_tokens
        if role == "reference":
            reference_model, reference_inputs = model, inputs
        else:
            del model
    difference = {i: scored["teacher"][i] - scored["reference"][i] for i in scored_ids.tolist()}
    train_t = np.array([scored["teacher"][int(i)] for i in train_ids], dtype=np.float32)
    train_r = np.array([scored["reference"][int(i)] for i in train_ids], dtype=np.float32)
    target = train_t - train_r
    usable = np.isfinite(target)
    if usable.sum() < 2:
        raise PredistillError("fewer than 2 scorable instances in the proxy subset (instances need ≥ 2 tokens)")

    # 2. train the proxy (the reference body + scalar head) on the standardised difference
    mean, std = float(target[usable].mean()), float(target[usable].std()) or 1.0
    torch.manual_seed(cfg.seed)
    regressor = DifferenceRegressor(reference_model).to(device)
    regressor.train()
    optimizer = torch.optim.AdamW(regressor.parameters(), lr=cfg.lr, weight_decay=0.0)
    fit_ids = train_ids[usable]
    fit_target = torch.tensor((target[usable] - mean) / std, dtype=torch.float32, device=device)
    rows = {int(i): reference_inputs.row(i) for i in fit_ids}
    epoch_losses = []
    start = time.perf_counter()
    bar = tqdm(
        total=cfg.epochs * len(fit_ids),
        unit="inst",
        desc="proxy: train",
        dynamic_ncols=True,
        disable=not cfg.progress,
        file=sys.stderr,
    )
    for epoch in range(cfg.epochs):
        order = np.random.default_rng(cfg.seed + 1 + epoch).permutation(len(fit_ids))
        total, count = 0.0, 0
        for b0 in range(0, len(order), cfg.batch_size):
            sel = order[b0 : b0 + cfg.batch_size]
            tokens, lengths = reference_inputs.batch([rows[int(fit_ids[k])] for k in sel])
            pred = regressor(tokens.to(device), lengths.to(device))
            loss = torch.nn.functional.mse_loss(pred, fit_target[torch.as_tensor(sel, device=device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(regressor.parameters(), 1.0)
            optimizer.step()
            total += float(loss.detach()) * len(sel)
            count += len(sel)
            bar.update(len(sel))
            bar.set_postfix(mse=f"{total / count:.3f}")
        epoch_losses.append(total / count)
    bar.close()
    # the time goes to the log, not the artifact: a rerun writes the same bytes
    print(f"predistill: proxy trained in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    proxy_params = _proxy_params(regressor, reference_model)
    train_tokens = sum(len(rows[int(i)]) for i in fit_ids)
    flops["proxy_train"] = 6.0 * proxy_params * train_tokens * cfg.epochs

    # 3. the proxy predicts every instance
    regressor.eval()
    predicted = np.empty(n, dtype=np.float32)
    all_tokens = 0
    block = 512  # instances re-tokenised at a time (bounded memory on big stores)
    bar = tqdm(
        total=int(store.lengths.sum()),
        unit="tok",
        unit_scale=True,
        desc="proxy: predict",
        dynamic_ncols=True,
        disable=not cfg.progress,
        file=sys.stderr,
    )
    with torch.inference_mode():
        for s in range(0, n, block):
            ids = np.arange(s, min(s + block, n), dtype=np.int64)
            block_rows = {int(i): reference_inputs.row(i) for i in ids}
            for sel, tokens, lengths in _batches(reference_inputs, ids, block_rows, cfg.batch_size):
                out = regressor(tokens.to(device), lengths.to(device)).float().cpu().numpy()
                predicted[ids[sel]] = out * std + mean
                all_tokens += int(lengths.sum())
                bar.update(int(store.lengths[ids[sel]].sum()))
    bar.close()
    flops["proxy_predict"] = 2.0 * proxy_params * all_tokens

    # 4. agreement with full Difference Sampling
    if full_difference is not None:
        check_ids = np.arange(n, dtype=np.int64)
        check_difference = np.asarray(full_difference, dtype=np.float32)
        check_on = "full score tables (all instances)"
    else:
        check_difference = np.array([difference[int(i)] for i in check_ids], dtype=np.float32)
        check_on = f"random check subset of {len(check_ids)} instances"
    k_true = top_fraction(check_difference, ratio)
    k_proxy = top_fraction(predicted[check_ids], ratio)
    overlap = len(np.intersect1d(k_true, k_proxy)) / max(len(k_true), 1)
    spent = flops["teacher_subset"] + flops["reference_subset"] + flops["proxy_train"] + flops["proxy_predict"]
    full = flops["teacher_full"] + flops["reference_full"]
    stats = {
        "n_train": int(len(train_ids)),
        "n_check": int(len(check_ids)),
        "check_on": check_on,
        "train_target_mean": mean,
        "train_target_std": std,
        "epoch_mse": epoch_losses,
        "proxy_params": proxy_params,
        "spearman": spearman(predicted[check_ids], check_difference),
        "selection_overlap": overlap,
        "random_overlap_expected": float(ratio),
        "flops": flops,
        "flops_spent": spent,
        "flops_full_scoring": full,
        "flops_ratio_full_over_spent": full / spent if spent else float("inf"),
        "teacher_flops_ratio_full_over_spent": flops["teacher_full"] / max(flops["teacher_subset"], 1.0),
    }
    return ProxyResult(
        predicted=predicted,
        train_ids=train_ids,
        train_teacher=train_t,
        train_reference=train_r,
        check_ids=check_ids,
        check_difference=check_difference,
        stats=stats,
    )


def _forward_tokens(inputs: ModelInputs, ids: np.ndarray) -> dict[int, int]:
    return {int(i): len(inputs.row(i)) for i in ids}
