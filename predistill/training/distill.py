"""KD sources for `predistill train`: where L_kd's teacher signal comes from.

A KD source is a `KDSource` (the protocol below: the one interface `train` uses).

Five sources:
- `OfflineLogits` (PD): a logits store written by `predistill score --logits-out` (or by a model
  that saved its own *online logits* while it trained). The LM loss and KD share one pass over the
  vocabulary with both gradients computed in it (predistill.training.kd.fused_lm_kd_loss), so an offline-KD
  step costs about an LM-only step.
- `OnlineTeacher` (Vanilla KD): a teacher model run on every micro-batch; full-vocabulary KD
  (predistill.training.kd.online_kd_loss); its 2·N_teacher FLOPs per token are counted.
- `MiniLLM`: reverse KL on the student's own samples, scored by an online teacher (see the class).
- `CrossTokenizerLogits`, `OnlineCrossTokenizer`: the two above for a teacher with another tokenizer;
  the teacher's entries at byte-aligned positions are mapped onto the student's vocabulary
  (predistill.text.crosstok) and the same fused losses run on them. They count aligned positions and
  mapped teacher mass (`take_counts`), which train logs and saves in the run's manifest.
`--kd-loss uld` (Universal Logit Distillation: sorted probabilities, no vocabulary mapping) works
with every source but the same-vocabulary online teacher, where plain KD needs no workaround.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from predistill.core.artifacts import PredistillError, read_manifest
from predistill.formats.logits import FORMAT as LOGITS_FORMAT
from predistill.formats.logits import LogitsConfig, LogitsStore, TeacherTargets, teacher_targets
from predistill.formats.store import TokenStore
from predistill.modeling.kernels import fuse_kernels
from predistill.modeling.models import (
    check_plain_head,
    final_hidden,
    forward_params,
    head_weight,
    load_model,
    model_body,
    tokenizer_hash,
)
from predistill.text.crosstok import MappingStats, Speller, VocabMap, align, map_targets
from predistill.text.retokenize import retokenize
from predistill.training.kd import KDConfig, fused_lm_kd_loss, fused_lm_uld_loss, fused_online_lm_kd_loss
from predistill.training.losses import fused_lm_loss, lm_loss


class KDSource(Protocol):
    """Where L_kd's teacher signal comes from. The sources below subclass it; a new source is one
    more subclass and one more branch in `train.build_kd_source`."""

    flops_per_token: int  # teacher FLOPs spent per trained token at training time (0 when offline)

    def batch(self, ids: np.ndarray, inputs: torch.Tensor) -> Any:
        """What `losses` needs for a micro-batch of instances `ids`, read before the forward."""
        ...

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        """(Σ L_lm, Σ L_kd, L_lm and L_kd per position [B, L]) from the student's final hidden
        states and lm-head weight, without [B·L × V] logits; the sums carry the gradients and enter
        the loss as (1 − α)·Σ L_lm + α·Σ L_kd (times any common factor), the per-position values
        are for logging."""
        ...

    def only_at(self, kd_batch: Any, positions: torch.Tensor, next_tokens: torch.Tensor) -> Any:
        """`kd_batch` with the teacher's distribution kept at `positions` [B, L] (bool; `train
        --kd-positions`) only; elsewhere the KD term's target is the data's next token (`data_elsewhere`).
        Default: for teacher entries (TeacherTargets)."""
        return data_elsewhere(kd_batch, next_tokens, ~positions.to(kd_batch.mask.device))

    def take_counts(self) -> list[float] | None:
        """Counters since the last call that `train` sums over ranks and the run (a cross-tokenizer
        source's aligned positions and mapped mass); None: the source keeps none."""
        return None

    def alignment(self, counts: list[float]) -> dict | None:
        """What the run manifest records of the counters summed over the run (`kd_alignment`)."""
        return None


def data_elsewhere(targets: TeacherTargets, next_tokens: torch.Tensor, where: torch.Tensor) -> TeacherTargets:
    """`targets` with the data's next token as the one entry (probability 1) at positions `where`
    [B, L]: a position a selection left without the teacher's distribution keeps its full weight —
    its KD term is −log q(next token), the NLL, for kld and nll — instead of dropping to the (1 − α)
    LM term alone. Used where positions are chosen (a position-selected store, SE-KD); a position
    a cross-tokenizer alignment cannot map keeps no KD term."""
    where = where.to(targets.mask.device)
    ids, logprobs, mask = targets.ids.clone(), targets.logprobs.clone(), targets.mask.clone()
    ids[where], logprobs[where], mask[where] = 0, 0.0, False
    ids[..., 0][where] = next_tokens.to(ids.device)[where]
    mask[..., 0][where] = True
    return TeacherTargets(ids, logprobs, mask)


def forward_flops_per_token(model, vocab_size: int | None = None) -> int:
    """A forward costs 2·N per token (N: `models.forward_params`)."""
    return 2 * forward_params(model, vocab_size)


def offline_losses(hidden, weight, targets, kd_batch: TeacherTargets, kd_cfg: KDConfig, mask, alpha):
    """L_lm and L_kd from teacher entries in one fused pass (ULD's own pass for `--kd-loss uld`)."""
    loss = fused_lm_uld_loss if kd_cfg.loss == "uld" else fused_lm_kd_loss
    return loss(hidden, weight, targets, kd_batch, kd_cfg, mask, weights=(1 - alpha, alpha))


def open_logits(path: str, store: TokenStore) -> LogitsStore:
    logits = LogitsStore(path, store)  # refuses another token store or tokenizer, naming both hashes
    # ids are the tokenizer's; stores written before padding was masked recorded the teacher's head
    # rows instead, and an entry past the tokenizer would be a padding row: refuse those stores
    if logits.manifest.get("vocab_size", store.vocab_size) > store.vocab_size:
        raise PredistillError(
            f"logits store {path} has a vocabulary of {logits.manifest['vocab_size']} ids, "
            f"the token store's tokenizer {store.vocab_size}: rewrite it with this predistill "
            "(padded teacher rows are no longer stored)"
        )
    return logits


class OfflineLogits(KDSource):
    flops_per_token = 0  # the teacher pass was paid offline; its FLOPs are in the score table's manifest

    def __init__(self, path: str, store: TokenStore, kd_cfg: KDConfig):
        self.store = open_logits(path, store)
        self.kd_cfg = kd_cfg

    def batch(self, ids, inputs: torch.Tensor):
        return self.store.read_batch(ids, inputs.shape[1])

    def with_data(self, kd_batch: TeacherTargets, next_tokens: torch.Tensor, mask: torch.Tensor) -> TeacherTargets:
        """A position-selected store's targets, with the data's next token where it kept no distribution
        (`data_elsewhere`); a store of every position's, as they are."""
        if self.store.positions is None:
            return kd_batch
        return data_elsewhere(kd_batch, next_tokens, mask.to(kd_batch.mask.device) & ~kd_batch.mask.any(-1))

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        kd_batch = self.with_data(kd_batch, targets, mask)
        return offline_losses(hidden, weight, targets, kd_batch, self.kd_cfg, mask, alpha)


def logits_store_source(path: str) -> str:
    """The hash of the token store a logits store was made from (to choose the KD source)."""
    return read_manifest(path, LOGITS_FORMAT, "logits store")["store_hash"]


class _AcrossTokenizers(KDSource):
    """What both cross-tokenizer sources share: the two spellers, the vocabulary map, the counts, and
    laying the teacher's entries at aligned positions out as a batch's targets in student ids."""

    flops_per_token = 0

    def __init__(self, student_tokenizer, teacher_tokenizer, kd_cfg: KDConfig):
        self.student, self.teacher = Speller.of(student_tokenizer), Speller.of(teacher_tokenizer)
        self.vocab = VocabMap(self.teacher, self.student, kd_cfg.vocab_map)
        self.kd_cfg = kd_cfg
        self.counts = MappingStats()

    def take_counts(self) -> list[float]:
        """[positions, aligned, teacher mass, mapped mass] since the last call (see MappingStats)."""
        counts, self.counts = self.counts.as_list(), MappingStats()
        return counts

    def alignment(self, counts: list[float]) -> dict:
        """The run manifest's `kd_alignment` from the counts summed over the run."""
        return (
            MappingStats(*counts).summary()
            | dict(zip(("positions", "aligned_positions", "teacher_mass", "mapped_mass_sum"), counts))
            | {"vocab_map": self.vocab.describe() | {"tail": self.kd_cfg.tail}}
        )

    def _aligned(
        self, student_ids: np.ndarray, teacher_ids: np.ndarray, length: int, teacher_positions: int | None = None
    ) -> np.ndarray:
        """Aligned teacher positions of the student's positions 0..length−1 that have a target."""
        n = max(min(length, len(student_ids) - 1), 0)
        where = align(student_ids[:n], teacher_ids, self.student, self.teacher, teacher_positions)
        self.counts.positions += n
        self.counts.aligned += int((where >= 0).sum())
        return where

    def _layout(
        self, entries: TeacherTargets, batch_rows: np.ndarray, positions: np.ndarray, shape: tuple[int, int]
    ) -> TeacherTargets:
        """Entries [N, K] in teacher ids for (batch row, student position) pairs → targets [B, L, K'] in
        student ids (ULD keeps the teacher's: it reads only the probabilities)."""
        if self.kd_cfg.loss != "uld":
            entries, teacher_mass, mapped_mass = map_targets(entries, self.vocab)
            self.counts.teacher_mass += teacher_mass
            self.counts.mapped_mass += mapped_mass
        flat = batch_rows * shape[1] + positions
        k = entries.ids.shape[1]
        ids = torch.zeros((shape[0] * shape[1], k), dtype=torch.long)
        lps = torch.zeros((shape[0] * shape[1], k), dtype=torch.float32)
        mask = torch.zeros((shape[0] * shape[1], k), dtype=torch.bool)
        index = torch.from_numpy(flat)
        ids[index], lps[index], mask[index] = entries.ids, entries.logprobs, entries.mask
        return TeacherTargets(ids, lps, mask).reshape(shape[0], shape[1], k)

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        return offline_losses(hidden, weight, targets, kd_batch, self.kd_cfg, mask, alpha)


class CrossTokenizerLogits(_AcrossTokenizers):
    """PD from a logits store over the teacher's token store, for a student whose store was re-tokenised
    from it instance by instance (`prepare --source store:DIR`): instance i is the same text in both,
    so each student position reads the teacher's entries at its aligned position (predistill.text.crosstok)."""

    def __init__(self, path: str, store: TokenStore, kd_cfg: KDConfig):
        made_from = logits_store_source(path)
        derived = store.manifest.get("derived_from") or {}
        if derived.get("hash") != made_from:
            raise PredistillError(
                f"logits store {path} was made from token store {made_from[:12]}, but {store.dir} "
                f"(store {store.hash[:12]}) "
                + (
                    f"was re-tokenised from store {derived['hash'][:12]}"
                    if derived
                    else "is neither that store nor re-tokenised from it"
                )
                + ": make the student's store with `prepare --source store:TEACHER_STORE --tokenizer T`"
            )
        if not Path(derived["path"]).is_dir():
            raise PredistillError(
                f"{store.dir} was re-tokenised from {derived['path']}, which is gone: the teacher's "
                "token store is needed to align with its logits"
            )
        self.teacher_store = TokenStore(derived["path"])
        if self.teacher_store.hash != derived["hash"]:
            raise PredistillError(
                f"{derived['path']} now holds store {self.teacher_store.hash[:12]}, not the store "
                f"{derived['hash'][:12]} that {store.dir} was re-tokenised from"
            )
        self.store, self.logits = store, open_logits(path, self.teacher_store)
        super().__init__(store.tokenizer(), self.teacher_store.tokenizer(), kd_cfg)

    def batch(self, ids, inputs: torch.Tensor):
        rows, positions, instances, teacher_positions = [], [], [], []
        for b, i in enumerate(np.asarray(ids).tolist()):
            where = self._aligned(np.asarray(self.store[i]), np.asarray(self.teacher_store[i]), inputs.shape[1])
            at = np.flatnonzero(where >= 0)
            rows.append(np.full(len(at), b))
            positions.append(at)
            instances.append(np.full(len(at), i))
            teacher_positions.append(where[at])
        entries = self.logits.read(np.concatenate(instances), np.concatenate(teacher_positions))
        return self._layout(
            entries, np.concatenate(rows), np.concatenate(positions), (inputs.shape[0], inputs.shape[1])
        )


# an online teacher of another tokenizer is truncated to its most probable tokens before the mapping,
# so memory does not grow with its vocabulary (the rest of its mass is the tail)
ONLINE_CROSS_TOP_K = 64


class OnlineCrossTokenizer(_AcrossTokenizers):
    """Vanilla KD from a teacher with another tokenizer: each micro-batch's text is re-tokenised for the
    teacher (predistill.text.retokenize), the teacher runs on it, and its ONLINE_CROSS_TOP_K most probable
    tokens at each aligned position are mapped onto the student's vocabulary."""

    def __init__(self, spec: str, store: TokenStore, kd_cfg: KDConfig, device, loaded=None, shard: bool = False):
        self.model, tokenizer = loaded or load_model(spec)
        check_plain_head(self.model, spec)  # its logits are computed from the body's hidden states
        self.model.to(device).eval().requires_grad_(False)
        fuse_kernels(self.model)  # the same values, computed in place (predistill.modeling.kernels)
        if shard:
            shard_for_inference(self.model)
        self.body = model_body(self.model)
        self.weight = head_weight(self.model, len(tokenizer))  # padded rows are not tokens
        self.store, self.tokenizer, self.device = store, tokenizer, device
        self.truncation = LogitsConfig(mode="topk", top_p=1.0, top_k=ONLINE_CROSS_TOP_K)
        super().__init__(store.tokenizer(), tokenizer, kd_cfg)
        # the teacher reads the same text in its own tokens: 2·N_teacher per teacher token, counted per
        # student token with the ratio of token counts on up to 256 evenly spread instances
        sample = np.unique(np.linspace(0, len(store) - 1, min(len(store), 256)).astype(np.int64))
        student_tokens = sum(len(store[i]) for i in sample)
        teacher_tokens = sum(len(self._teacher_ids(np.asarray(store[i]))) for i in sample)
        self.tokens_ratio = teacher_tokens / max(student_tokens, 1)
        self.flops_per_token = int(round(forward_flops_per_token(self.model, len(tokenizer)) * self.tokens_ratio))

    def _teacher_ids(self, student_ids: np.ndarray) -> np.ndarray:
        return retokenize(student_ids, self.store.tokenizer(), self.store.eos_id, self.tokenizer)

    @torch.no_grad()
    def batch(self, ids, inputs: torch.Tensor):
        length = inputs.shape[1]
        teacher_inputs, aligned = [], []
        for i in np.asarray(ids).tolist():
            student_ids = np.asarray(self.store[i])
            teacher_ids = self._teacher_ids(student_ids[:length])  # the text the student reads
            teacher_inputs.append(teacher_ids)
            # the teacher runs live: its last token predicts too
            aligned.append(self._aligned(student_ids, teacher_ids, length, teacher_positions=len(teacher_ids)))
        width = max(max(len(t) for t in teacher_inputs), 1)
        padded = torch.full((len(teacher_inputs), width), self.tokenizer.eos_token_id, dtype=torch.long)
        for b, t in enumerate(teacher_inputs):
            padded[b, : len(t)] = torch.from_numpy(t)
        rows = np.concatenate([np.full(int((a >= 0).sum()), b) for b, a in enumerate(aligned)])
        positions = np.concatenate([np.flatnonzero(a >= 0) for a in aligned])
        teacher_positions = np.concatenate([a[a >= 0] for a in aligned])
        if not len(rows):  # nothing to distil in this micro-batch (LM loss only)
            none = TeacherTargets(
                torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1)), torch.zeros((0, 1), dtype=torch.bool)
            )
            return self._layout(none, rows, positions, (inputs.shape[0], inputs.shape[1]))
        # right padding needs no attention mask under causal attention
        hidden = final_hidden(self.body, padded.to(self.device))
        picked = hidden[torch.from_numpy(rows).to(hidden.device), torch.from_numpy(teacher_positions).to(hidden.device)]
        entries = teacher_targets(picked, self.weight, self.truncation)
        entries = TeacherTargets(entries.ids.cpu(), entries.logprobs.cpu(), entries.mask.cpu())
        return self._layout(entries, rows, positions, (inputs.shape[0], inputs.shape[1]))


def online_teacher(spec: str, store: TokenStore, kd_cfg: KDConfig, device, chunk_size: int, shard: bool = False):
    """Vanilla KD's source, the teacher loaded once: its tokenizer decides whether positions need aligning."""
    model, tokenizer = load_model(spec)
    if tokenizer_hash(tokenizer) != store.tokenizer_hash:
        return OnlineCrossTokenizer(spec, store, kd_cfg, device, loaded=(model, tokenizer), shard=shard)
    return OnlineTeacher(spec, store, kd_cfg, device, chunk_size, loaded=(model, tokenizer), shard=shard)


def shard_for_inference(model) -> None:
    """FSDP2 over the teacher's decoder layers, for inference beside an FSDP student (train --fsdp):
    each rank holds 1/world of them, gathered one layer at a time in the forward. The embeddings,
    final norm and head (used outside the forward, by the fused KD losses) stay whole on every rank.
    Every rank runs the teacher on every micro-batch, so the gathers line up."""
    from torch.distributed.fsdp import fully_shard

    for layer in model_body(model).layers:
        fully_shard(layer)


class OnlineTeacher(KDSource):
    def __init__(
        self, spec: str, store: TokenStore, kd_cfg: KDConfig, device, chunk_size: int, loaded=None, shard: bool = False
    ):
        if kd_cfg.loss == "uld":
            raise PredistillError(
                "--kd-loss uld is for teachers whose probabilities cannot be compared id by id "
                "(another tokenizer, or a logits store); with one shared vocabulary use a KD loss"
            )
        self.teacher, tokenizer = loaded or load_model(spec)
        check_plain_head(self.teacher, spec)  # its logits are computed from the body's hidden states
        if tokenizer_hash(tokenizer) != store.tokenizer_hash:
            raise PredistillError(
                f"online teacher {spec} has tokenizer {tokenizer_hash(tokenizer)[:12]}, but the store "
                f"was made with {store.tokenizer_hash[:12]}: KD needs one shared vocabulary"
            )
        self.teacher.to(device).eval().requires_grad_(False)
        fuse_kernels(self.teacher)  # the same values, computed in place (predistill.modeling.kernels)
        if shard:
            shard_for_inference(self.teacher)
        self.body = model_body(self.teacher)
        self.weight = head_weight(self.teacher, store.vocab_size)  # padded rows are not tokens
        self.kd_cfg = kd_cfg
        self.chunk_size = chunk_size
        self.flops_per_token = forward_flops_per_token(self.teacher, store.vocab_size)
        self.lengths = store.lengths
        self.eos_id = store.eos_id

    def batch(self, ids, inputs: torch.Tensor):
        return None

    def only_at(self, kd_batch, positions: torch.Tensor, next_tokens: torch.Tensor):
        return positions  # the teacher runs in `losses`: its KD rows are these positions

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        with torch.no_grad():
            teacher_hidden = final_hidden(self.body, inputs)
        weights = (1 - alpha, alpha)
        if kd_batch is None:
            return fused_online_lm_kd_loss(
                hidden, weight, teacher_hidden, self.weight, targets, self.kd_cfg, mask, weights=weights
            )
        # the teacher's distribution at the chosen positions only (LM + KD there); elsewhere the data's
        # next token is the KD target, so both terms are the NLL: one LM pass at full weight (disjoint rows)
        chosen, rest = mask & kd_batch, mask & ~kd_batch
        lm_sum, kd_sum, lm_pp, kd_pp = fused_online_lm_kd_loss(
            hidden, weight, teacher_hidden, self.weight, targets, self.kd_cfg, chosen, weights=weights
        )
        rest_sum, rest_rows = fused_lm_loss(hidden[rest], weight, targets[rest], self.chunk_size)
        rest_pp = torch.zeros_like(lm_pp).masked_scatter(rest, rest_rows.to(lm_pp.dtype))
        # (1 − α)·(Σ LM + rest) + α·(Σ KD + rest): the rest at weight 1, its gradient once (one autograd node)
        return lm_sum + rest_sum, kd_sum + rest_sum, lm_pp + rest_pp, kd_pp + rest_pp


class MiniLLM(OnlineTeacher):
    """MiniLLM (Gu et al. 2024) as MiniPLM adapts it to pre-training, in its simplest faithful form:
    the student continues each instance's first `prefix_len` tokens by sampling (temperature 1,
    full vocabulary), and L_kd is the reverse KL KL(q_S ‖ p_T) over the full vocabulary at every
    generated position, with gradient through q_S — MiniLLM's single-step term of the policy
    gradient. Simplifications (stated in docs/train.md): no long-horizon reward term, no
    teacher-mixed sampling, no length normalisation. Samples are seeded by (seed, instance ids), so a
    run is deterministic and resumes exactly. Instances with ≤ prefix_len tokens get no KD term.
    """

    def __init__(
        self,
        spec: str,
        store: TokenStore,
        kd_cfg: KDConfig,
        device,
        chunk_size: int,
        student,
        seed: int,
        prefix_len: int,
    ):
        if kd_cfg.loss != "rkl":
            raise PredistillError(f"MiniLLM optimises the reverse KL; use --kd-loss rkl (got {kd_cfg.loss})")
        super().__init__(spec, store, kd_cfg, device, chunk_size)
        self.student = student
        self.seed = seed
        self.prefix_len = prefix_len
        student_fpt = forward_flops_per_token(student, store.vocab_size)
        # ids the student's head has rows for but the tokenizer does not (padding): never sampled
        rows = student.get_output_embeddings().weight.shape[0]
        self.suppress = list(range(store.vocab_size, rows)) or None
        # per trained corpus token: the student samples the continuation (≈ 2·N_s per generated
        # token, upper bound: every token), then trains on the sample (6·N_s) which the teacher
        # scores (2·N_t). The corpus LM loss's 6·N_s is counted by train itself.
        self.flops_per_token = student_fpt + 3 * student_fpt + self.flops_per_token

    @torch.no_grad()
    def batch(self, ids, inputs: torch.Tensor):
        lengths = torch.as_tensor(self.lengths[np.asarray(ids)])
        keep = lengths > self.prefix_len + 1
        if not keep.any():
            return None
        prompts = inputs[keep][:, : self.prefix_len]
        new_tokens = min(int(lengths[keep].max()), inputs.shape[1] + 1) - self.prefix_len
        was_training = self.student.training
        self.student.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, *map(int, ids))) % (1 << 63))
            samples = self.student.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.eos_id,
                suppress_tokens=self.suppress,
                use_model_defaults=False,
            )
        self.student.train(was_training)
        return samples

    def losses(self, hidden, weight, inputs, targets, mask, kd_batch, alpha):
        _, lm_pp = lm_loss(hidden, weight, targets, mask, self.chunk_size)
        if kd_batch is None:
            return lm_pp.sum(), lm_pp.new_zeros(()), lm_pp, lm_pp.new_zeros(())
        body = model_body(self.student)
        sample_hidden = final_hidden(body, kd_batch[:, :-1])
        with torch.no_grad():
            teacher_hidden = final_hidden(self.body, kd_batch[:, :-1])
        generated = torch.zeros(kd_batch[:, :-1].shape, dtype=torch.bool, device=kd_batch.device)
        generated[:, self.prefix_len - 1 :] = True  # positions whose next token the student sampled
        # the corpus LM term and the KD term on the samples are two passes over different rows
        _, kd_sum, _, kd_pp = fused_online_lm_kd_loss(
            sample_hidden, weight, teacher_hidden, self.weight, None, self.kd_cfg, generated, weights=(0.0, 1.0)
        )
        return lm_pp.sum(), kd_sum, lm_pp, kd_pp
