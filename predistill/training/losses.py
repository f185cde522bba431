"""Log-probabilities from hidden states without materialising [tokens × vocab] logits.

`gather_logprobs(hidden, weight, ids)` returns log softmax(hidden @ weightᵀ)[ids] for every row,
computing the logits `chunk_size` rows at a time and recomputing them in backward (Liger-style,
plain PyTorch). Peak memory is one chunk's logits instead of all of them; values and gradients
equal the plain computation. The LM loss is the one-id case (ids = next tokens); scoring uses it
under no_grad; KD uses several ids per row (the teacher's retained entries).
"""

from __future__ import annotations

import torch

# 512 rows × 49k vocabulary: a 96 MB fp32 logits buffer; 1024 (192 MB) measured no faster in a CPU training step
DEFAULT_CHUNK = 512


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = h @ weight.t()
    return logits if logits.dtype == torch.float64 else logits.float()  # fp32 softmax under bf16


class _GatherLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(ids.shape, dtype=acc, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden[rows], weight)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, ids[rows]) - lse[rows, None]
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, ids, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]
            probs = _chunk_logits(h, weight).sub_(lse[rows, None]).exp_()  # in place: one chunk buffer
            g = grad_out[rows].to(acc)
            # d/dlogits of Σ_k g_k·(logit[id_k] − lse) = scatter(g) − softmax·Σ_k g_k
            grad_logits = probs.mul_(-g.sum(dim=1, keepdim=True)).scatter_add_(1, ids[rows], g)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def gather_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """log softmax(hidden @ weightᵀ) at `ids`: hidden [N, H], weight [V, H], ids [N, K] → [N, K] fp32."""
    return _GatherLogprobs.apply(hidden, weight, ids, chunk_size)


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """log p(target) per row: hidden [..., H], targets [...] → [...] fp32."""
    flat = gather_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1, 1), chunk_size)
    return flat.view(targets.shape)


