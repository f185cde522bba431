"""The forward pass every model-over-a-store stage shares: `score`, `eval`, `sample --method
proxy` and (for its prompts' re-tokenisation) `generate`.

- `ModelInputs`: the token rows a model sees for store instances (re-tokenised when the model's
  tokenizer is not the store's; truncated to max_len);
- `Shard` / `plan_shards`: the unit of resume and of work per rank;
- `run_forward_pass`: the model body once per batch, each `ForwardBatch` handed to every
  `ForwardConsumer` (the score writer, the logits-store writer, an in-memory collector);
- `mean_logprobs`: MiniPLM's per-instance statistic from a batch, through the chunked head.
"""

from __future__ import annotations

import abc
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from predistill.core.sharding import Shard
from predistill.formats.store import TokenStore
from predistill.modeling.models import final_hidden, head_weight, is_plain_head, model_body, tokenizer_hash
from predistill.text.retokenize import retokenize
from predistill.training.losses import inference_token_logprobs, logprobs_and_entropies, token_logprobs


class ModelInputs:
    """The token rows a model sees for store instances: the stored ids when the model shares the
    store's tokenizer, else the re-tokenised text; truncated to `max_len`."""

    def __init__(
        self, store: TokenStore, tokenizer, max_len: int | None = None, rows: Sequence[np.ndarray] | None = None
    ):
        self.store = store
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.retokenized = tokenizer_hash(tokenizer) != store.tokenizer_hash
        self.pad_id = tokenizer.eos_token_id
        self.rows = rows  # precomputed rows of instances 0..len(rows)-1 (already re-tokenised/truncated)

    def row(self, i: int | np.integer) -> np.ndarray:
        if self.rows is not None:
            return np.asarray(self.rows[int(i)], dtype=np.int64)
        ids = self.store[int(i)]
        if self.retokenized:
            ids = retokenize(ids, self.store.tokenizer(), self.store.eos_id, self.tokenizer)
        return np.asarray(ids[: self.max_len], dtype=np.int64)

    def batch(self, rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        tokens = torch.full((len(rows), max(int(lengths.max()), 1)), self.pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.from_numpy(r)
        return tokens, lengths


@dataclass
class ForwardBatch:
    """What one forward of the model body yields for a batch of instances.

    Rows are right-padded; `hidden[b, t]` for t ≥ lengths[b] is padding and must be ignored.
    Position t's hidden state predicts tokens[b, t + 1]; logits = hidden @ lm_head_weightᵀ.
    """

    ids: np.ndarray  # int64 [B] instance ids in the token store
    tokens: torch.Tensor  # int64 [B, L] the model-tokenizer ids (re-tokenised if needed), pad = EOS
    lengths: torch.Tensor  # int64 [B] valid tokens per row
    hidden: torch.Tensor | None  # [B, L, H] final hidden states (after the final norm), model dtype
    lm_head_weight: torch.Tensor  # [V, H]
    shard: Shard
    logits: torch.Tensor | None = None  # [B, L, V] fp32, only for models without a plain head (hidden is None)
    # per-position values computed once per batch for every consumer that asks (`token_logprobs_and_entropies`)
    memo: dict = field(default_factory=dict, repr=False)


class ForwardConsumer(abc.ABC):
    """Receives every batch of a forward pass. Subclass and override what you need.

    A shard is skipped (not forwarded) only when every consumer reports it done, so a consumer
    that has finished a shard another consumer still needs must ignore its batches itself.
    """

    def is_shard_done(self, shard: Shard) -> bool:
        return False

    def start_shard(self, shard: Shard) -> None:  # noqa: B027 — optional hook: most consumers need none
        pass

    @abc.abstractmethod
    def consume(self, batch: ForwardBatch) -> None:
        """Take one batch of the pass (hidden states at padding positions are garbage)."""

    def finish_shard(self, shard: Shard) -> None:  # noqa: B027 — optional hook: most consumers need none
        pass


@dataclass
class PassStats:
    n_instances: int = 0
    n_tokens: int = 0  # model tokens forwarded (valid positions, padding excluded)
    n_shards_run: int = 0
    n_shards_skipped: int = 0
    seconds: float = 0.0


@torch.inference_mode()
def run_forward_pass(
    model,
    inputs: ModelInputs,
    shards: Iterable[Shard],
    consumers: Sequence[ForwardConsumer],
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "score",
) -> PassStats:
    """Forward every pending shard's instances through `model` once and feed each batch to
    `consumers` (in order). Batches are formed within a shard, by length, so results do not
    depend on which rank runs the shard.

    A model whose head is not a plain projection (soft-capping, bias: `models.is_plain_head`) is
    run whole, and its batches carry fp32 `logits` instead of hidden states."""
    shards = list(shards)
    pending = [s for s in shards if not all(c.is_shard_done(s) for c in consumers)]
    stats = PassStats(n_shards_skipped=len(shards) - len(pending))
    device = next(model.parameters()).device
    plain = is_plain_head(model)
    vocab = len(inputs.tokenizer)
    body, weight = model_body(model), head_weight(model, vocab)  # padded rows are not tokens
    store_lengths = inputs.store.lengths
    total = int(sum(store_lengths[s.ids].sum() for s in pending))
    start = time.perf_counter()
    bar = tqdm(
        total=total, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True, disable=not progress, file=sys.stderr
    )
    try:
        for shard in pending:
            for c in consumers:
                c.start_shard(shard)
            rows = [inputs.row(i) for i in shard.ids]
            # longest first, ties by id: little padding, and the order depends on the shard alone
            order = sorted(range(len(rows)), key=lambda k: (-len(rows[k]), k))
            for b0 in range(0, len(order), batch_size):
                sel = order[b0 : b0 + batch_size]
                tokens, lengths = inputs.batch([rows[k] for k in sel])
                tokens = tokens.to(device)
                # Right padding + causal attention: no valid position attends to a pad, so no mask
                # is needed, and the mask-free call takes the fast causal attention kernel.
                if plain:
                    hidden, logits = final_hidden(body, tokens), None
                else:  # a head the chunked kernels do not model: the model's own logits, one batch at a time
                    hidden, logits = None, model(input_ids=tokens, use_cache=False).logits[..., :vocab].float()
                batch = ForwardBatch(
                    ids=shard.ids[sel],
                    tokens=tokens,
                    lengths=lengths.to(device),
                    hidden=hidden,
                    lm_head_weight=weight,
                    shard=shard,
                    logits=logits,
                )
                for c in consumers:
                    c.consume(batch)
                stats.n_tokens += int(lengths.sum())
                bar.update(int(store_lengths[shard.ids[sel]].sum()))
            for c in consumers:
                c.finish_shard(shard)
            stats.n_instances += len(shard.ids)
            stats.n_shards_run += 1
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def mean_logprobs(batch: ForwardBatch, chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per row: mean over predicted tokens of log p(x_t|x_<t) (fp32 log-probs summed in fp64; NaN
    for rows with < 2 tokens) and the number of predicted tokens."""
    tokens, lengths, hidden = batch.tokens, batch.lengths, batch.hidden
    n_pred = (lengths - 1).clamp(min=0)
    positions = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    predicted = positions[None, :] < n_pred[:, None]  # [B, L-1]: position t predicts token t+1
    targets = tokens[:, 1:][predicted]
    if batch.logits is not None:
        logp = torch.log_softmax(batch.logits[:, :-1][predicted], dim=-1).gather(1, targets[:, None]).squeeze(1)
    else:
        assert hidden is not None  # a batch without logits has hidden states
        if hidden.dtype == torch.float32 and batch.lm_head_weight.dtype == torch.float32:
            logp = inference_token_logprobs(hidden[:, :-1][predicted], batch.lm_head_weight, targets, chunk_size)
        else:
            logp = token_logprobs(hidden[:, :-1][predicted], batch.lm_head_weight, targets, chunk_size)
    rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(predicted)[predicted]
    sums = torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device).index_add_(0, rows, logp.double())
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums.cpu().numpy() / n_pred.cpu().numpy()
    means[n_pred.cpu().numpy() == 0] = np.nan
    return means, n_pred.cpu().numpy().astype(np.int32)


def token_logprobs_and_entropies(batch: ForwardBatch, chunk_size: int = 256) -> list[np.ndarray]:
    """Per row: float32 [n_pred, 2] — log p(x_t+1 | x_≤t) and the entropy of p(· | x_≤t), in nats, at
    each predicted position, from the full-vocabulary distribution (`losses.logprobs_and_entropies`);
    computed once per batch, however many consumers (the token record, a position choice) ask."""
    key = ("token_logprobs_and_entropies", chunk_size)
    if key not in batch.memo:
        tokens, lengths = batch.tokens, batch.lengths
        n_pred = (lengths - 1).clamp(min=0)
        predicted = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None, :] < n_pred[:, None]
        if batch.logits is not None:
            source, weight = batch.logits[:, :-1][predicted], None
        else:
            assert batch.hidden is not None  # a batch without logits has hidden states
            source, weight = batch.hidden[:, :-1][predicted], batch.lm_head_weight
        logp, entropy = logprobs_and_entropies(source, weight, tokens[:, 1:][predicted], chunk_size)
        assert logp is not None and entropy is not None  # targets were given, entropies asked for
        out = torch.stack([logp, entropy], dim=1).cpu()
        batch.memo[key] = [part.numpy() for part in torch.split(out, n_pred.tolist())]
    return batch.memo[key]


class ScoreCollector(ForwardConsumer):
    """Keeps every scored instance's mean log-prob and token count in memory."""

    def __init__(self, chunk_size: int = 256):
        self.chunk_size = chunk_size
        self.logprob: dict[int, float] = {}
        self.n_tokens: dict[int, int] = {}

    def consume(self, batch: ForwardBatch) -> None:
        means, counts = mean_logprobs(batch, self.chunk_size)
        for i, m, n in zip(batch.ids.tolist(), means, counts):
            self.logprob[i], self.n_tokens[i] = m, int(n)

    def arrays(self, ids: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([self.logprob[int(i)] for i in ids], dtype=dtype),
            np.array([self.n_tokens[int(i)] for i in ids], dtype=np.int32),
        )


def score_ids(
    model,
    inputs: ModelInputs,
    ids: np.ndarray,
    *,
    batch_size: int = 8,
    chunk_size: int = 256,
    shard_size: int = 512,
    progress: bool = True,
    desc: str = "score",
) -> tuple[np.ndarray, np.ndarray, PassStats]:
    """In-memory scores (mean log-prob float32, predicted-token counts) of the instances `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    shards = [Shard(k, ids[s : s + shard_size]) for k, s in enumerate(range(0, len(ids), shard_size))]
    collector = ScoreCollector(chunk_size)
    stats = run_forward_pass(model, inputs, shards, [collector], batch_size=batch_size, progress=progress, desc=desc)
    return (*collector.arrays(ids), stats)
