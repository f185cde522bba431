"""`predistill train`: pre-train a causal LM on a token store — one explicit loop.

Teachers for the demo, MiniPLM reference models and every student go through this loop. The
objective is `(1 − α(step))·L_lm + α(step)·L_kd`; the LM loss is computed from the model's final
hidden states in chunks (predistill.training.losses), so [batch × seq × vocab] logits never exist. A KD
source (see build_kd_source) supplies L_kd; with none, α must be 0.

Determinism: the data order is a pure function of (seed, step): epoch e visits the training ids
in the permutation drawn from rng(seed, e), and global batch s is the slice [s·B, (s+1)·B) of
that endless stream. A checkpoint therefore needs only the step to resume the data exactly.
Losses are normalised by the number of target tokens in the *global* batch, so any split into
ranks and micro-batches computes the same gradient.

The run directory it writes (config.json, metrics.jsonl, checkpoints/, exports/, hf/, the
manifest last) is laid out in `predistill.formats.rundir`; `eval` and `report` read it there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from predistill.core.artifacts import (
    PredistillError,
    lock_dir,
    open_append_nofollow,
    parse_json,
    read_json_object,
    read_manifest,
    refuse_links,
    write_bytes_atomic,
    write_json_atomic,
    write_manifest,
)
from predistill.core.config import add_config_arguments, config_from_args, from_flat, to_flat
from predistill.core.output import Output
from predistill.core.sharding import Dist, init_distributed
from predistill.formats import rundir
from predistill.formats.logits import FORMAT as LOGITS_FORMAT
from predistill.formats.selection import load_selection
from predistill.formats.store import TokenStore
from predistill.modeling.checkpoint import checkpoint_dirs, resume_state, save_checkpoint
from predistill.modeling.kernels import fuse_kernels
from predistill.modeling.models import (
    count_params,
    final_hidden,
    forward_params,
    head_weight,
    load_model,
    load_tokenizer,
    model_body,
    resolve_device,
    tokenizer_hash,
)
from predistill.text.crosstok import MappingStats
from predistill.training import distill
from predistill.training.config import TrainConfig, result_identity, same_result
from predistill.training.losses import fused_lm_loss, logprobs_and_entropies
from predistill.training.positions import TokenSelection, excess_mask, top_per_row
from predistill.training.schedules import alpha_at, lr_at

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# --- data ---------------------------------------------------------------------------------------


class DataOrder:
    """Global batch s = items [s·B, (s+1)·B) of the endless stream of per-epoch permutations."""

    def __init__(self, ids: np.ndarray, seed: int):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.seed = seed
        self._epochs: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            self._epochs = {e: np.random.default_rng([self.seed, e]).permutation(self.ids)}
        return self._epochs[e]

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        n = len(self.ids)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(positions // n):
            sel = positions // n == e
            out[sel] = self.epoch(int(e))[positions[sel] % n]
        return out


def make_batch(store: TokenStore, ids, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask) for instances `ids`, right-padded; mask marks real targets."""
    inputs, targets, mask = (t.to(device, non_blocking=True) for t in cpu_batch(store, ids, seq_len))
    return inputs, targets, mask


def cpu_batch(
    store: TokenStore, ids, seq_len: int, pin: bool = False, tokens_kept: TokenSelection | None = None
) -> tuple[torch.Tensor, ...]:
    tokens, lengths = store.batch(ids, max_len=seq_len + 1)
    positions = torch.arange(tokens.shape[1] - 1)
    mask = positions[None, :] < (lengths - 1)[:, None]
    if store.has_loss_mask:  # SFT data: only the targets its mask marks (the responses) are trained on
        for row, i in enumerate(ids):
            targets = torch.from_numpy(store.loss_mask(int(i))[1 : seq_len + 1].astype(bool))
            mask[row, : len(targets)] &= targets
    batch: tuple[torch.Tensor, ...] = (tokens[:, :-1], tokens[:, 1:], mask)
    if tokens_kept is not None and tokens_kept.during_step:  # chosen in the step: the reference's log-probs
        reference = torch.zeros(mask.shape, dtype=torch.float32)
        for row, (i, n) in enumerate(zip(ids, (lengths - 1).clamp(min=0).tolist())):
            reference[row, :n] = torch.from_numpy(tokens_kept.reference_logprobs(int(i), n))
        batch = (*batch, reference)
    elif tokens_kept is not None:  # token-level selection: the kept positions of each instance
        for row, (i, n) in enumerate(zip(ids, (lengths - 1).clamp(min=0).tolist())):
            mask[row, :n] &= torch.from_numpy(tokens_kept.keep(int(i), n))
    return tuple(t.pin_memory() for t in batch) if pin else batch