@torch.no_grad()
def logprobs_and_entropies(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    targets: torch.Tensor | None,
    chunk_size: int = DEFAULT_CHUNK,
    entropies: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(log p(target), entropy in nats) per row of the full-vocabulary distribution, fp32, `chunk_size`
    rows of logits at a time: rows [N, H] are hidden states (logits = rows @ weightᵀ) or, with
    `weight` None, logits [N, V]; no `targets`: no log-probs; no `entropies`: no entropies. No
    gradient: these choose and record positions, they are not a loss (the token record, position
    choices, RHO-1, SE-KD)."""
    out_lp = None if targets is None else torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    out_h = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device) if entropies else None
    w = None if weight is None else weight.float().t()
    for start in range(0, rows.shape[0], chunk_size):
        chunk = rows[start : start + chunk_size].float()
        logp = torch.log_softmax(chunk if w is None else chunk @ w, dim=-1)
        if out_lp is not None and targets is not None:
            out_lp[start : start + chunk_size] = logp.gather(1, targets[start : start + chunk_size, None]).squeeze(1)
        if out_h is not None:
            out_h[start : start + chunk_size] = torch.special.entr(logp.exp()).sum(dim=-1)  # −Σ p ln p, 0 ln 0 = 0
    return out_lp, out_h


def inference_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """`token_logprobs` for fp32 inference (no autograd), equal to float rounding and faster on CPU:
    - the logits are computed transposed, weight @ hᵀ → [V, rows]: with the vocabulary as the GEMM's
      long side MKL runs faster than h @ weightᵀ (measured on 2 cores: 128 vs 107 GFLOP/s at 256
      rows; the head ≈ 11% faster with the passes below);
    - one logits buffer serves every chunk, and the log-sum-exp (max, exp(x − max), sum, log, + max,
      as torch.logsumexp) works in it in place: a fresh chunk-sized buffer (50 MB at 256 × 49k) is
      mmap'd and page-faulted in for each chunk and each temporary, ≈ 15% of the head's time."""
    n, vocab = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    flat = torch.empty(vocab * min(chunk_size, n), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]
        logits = torch.matmul(weight, h.t(), out=flat[: vocab * h.shape[0]].view(vocab, h.shape[0]))
        target = logits.gather(0, targets[None, start : start + h.shape[0]]).squeeze(0)
        top = logits.amax(dim=0)
        top_finite = top.masked_fill(top.abs() == float("inf"), 0)  # as logsumexp: ±inf columns stay ±inf/nan
        lse = logits.sub_(top_finite).exp_().sum(dim=0).log_().add_(top_finite)
        out[start : start + h.shape[0]] = target - lse
    return out


def lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over positions where `mask` is true, and the per-position NLL [...].

    Only masked-in rows go through the vocabulary projection: padding costs nothing.
    """
    nll = torch.zeros(targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    keep = mask.bool()
    nll[keep] = -gather_logprobs(hidden[keep], weight, targets[keep].unsqueeze(1), chunk_size).squeeze(1)
    return nll.sum() / keep.sum().clamp(min=1), nll


def fused_head_pass(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int, chunk_grad) -> None:
    """The loop every fused loss shares (Liger-style, plain PyTorch): per chunk of rows, logits =
    h @ weightᵀ (fp32) → `chunk_grad(rows, logits, need_grad)` records the chunk's loss values and
    returns d(loss)/d(logits) [rows, V] (it may reuse the logits buffer), or None → d(hidden) for the
    chunk, d(weight) accumulated. The gradients are saved on `ctx` for `scaled_gradients`: backward
    only scales them, so no chunk's logits are computed twice. In fp32 every chunk's logits go into
    one buffer: a fresh [chunk × V] allocation per chunk is page-faulted in each time (≈ 10% of a
    CPU training step)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    # under autocast (train --precision bf16) the matmuls compute in its dtype, as the body's do; the
    # `out=` and in-place forms below would not be autocast, so they are used only without it
    device = hidden.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    reuse = autocast is None and hidden.dtype == weight.dtype == acc
    buf = (
        torch.empty((min(chunk_size, hidden.shape[0]), weight.shape[0]), dtype=acc, device=hidden.device)
        if reuse and hidden.shape[0]
        else None
    )
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows]
        logits = torch.matmul(h, weight.t(), out=buf[: h.shape[0]]) if buf is not None else _chunk_logits(h, weight)
        grad_logits = chunk_grad(rows, logits, need_h or need_w)
        if grad_logits is None:
            continue
        if grad_h is not None:  # need_h
            grad_h[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        if grad_w is not None and autocast is not None:  # need_w
            grad_w += grad_logits.t() @ h  # autocast: a product in its dtype, summed in fp32
        elif grad_w is not None:
            grad_w.addmm_(grad_logits.t(), h.to(acc))
    ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
    ctx.needs, ctx.dtypes = (need_h, need_w), (hidden.dtype, weight.dtype)


def gathered(ids: torch.Tensor, chunk_loss):
    """A `chunk_grad` for losses that see the logits only through log-probs at `ids` [N, K]:
    logq = logits[ids] − lse → `chunk_loss(rows, logq, need_grad)` records the loss and returns
    G = d(loss)/d(logq) → d(logits) = scatter(G) − softmax·ΣG. The softmax is computed once, in the
    logits' own buffer (max, exp in place, sum): the log-sum-exp comes from the same pass."""

    def chunk_grad(rows, logits, need_grad):
        top = logits.amax(dim=1, keepdim=True)
        picked = logits.gather(1, ids[rows])
        probs = logits.sub_(top).exp_()  # softmax numerators
        total = probs.sum(dim=1, keepdim=True)
        g = chunk_loss(rows, picked - (total.log() + top), need_grad)
        if g is None:
            return None
        return probs.mul_(-g.sum(1, keepdim=True) / total).scatter_add_(1, ids[rows], g)

    return chunk_grad


def honour_grad_mode(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Detached under no_grad: a fused loss reads `needs_input_grad`, which ignores the grad mode, and
    would compute gradients nobody asked for (evaluation)."""
    return tensors if torch.is_grad_enabled() else tuple(t.detach() for t in tensors)


def common_scale(grads: tuple[torch.Tensor, ...], weights: tuple[float, ...], name: str) -> torch.Tensor:
    """The one factor by which backward scales a fused loss's stored gradient: the incoming gradients
    of its sums must weigh them as `weights` did in the forward (train's α schedule does)."""
    scales = [g / w for g, w in zip(grads, weights) if w != 0]
    if any(not torch.allclose(s, scales[0], rtol=1e-4, atol=0) for s in scales[1:]):
        raise RuntimeError(
            f"{name} was told its sums are weighed {':'.join(map(str, weights))}, but the loss weighs "
            f"them {':'.join(str(float(g)) for g in grads)}"
        )
    return scales[0]


def scaled_gradients(ctx, scale: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight) saved by `fused_head_pass`, times the incoming gradient of the loss. Scaled
    in place: a copy of d(weight) ([V, H], 75 MB at 49k × 384) would live beside the saved one at the
    step's peak. So backward runs once per forward (no retain_graph)."""
    if getattr(ctx, "scaled", False):
        raise RuntimeError(
            "a fused loss's backward ran twice: its stored gradients are scaled in place "
            "(retain_graph is not supported)"
        )
    ctx.scaled = True
    saved = iter(ctx.saved_tensors)
    grad_h, grad_w = (next(saved).mul_(scale).to(dtype) if need else None for need, dtype in zip(ctx.needs, ctx.dtypes))
    return grad_h, grad_w


class _FusedLMLoss(torch.autograd.Function):
    """Σ NLL of `targets` under softmax(hidden @ weightᵀ), the gradient computed in the forward pass
    (`fused_head_pass` + `gathered`; for one target G = −1, so d(logits) = softmax − onehot)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        nll = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)

        def chunk_loss(rows, logq, need_grad):
            nll[rows] = -logq[:, 0]
            return torch.full_like(logq, -1.0) if need_grad else None

        fused_head_pass(ctx, hidden, weight, chunk_size, gathered(targets[:, None], chunk_loss))
        ctx.mark_non_differentiable(nll)
        return nll.sum(), nll

    @staticmethod
    def backward(ctx, grad_total, _grad_rows):
        return (*scaled_gradients(ctx, grad_total), None, None)


def fused_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ NLL, per-row NLL) of `targets` [N] under softmax(hidden [N, H] @ weight [V, H]ᵀ), fp32, with
    the gradient of Σ NLL computed during the forward (`_FusedLMLoss`). The per-row values carry no
    gradient: a loss built from them must use `gather_logprobs` instead."""
    return _FusedLMLoss.apply(*honour_grad_mode(hidden, weight), targets, chunk_size)