class StepLoader:
    """A step's micro-batches, built on the CPU one step ahead in a background thread, so the
    device never waits on numpy. What a step gets is a function of the step alone (DataOrder)."""

    def __init__(
        self,
        store: TokenStore,
        order: DataOrder,
        cfg,
        d,
        local_batch: int,
        micro: int,
        pin: bool,
        tokens_kept: TokenSelection | None = None,
    ):
        self.store, self.order, self.cfg, self.d, self.tokens_kept = store, order, cfg, d, tokens_kept
        self.local_batch, self.micro, self.pin = local_batch, micro, pin
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
        self.pending: dict[int, Future] = {}

    def _build(self, step: int):
        batch_ids = self.order.global_batch(step, self.cfg.batch_size)
        local = batch_ids[self.d.rank * self.local_batch : (self.d.rank + 1) * self.local_batch]
        micro_ids = [local[m : m + self.micro] for m in range(0, self.local_batch, self.micro)]
        return (
            max(n_targets(self.store, batch_ids, self.cfg.seq_len, self.tokens_kept), 1),
            n_positions(self.store, batch_ids, self.cfg.seq_len),
            micro_ids,
            [cpu_batch(self.store, ids, self.cfg.seq_len, self.pin, self.tokens_kept) for ids in micro_ids],
        )

    def get(self, step: int, steps: int):
        """(global target count, global position count, micro-batch ids, CPU tensors) of `step`;
        starts building step + 1."""
        future = self.pending.pop(step, None) or self.pool.submit(self._build, step)
        if step + 1 < steps:
            self.pending[step + 1] = self.pool.submit(self._build, step + 1)
        return future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def n_positions(store: TokenStore, ids, seq_len: int) -> int:
    """The positions a batch runs forward and backward over: what its FLOPs and tokens count, whether
    or not a loss mask or a token selection trains on fewer of them (`n_targets`)."""
    return int(np.maximum(np.minimum(store.lengths[np.asarray(ids)], seq_len + 1) - 1, 0).sum())


def n_targets(store: TokenStore, ids, seq_len: int, tokens_kept: TokenSelection | None = None) -> int:
    if tokens_kept is not None:
        lengths = np.maximum(np.minimum(store.lengths[np.asarray(ids)], seq_len + 1) - 1, 0)
        trained = [
            store.loss_mask(int(i))[1 : seq_len + 1].astype(bool) if store.has_loss_mask else np.ones(int(n), bool)
            for i, n in zip(ids, lengths)
        ]
        return sum(tokens_kept.count(int(i), m) for i, m in zip(ids, trained))
    if store.has_loss_mask:
        return int(sum(np.count_nonzero(store.loss_mask(int(i))[1 : seq_len + 1]) for i in ids))
    return n_positions(store, ids, seq_len)


# --- model --------------------------------------------------------------------------------------


class LossModel(torch.nn.Module):
    """A causal LM whose forward returns loss sums, so DDP/FSDP see all compute inside forward.

    Right padding needs no attention mask: under causal attention, real positions never see the
    pads that follow them.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        chunk_size: int,
        vocab_size: int | None = None,
        excess_fraction: float = 1.0,
        kd_position_fraction: float | None = None,
    ):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.excess_fraction = excess_fraction  # --token-rule excess (RHO-1): the fraction kept per instance
        self.kd_position_fraction = kd_position_fraction  # --kd-positions student-entropy (SE-KD)
        # the tokenizer's ids (default: every row of the head); rows past them are padding
        self.vocab_size = vocab_size or lm.get_output_embeddings().weight.shape[0]

    def forward(self, inputs, targets, mask, kd_batch=None, kd=None, alpha: float = 0.5, reference=None):
        """(Σ L_lm, Σ L_kd, per-position NLL [B, L], final hidden states) over the masked positions;
        with the reference's log-probs [B, L] (RHO-1), over the positions of highest excess loss."""
        hidden = final_hidden(model_body(self.lm), inputs)
        weight = head_weight(self.lm, self.vocab_size)  # padded rows are not tokens
        se_kd = kd is not None and self.kd_position_fraction is not None
        if reference is not None or se_kd:
            # the student before this step's update, from one no-grad pass over the head (no body): its
            # loss for RHO-1, its entropy for SE-KD — both from the same pass when both are on
            logp, entropy = logprobs_and_entropies(
                hidden.detach().flatten(0, -2),
                weight.detach(),
                targets.flatten() if reference is not None else None,
                self.chunk_size,
                entropies=se_kd,
            )
            if logp is not None:
                mask = excess_mask(-logp.view(targets.shape), reference, mask, self.excess_fraction)
            if entropy is not None:  # SE-KD: the KD term where the student is least sure
                assert kd is not None and self.kd_position_fraction is not None  # (se_kd)
                chosen = top_per_row(entropy.view(targets.shape), mask, self.kd_position_fraction)
                kd_batch = kd.only_at(kd_batch, chosen, targets)
        if kd is not None:
            lm_sum, kd_sum, nll, _ = kd.losses(hidden, weight, inputs, targets, mask, kd_batch, alpha)
            return lm_sum, kd_sum, nll, hidden
        keep = mask.bool()
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        # the gradient is computed in the forward pass, chunk by chunk: no logits are recomputed in backward
        total, nll[keep] = fused_lm_loss(hidden[keep], weight, targets[keep], self.chunk_size)
        return total.float(), nll.new_zeros(()), nll, hidden


def prepare_student(model, cfg: TrainConfig) -> None:
    """What train does to a loaded student before its first step (benchmarks build the same)."""
    if cfg.fused_kernels:
        fuse_kernels(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def bf16_compute(precision: str, device: torch.device) -> bool:
    """--precision: does the step compute in bfloat16 (autocast)? `auto`: on a GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def flops_per_token(model, vocab_size: int | None = None) -> int:
    """A training step costs 6·N per trained token (N: `models.forward_params`)."""
    return 6 * forward_params(model, vocab_size)


# --- the run ------------------------------------------------------------------------------------


def _kd_logits_positions(cfg: TrainConfig) -> dict | None:
    """What chose the positions of a position-selected --kd-logits store (None: every position)."""
    return read_manifest(cfg.kd_logits, LOGITS_FORMAT, "logits store").get("positions") if cfg.kd_logits else None


def build_kd_source(cfg: TrainConfig, store: TokenStore, model, device) -> distill.KDSource | None:
    """The KD source the config names (predistill.training.distill), or None."""
    if not (cfg.kd_logits or cfg.kd_teacher):
        return None
    kd_cfg = dataclasses.replace(cfg.kd, chunk_size=cfg.loss_chunk).validate()
    if cfg.kd_logits:
        # logits of this very store, or of the store this one was re-tokenised from (another tokenizer)
        if distill.logits_store_source(cfg.kd_logits) == store.hash:
            return distill.OfflineLogits(cfg.kd_logits, store, kd_cfg)
        return distill.CrossTokenizerLogits(cfg.kd_logits, store, kd_cfg)
    assert cfg.kd_teacher  # without --kd-logits, --kd-teacher (checked above)
    if cfg.minillm:
        return distill.MiniLLM(
            cfg.kd_teacher, store, kd_cfg, device, cfg.loss_chunk, model, cfg.seed, cfg.minillm_prefix
        )
    # beside an FSDP student the teacher is sharded too: a 9B/32B teacher fits only that way
    return distill.online_teacher(cfg.kd_teacher, store, kd_cfg, device, cfg.loss_chunk, shard=cfg.fsdp)


def method_label(cfg: TrainConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.alpha > 0 and cfg.kd_teacher:
        kd = "MiniLLM" if cfg.minillm else "Vanilla KD"
        base = f"MiniPLM + {kd}" if cfg.selection else kd
    elif cfg.alpha > 0 and cfg.kd_logits:
        base = "MiniPLM + PD" if cfg.selection else "PD"
    else:
        base = "MiniPLM" if cfg.selection else "Pre-Train w/o KD"
    if cfg.kd_positions:
        base = f"{base} at {cfg.kd_positions} positions ({cfg.kd_position_fraction:g})"
    return f"{base} + tokens ({cfg.token_rule}, {cfg.token_fraction:g})" if cfg.token_rule else base


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only. The fused kernel (one pass over each parameter instead of
    a dozen foreach passes) is about 3× faster on CPU (bench/bench_train.py); FSDP's sharded
    parameters keep the default implementation."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=not cfg.fsdp or None,
    )


# --- the step -----------------------------------------------------------------------------------


@dataclass
class Trainer:
    """One run's training objects and its step, split as torchtitan splits it: `_train` sets up and
    loops, `train_step` is one optimizer step over the global batch, `forward_backward_step` one
    micro-batch. `tokens`, `flops` and `kd_counts` are the run's progress (a checkpoint's trainer state)."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    out: Path
    store: TokenStore
    loss_model: LossModel
    wrapped: torch.nn.Module  # loss_model, or its DDP / FSDP wrapper
    optimizer: torch.optim.Optimizer
    loader: StepLoader
    kd: distill.KDSource | None
    saver: Any  # --save-logits: the online-logits writer
    autocast: contextlib.AbstractContextManager
    steps: int
    fpt: float  # FLOPs per token of a step that runs the KD source
    student_fpt: float  # … of a step without it (α = 0)
    tokens: int = 0
    flops: float = 0.0
    kd_counts: list = dataclasses.field(default_factory=lambda: MappingStats().as_list())

    def forward_backward_step(
        self, ids, batch, kd: distill.KDSource | None, alpha: float, global_targets: int, sync: bool
    ) -> tuple[float, float]:
        """One micro-batch forward and backward; its (Σ L_lm, Σ L_kd)."""
        inputs, targets, mask, *reference = (t.to(self.device, non_blocking=True) for t in batch)
        kd_batch = kd.batch(ids, inputs) if kd is not None else None
        with _grad_sync(self.wrapped, self.cfg.fsdp, enabled=sync), self.autocast:
            lm_sum, kd_sum, _, hidden = self.wrapped(inputs, targets, mask, kd_batch, kd, alpha, *reference)
            # × world: DDP/FSDP average gradients over ranks, but each rank's share is a sum
            loss = ((1 - alpha) * lm_sum + alpha * kd_sum) * (self.d.world / global_targets)
        loss.backward()
        if self.saver is not None:
            _save_logits(self.saver, self.store, ids, hidden, self.loss_model.lm, self.d)
        return lm_sum.item(), kd_sum.item()

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (from 0) over its global batch; the metrics row of the step."""
        cfg, t0 = self.cfg, time.perf_counter()
        lr = lr_at(
            cfg.lr_schedule,
            step,
            self.steps,
            cfg.lr,
            warmup=cfg.warmup,
            min_ratio=cfg.min_lr_ratio,
            warmup_ratio=cfg.warmup_ratio,
            decay_ratio=cfg.decay_ratio,
        )
        alpha = (
            alpha_at(
                cfg.alpha_schedule,
                step,
                self.steps,
                cfg.alpha,
                warmup_ratio=cfg.warmup_ratio,
                decay_ratio=cfg.decay_ratio,
            )
            if self.kd is not None
            else 0.0
        )
        kd = self.kd if alpha > 0 else None  # α = 0 (e.g. 3 of 4 `period` steps): no teacher, no cost
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        global_targets, global_positions, micro_ids, cpu_batches = self.loader.get(step, self.steps)
        lm_total = kd_total = 0.0
        for m, (ids, batch) in enumerate(zip(micro_ids, cpu_batches)):
            lm_sum, kd_sum = self.forward_backward_step(
                ids, batch, kd, alpha, global_targets, sync=m == len(micro_ids) - 1
            )
            lm_total += lm_sum
            kd_total += kd_sum
        # max_norm = inf measures the norm without clipping (the grads are scaled by exactly 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.loss_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )
        lm_total, kd_total = self.d.all_sum([lm_total, kd_total], self.device)
        # across tokenizers: this step's aligned positions and mapped teacher mass, over all ranks
        step_counts = kd.take_counts() if kd is not None else None
        if step_counts is not None:
            step_counts = self.d.all_sum(step_counts, self.device)
            self.kd_counts = [a + b for a, b in zip(self.kd_counts, step_counts)]
        if not (math.isfinite(lm_total) and math.isfinite(kd_total) and math.isfinite(float(grad_norm))):
            # every rank sees the same global sums and norm, so all stop here together
            raise PredistillError(
                f"step {step + 1}: non-finite loss or gradient norm (loss sums {lm_total}, "
                f"{kd_total}; grad norm {float(grad_norm)}); stopped before the update — the last "
                f"checkpoint in {self.out} is the last good state (check the data, or rerun into a "
                "new --out with a lower --lr)"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # compute counts every position of the batch, trained on or not (a mask or a selection
        # changes what the loss averages over, not what runs forward and backward)
        self.tokens += global_positions
        self.flops += (self.fpt if kd is not None else self.student_fpt) * global_positions
        row = {
            "step": step + 1,
            "loss": ((1 - alpha) * lm_total + alpha * kd_total) / global_targets,
            "lm_loss": lm_total / global_targets,
            "kd_loss": kd_total / global_targets if kd else None,
            "lr": lr,
            "alpha": alpha,
            "tokens": self.tokens,
            "flops": self.flops,
            "tokens_per_s": global_positions / (time.perf_counter() - t0),
            "grad_norm": float(grad_norm),
        }
        if step_counts is not None:
            row |= {f"kd_{k}": v for k, v in MappingStats(*step_counts).summary().items()}
        return row


def run(cfg: TrainConfig, command: str | None = None) -> Path:
    """Train (or resume) the run `cfg` describes; one writer per run directory at a time."""
    with contextlib.ExitStack() as held:  # the run directory's lock, released however training ends
        return _train(cfg, command, held)


def _train(cfg: TrainConfig, command: str | None, held: contextlib.ExitStack) -> Path:
    if not cfg.store:
        raise PredistillError("train needs --store")
    if not cfg.out:
        raise PredistillError("train needs --out")
    cfg.check()
    device = resolve_device(cfg.device)
    d = init_distributed(device)
    # nothing in a step draws from the global RNG (init and sampling fork their own), but it is saved
    # in checkpoints: seeded, two identical runs write identical checkpoint directories
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    store = TokenStore(cfg.store)
    val_path = cfg.val_store or (str(Path(cfg.store) / "val") if (Path(cfg.store) / "val").is_dir() else None)
    val_store = TokenStore(val_path) if val_path else None
    train_ids = load_selection(cfg.selection, store) if cfg.selection else np.arange(len(store))
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else store.tokenizer()
    if tokenizer_hash(tokenizer) != store.tokenizer_hash:
        raise PredistillError(
            f"tokenizer {cfg.tokenizer} is not the one that made {cfg.store}; "
            "re-tokenise the corpus (`sample --materialize`) or use the store's tokenizer"
        )
    if val_store is not None and val_store.tokenizer_hash != store.tokenizer_hash:
        raise PredistillError(f"val store {val_path} was made with another tokenizer than {cfg.store}")
    heldout_stores = _heldout_stores(cfg.heldout, store)
    # token-level selection: its records are opened (and refused, if not this store's) before anything is written
    tokens_kept = (
        TokenSelection(cfg.token_rule, cfg.token_fraction, cfg.seed, store, cfg.teacher_record, cfg.reference_record)
        if cfg.token_rule
        else None
    )

    # a run dir with checkpoints but no manifest is this run's unfinished work: resumed below
    # the identity is recomputed from the saved config: the run records every setting, not its identity
    run_output = Output(
        out,
        rundir.FORMAT,
        "run",
        result_identity(cfg),
        read=lambda m: result_identity(from_flat(TrainConfig, m["config"])),
    )
    if run_output.complete(resumable=rundir.holds_run_config, announce=d.main):
        return out
    if out.exists():  # an unfinished run of this config: resumed in place, never through a planted link
        refuse_links(out)
    if d.main:  # the main rank holds the directory: a second `train --out` of it is refused at once
        if not out.exists():
            out.mkdir(parents=True)
            held.callback(_remove_if_empty, out)  # a run that fails before writing leaves nothing behind
        held.callback(os.close, lock_dir(out, out))
    d.barrier()  # every rank has judged OUT before any of them writes into it (the online-logits store, say)

    model, _ = load_model(
        cfg.model, tokenizer, seed=cfg.seed, max_len=max(cfg.seq_len + 1, 2048), attn_impl=cfg.attn_impl
    )
    prepare_student(model, cfg)
    if model.get_input_embeddings().num_embeddings < store.vocab_size:
        raise PredistillError(
            f"model {cfg.model} has {model.get_input_embeddings().num_embeddings} embeddings "
            f"but the store's vocabulary has {store.vocab_size} ids"
        )
    model.to(device)
    params = count_params(model)
    student_fpt = flops_per_token(model, store.vocab_size)
    # RHO-1's and SE-KD's no-grad passes over the student's head, at every position
    head_pass = 2 * head_weight(model, store.vocab_size).numel()
    rho1 = tokens_kept is not None and tokens_kept.during_step
    if rho1:
        student_fpt += head_pass
    kd = build_kd_source(cfg, store, model, device)
    # FLOPs per token when KD runs (α > 0); steps with α = 0 skip the teacher and cost student_fpt.
    # SE-KD's entropies come from RHO-1's head pass when both are on, else from a pass of their own.
    se_kd_pass = head_pass if cfg.kd_positions and not rho1 else 0
    fpt = student_fpt + (kd.flops_per_token + se_kd_pass if kd is not None else 0)
    saver = _logits_saver(cfg, store, model, d) if cfg.save_logits else None

    mean_targets = float(np.mean(np.maximum(np.minimum(store.lengths[train_ids], cfg.seq_len + 1) - 1, 0)))
    steps = cfg.steps
    if cfg.flops_budget:
        step_flops = fpt * cfg.batch_size * mean_targets
        steps = int(cfg.flops_budget // step_flops)
        if steps < 1:  # an empty run is an error, not a complete artifact
            raise PredistillError(
                f"--flops-budget {cfg.flops_budget:g} buys no training step (one step costs ≈ {step_flops:.3g} FLOPs)"
            )
    if cfg.epochs:  # exact: 1.1 epochs of 100 instances in batches of 10 is 11 steps, not ⌈11.000000000000002⌉
        steps = math.ceil(Fraction(str(cfg.epochs)) * len(train_ids) / cfg.batch_size)
    local_batch = cfg.batch_size // d.world
    micro = cfg.micro_batch_size or local_batch
    if cfg.batch_size % d.world or local_batch % micro:
        raise PredistillError(
            f"--batch-size {cfg.batch_size} must split evenly into {d.world} ranks × micro-batches of {micro}"
        )

    loss_model = LossModel(
        model,
        cfg.loss_chunk,
        store.vocab_size,
        cfg.token_fraction,
        cfg.kd_position_fraction if cfg.kd_positions else None,
    )
    if cfg.compile:  # layer by layer (as torchtitan does): HF's body has Python-side logic between layers
        for layer in model_body(model).layers:
            layer.compile()
    wrapped: torch.nn.Module = loss_model
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, fp32 master weights and gradient reduction (--precision)
        precision = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16_compute(cfg.precision, device)
            else MixedPrecisionPolicy()
        )
        for layer in model_body(model).layers:
            fully_shard(layer, mp_policy=precision)
        fully_shard(loss_model, mp_policy=precision)
    elif d.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(loss_model)

    optimizer = make_optimizer(loss_model, cfg)

    config_json = to_flat(cfg) | {"command": command}
    start_step, tokens_seen, flops = 0, 0, 0.0
    kd_counts = MappingStats().as_list()  # cross-tokenizer KD: summed over the run (see crosstok)
    ckpts = checkpoint_dirs(out)
    if ckpts:
        saved = read_json_object(out / rundir.CONFIG, "the run directory")
        if not same_result(saved, cfg):
            raise PredistillError(f"{out} holds checkpoints of a run with another config; choose another --out")
        if saved.get("fsdp", False) != cfg.fsdp:  # the same weights, another checkpoint format (DCP under FSDP)
            raise PredistillError(
                f"{out} holds checkpoints written {'with' if saved.get('fsdp') else 'without'} "
                f"--fsdp; resume it {'with' if saved.get('fsdp') else 'without'} --fsdp"
            )
        state = resume_state(ckpts[-1], loss_model, optimizer, cfg.fsdp, steps)
        start_step, tokens_seen, flops = state["step"], state["tokens"], state["flops"]
        kd_counts = state.get("kd_counts", kd_counts)
        if d.main:
            _truncate_metrics(out / rundir.METRICS, start_step)
            print(f"predistill: resuming {out} from step {start_step}")
    elif d.main:  # a fresh start: nothing of an earlier attempt may pass for this run's
        out.mkdir(parents=True, exist_ok=True)
        (out / rundir.METRICS).unlink(missing_ok=True)
        shutil.rmtree(out / rundir.EXPORTS, ignore_errors=True)
    if d.main:
        write_json_atomic(out / rundir.CONFIG, config_json)
    d.barrier()

    writer = _tensorboard(out) if cfg.tensorboard and d.main else None
    order = DataOrder(train_ids, cfg.seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if bf16_compute(cfg.precision, device)
        else contextlib.nullcontext()
    )
    trainer = Trainer(
        cfg,
        d,
        device,
        out,
        store,
        loss_model,
        wrapped,
        optimizer,
        StepLoader(store, order, cfg, d, local_batch, micro, pin=device.type == "cuda", tokens_kept=tokens_kept),
        kd,
        saver,
        autocast,
        steps,
        fpt,
        student_fpt,
        tokens_seen,
        flops,
        kd_counts,
    )
    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=not d.main, dynamic_ncols=True)
    val_loss = None
    wrapped.train()
    try:  # the bar ends its line before an error is printed
        for step in range(start_step, steps):
            row = trainer.train_step(step)
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == steps:
                val_loss = evaluate(wrapped, val_store, cfg, d, device, autocast) if val_store else None
                row["val_loss"] = val_loss
                wrapped.train()
            if d.main and (done % cfg.log_every == 0 or done == steps or "val_loss" in row):
                with open_append_nofollow(out / rundir.METRICS) as f:
                    f.write(json.dumps(row) + "\n")
                if writer:
                    for k, v in row.items():
                        if v is not None and k != "step":
                            writer.add_scalar(k, v, done)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            progress = {"step": done, "tokens": trainer.tokens, "flops": trainer.flops}
            if cfg.export_every and done % cfg.export_every == 0 and done < steps:
                # before the checkpoint of the same step: a resumed run has every export up to its checkpoint
                export_info = progress | {"val_loss": row.get("val_loss")}
                _export(
                    out, model, loss_model, tokenizer, cfg, d, rundir.step_dir(Path(rundir.EXPORTS), done), export_info
                )
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                state = progress | {"kd_counts": trainer.kd_counts}
                save_checkpoint(out, done, loss_model, optimizer, state, d, cfg.fsdp, cfg.keep_checkpoints)
    finally:
        bar.close()
        trainer.loader.close()
    tokens_seen, flops, kd_counts = trainer.tokens, trainer.flops, trainer.kd_counts
    heldout_losses = {
        name: evaluate(wrapped, held, cfg, d, device, autocast, n=len(held)) for name, held in heldout_stores.items()
    }
    _export(out, model, loss_model, tokenizer, cfg, d)
    if saver is not None and (d.main or cfg.fsdp):  # the instances no step saw: one pass of the final model
        _finish_logits(saver, store, wrapped, loss_model, cfg, device, d)
    if d.main:
        write_manifest(
            out,
            {
                "format": rundir.FORMAT,
                "version": 1,
                "config": config_json,
                "method": method_label(cfg),
                "model": cfg.model,
                "params": params,
                "flops_per_token": fpt,
                "student_flops_per_token": student_fpt,
                "steps": steps,
                "tokens": tokens_seen,
                "flops": flops,
                # passes over the training instances (> 1: data repeated, the data-limited regime)
                "train_instances": len(train_ids),
                "epochs": steps * cfg.batch_size / len(train_ids),
                "teacher_flops": flops - student_fpt * tokens_seen,
                "store_hash": store.hash,
                "val_store_hash": val_store.hash if val_store else None,
                "selection": cfg.selection,
                "kd_logits": cfg.kd_logits,
                "kd_teacher": cfg.kd_teacher,
                "save_logits": cfg.save_logits,
                "final_val_loss": val_loss,
                "heldout_losses": heldout_losses,
            }
            | ({"kd_alignment": alignment} if kd is not None and (alignment := kd.alignment(kd_counts)) else {})
            | ({"token_selection": tokens_kept.describe()} if tokens_kept is not None else {})
            | ({"kd_logits_positions": positions} if (positions := _kd_logits_positions(cfg)) else {}),
        )
        print(
            f"predistill: {out}: {steps} steps, {tokens_seen} tokens, {flops:.3e} training FLOPs"
            + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
        )
    if writer:
        writer.close()
    d.barrier()
    return out


@torch.no_grad()
def evaluate(
    wrapped, val_store: TokenStore, cfg: TrainConfig, d: Dist, device, autocast, n: int | None = None
) -> float:
    """MiniPLM's held-out loss: the mean over instances of each instance's mean token NLL, over the
    first `n` instances (default: --eval-instances)."""
    wrapped.eval()
    n = min(len(val_store), cfg.eval_instances if n is None else n)
    ids = np.arange(n)
    per_rank = math.ceil(n / d.world)
    mine = ids[d.rank * per_rank : (d.rank + 1) * per_rank]
    total, count = 0.0, 0
    batch = cfg.micro_batch_size or max(cfg.batch_size // d.world, 1)
    # every rank runs the same number of forwards (FSDP needs all ranks in each one)
    for start in range(0, per_rank, batch):
        chunk = mine[start : start + batch]
        if len(chunk) == 0:
            chunk = ids[:1]
        inputs, targets, mask = make_batch(val_store, chunk, cfg.seq_len, device)
        with autocast:
            _, _, nll, _ = wrapped(inputs, targets, mask)
        if start < len(mine):
            per_instance = nll.sum(1) / mask.sum(1).clamp(min=1)
            valid = mask.sum(1) > 0
            total += float(per_instance[valid].sum())
            count += int(valid.sum())
    total_sum, count_sum = d.all_sum([total, count], device)
    return total_sum / max(count_sum, 1)


def _remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _heldout_stores(specs: list[str], store: TokenStore) -> dict[str, TokenStore]:
    """--heldout NAME=DIR: each a complete token store in the training store's tokenizer."""
    stores: dict[str, TokenStore] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise PredistillError(f"--heldout {spec!r}: write NAME=DIR")
        if name in stores:
            raise PredistillError(f"--heldout names the set {name!r} twice")
        stores[name] = TokenStore(path)
        if len(stores[name]) == 0:
            raise PredistillError(f"--heldout {name}={path}: the store holds no instance")
        if stores[name].tokenizer_hash != store.tokenizer_hash:
            raise PredistillError(f"--heldout {name}={path} was made with another tokenizer than {store.dir}")
    return stores


def _logits_saver(cfg: TrainConfig, store: TokenStore, model, d: Dist):
    """PD's online logits: this model's own top-p-k store, each instance taken the first time the
    model trains on it (then the rest with the final model); whole instances, DDP ranks too."""
    from predistill.formats.logits import LogitsConfig, LogitsStoreWriter

    if int(store.lengths.max()) > cfg.seq_len + 1:
        raise PredistillError(
            f"--save-logits needs whole instances: --seq-len must be ≥ {int(store.lengths.max()) - 1}"
        )
    # PD's online logits are top-p-k (the paper's truncation), whatever the offline default is
    truncation = LogitsConfig(mode="topk", top_p=cfg.save_logits_top_p, top_k=cfg.save_logits_top_k)
    assert cfg.save_logits  # called only with --save-logits
    return LogitsStoreWriter(
        cfg.save_logits, store, truncation, vocab_size=store.vocab_size, teacher=f"online:{cfg.model}"
    )


@torch.no_grad()
def _save_logits(saver, store: TokenStore, ids, hidden, lm, d: Dist | None = None) -> None:
    """Under DDP every rank computes the entries of its own micro-batch and rank 0 stores them all,
    in rank order: the first sighting of an instance wins, as in a one-rank run."""
    tokens, lengths = store.batch(ids)
    # under FSDP every rank gathers the whole head here (all ranks are here)
    batch = saver.entries_of_hidden(ids, hidden.detach(), head_weight(lm, store.vocab_size).detach(), tokens, lengths)
    for part in d.gather(batch) if d is not None else [batch]:
        if part is not None and (d is None or d.main):
            saver.accept(*part)


@torch.no_grad()
def _finish_logits(saver, store: TokenStore, wrapped, loss_model: LossModel, cfg: TrainConfig, device, d: Dist) -> None:
    """The instances no step saw, through the final model: rank 0 alone — or, under FSDP, whose
    forward needs every rank, all ranks, each a share of rank 0's list (padded with an instance
    rank 0 stores first, so that every rank runs as many forwards)."""
    loss_model.eval()
    if not cfg.fsdp:
        todo = saver.todo_instances()
        batch = cfg.micro_batch_size or cfg.batch_size
        for start in range(0, len(todo), batch):
            ids = todo[start : start + batch]
            tokens, _ = store.batch(ids)
            hidden = final_hidden(model_body(loss_model.lm), tokens.to(device))
            _save_logits(saver, store, ids, hidden, loss_model.lm)
        saver.finish()
        return
    todo = d.gather(saver.todo_instances() if d.main else None)[0]
    chunk = (cfg.micro_batch_size or cfg.batch_size // d.world) * d.world
    for start in range(0, len(todo), chunk):
        ids = todo[start : start + chunk][d.rank :: d.world]
        ids = ids if len(ids) else todo[start : start + 1]
        tokens, _ = store.batch(ids)
        tokens = tokens.to(device)
        # through the root module: FSDP gathers the embedding and final norm in its forward hooks
        _, _, _, hidden = wrapped(tokens, tokens, torch.zeros_like(tokens, dtype=torch.bool))
        _save_logits(saver, store, ids, hidden, loss_model.lm, d)
    if d.main:
        saver.finish()


def _grad_sync(wrapped, fsdp: bool, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch."""
    if fsdp:
        wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _export(
    out: Path,
    model,
    loss_model,
    tokenizer,
    cfg: TrainConfig,
    d: Dist,
    name: Path = Path(rundir.EXPORT),
    info: dict | None = None,
) -> None:
    """OUT/NAME (OUT/hf): a plain transformers directory (safetensors + tokenizer), written atomically."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(loss_model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    target = out / name
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    if cfg.fsdp:
        plain, _ = load_model(cfg.model, tokenizer, seed=cfg.seed, max_len=max(cfg.seq_len + 1, 2048))
        plain.load_state_dict(full)
        plain.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if info is not None:
        write_json_atomic(tmp / rundir.EXPORT_INFO, info)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = parse_json(line)
        except ValueError:
            continue  # a line cut by the kill, or a corrupt one: the resumed run rewrites those steps
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line)
    write_bytes_atomic(path, "".join(r + "\n" for r in rows).encode())


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PredistillError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(out / "tensorboard"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TrainConfig)


def main(args: argparse.Namespace) -> None:
    if cfg := config_from_args(TrainConfig, args):
        run(cfg, command=getattr(args, "command_line", None))
