"""Knowledge-distillation losses and temperatures (PD, arXiv 2410.16215 §2, §3.2–3.3, A.2).

The training objective is `L = (1 − α)·L_lm + α·L_kd` (composed in train; α schedules live in
predistill.training.schedules). This module provides L_kd per position and its mean.

Teacher distribution
--------------------
`F(z) = softmax(Truncate(z)/τ)` over the teacher's retained entries, renormalised over them
(softmax is shift-invariant, so the stored full-vocabulary log-probs divided by τ serve as logits).
As in the paper (Eq. 3–4) the temperature is applied to the *teacher only*; the student's
distribution is its plain softmax — except for NormKD, which scales both (see below).

Student side: log q_S at the retained ids, normalised with the log-sum-exp over the FULL vocabulary
(`predistill.training.losses.gather_logprobs`, chunked, memory-light backward): the [tokens × vocab] logits
are never materialised.

Dropped tail mass (`tail`): a truncated teacher leaves out the rest of the vocabulary, and the
student's mass there is always counted, as one extra category (1 − Σ q_S over the entries, exact,
from the full vocabulary), so that every loss below is a divergence between two distributions over
the K entries + that category: ≥ 0, 0 exactly when the student equals the target, which is its
minimiser over the student's logits (tests/test_kd_properties.py).
- `drop`: the target F is the teacher renormalised over its entries: its mass on the extra category
  is 0 (for rkl, which divides by it, floored at TAIL_FLOOR). nll and kld are unchanged by the
  extra category (teacher weight 0); rkl, jsd, tvd and mse see the student's dropped mass.
- `bucket`: the extra category holds the teacher's own dropped mass 1 − Σ p_T (from its
  full-vocabulary log-probs, floored at TAIL_FLOOR so that rkl stays finite when the entries carry
  all the mass). The temperature is applied to the K+1 categories' log-probs (the tail's mass at
  τ ≠ 1 is not known from a truncated teacher; this treats the tail as one token).
Sampled entries (RS-KD) carry weights that sum to 1, so their tail is empty and both modes agree
up to the floor. An online teacher has the full vocabulary: nothing is dropped, `tail` does not apply.

Losses (per position; F, log F teacher; q, log q student; sums over the retained ids [+ bucket]):
- `nll`: −Σ F log q (the paper's NLL; PD's preliminary experiment)
- `kld`: Σ F (log F − log q), forward KL (PD*'s choice; same gradient as nll)
- `rkl`: Σ q (log q − log F), reverse KL
- `jsd`: β·KL(F‖M) + (1−β)·KL(q‖M), M = β·F + (1−β)·q, generalised JSD (TRL's convention), 0 < β < 1
- `tvd`: ½ Σ |F − q|, total variation
- `mse`: Σ (F − q)², squared error between teacher and student *probabilities* on the retained
  ids (+ bucket); probabilities, not logits, because the store keeps normalised log-probs of a few
  ids only, and a student's logits have a free shift.
- `uld`: Universal Logit Distillation (Boizard et al. 2024), Σ_k |p_(k) − q_(k)| + |p_rest − q_rest|
  over the teacher's retained probabilities sorted descending and the student's K largest; no ids,
  so no shared vocabulary (`fused_lm_uld_loss`, its own pass: it needs the student's largest).

Temperatures (`temperature_mode`; all computed on the truncated teacher entries, as A.2 says, and
without gradient):
- `static`: τ = `temperature`.
- `normkd` (Chi et al. 2023): τ_i = T_norm · std(teacher's retained log-probs of position i), applied
  to the teacher *and* the student (the student's full-vocabulary softmax at τ_i), loss × τ_i²
  (the usual KD gradient-scale correction). T_norm = 1.0.
- `wttm` (Zheng & Yang 2024): teacher power transform p^γ (= softmax(γ·z), i.e. τ = 1/γ) matched
  by the *untempered* student, loss × β·U_γ(p) with U_γ(p) = Σ_retained p_j^γ, p the retained
  teacher distribution at τ = 1 (the sample-adaptive weight of the reference code). γ = 0.1, β = 1.0.
- `adakd-sd`: τ_i = std of the retained log-probs (population std; teacher only).
- `adakd-h`: τ_i = τ_max − (τ_max − τ_min)·H_i/H_max (PD Eq. 5), H_i the entropy (nats) of the
  retained, renormalised teacher distribution, clipped to [τ_min, τ_max]; τ_max 2.0, τ_min 0.1,
  H_max 4.8 (teacher only).
Adaptive τ are floored at TAU_FLOOR (a position with one entry has std 0). On sampled entries the
statistics are taken on log(weights).

Online / Vanilla KD
-------------------
`online_kd_loss` takes both models' final hidden states and lm heads and computes the same losses
over the full vocabulary, one chunk of rows at a time with the gradient computed in the forward
pass (`fused_online_lm_kd_loss` also takes the LM loss in the same pass). MiniPLM's Vanilla KD is
`KDConfig(loss="nll")` with τ = 1: −Σ_V p_T log q_S. Temperatures apply with the statistics taken
over the full vocabulary; `tail` does not apply. For a *truncated* online teacher, build targets
with `predistill.formats.logits.teacher_targets(teacher_hidden, teacher_weight, logits_cfg)` and call
`kd_loss`.

Use in a training loop (per micro-batch; student hidden [B, L, H], lm head weight [V, H], token
store instance ids and lengths; inputs tokens[:, :L], targets tokens[:, 1:L+1])::

    targets = logits_store.read_batch(instance_ids, L)          # TeacherTargets [B, L, K]
    position_mask = torch.arange(L)[None, :] < (lengths - 1)[:, None]
    lm_mean, kd_mean, _, _ = lm_kd_loss(hidden, lm_head.weight, next_tokens, targets, kd_cfg, position_mask)
    loss = (1 - alpha) * lm_mean + alpha * kd_mean

`lm_kd_loss` shares one vocabulary projection between the LM loss and KD (an offline-KD step then
costs about an LM-only step); `kd_loss` alone gives the same KD value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from predistill.core.artifacts import PredistillError
from predistill.core.config import Effect, option
from predistill.formats.logits import TeacherTargets
from predistill.text.crosstok import VOCAB_MAPS
from predistill.training.losses import (
    DEFAULT_CHUNK,
    common_scale,
    fused_head_pass,
    gather_logprobs,
    gathered,
    honour_grad_mode,
    scaled_gradients,
)

# the names of KD_LOSSES in CLI order, and ULD (its own pass: it needs the student's largest probabilities)
LOSSES = ("nll", "kld", "mse", "rkl", "jsd", "tvd", "uld")
TEMPERATURE_MODES = ("static", "normkd", "wttm", "adakd-sd", "adakd-h")
TAILS = ("drop", "bucket")
TAU_FLOOR = 1e-4  # adaptive temperatures never go below this (one entry: std 0)
TAIL_FLOOR = 1e-8  # tail-bucket mass floor (keeps log of an empty tail finite)


def _parse_temperature(text: str) -> float | str:
    """A number (static τ) or the name of an adaptive mode."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclass
class KDConfig:
    """The distillation loss and its temperature (saved in a run's config; `train`'s KD flags)."""

    loss: str = option("kld", "KD loss", key="kd_loss", choices=LOSSES)
    # `--temperature normkd` is shorthand for `--temperature-mode normkd` (see __post_init__)
    temperature: float = option(
        1.0,
        "teacher temperature τ: a number (static), or normkd, wttm, adakd-sd, adakd-h "
        "(adaptive); given as text it sets the mode too",
        type=str,
        interval="(0, inf)",
    )
    temperature_mode: str = option("static", "static τ or an adaptive mode", choices=TEMPERATURE_MODES)
    tail: str = option(
        "drop",
        "mass a truncated teacher dropped: drop (renormalise) or bucket (one extra class)",
        key="kd_tail",
        choices=TAILS,
    )
    jsd_beta: float = option(0.5, "β of the generalised JSD loss", interval="[0, 1]")
    normkd_t: float = option(1.0, "NormKD: τ = normkd-t × the std of the teacher logits", interval="(0, inf)")
    wttm_gamma: float = option(0.1, "WTTM: power γ of the transformed teacher p^γ", interval="(0, inf)")
    wttm_beta: float = option(1.0, "WTTM: weight β of the per-position loss weight", interval="[0, inf)")
    adakd_tau_max: float = option(2.0, "AdaKD: largest τ (hardest positions)", interval="(0, inf)")
    adakd_tau_min: float = option(0.1, "AdaKD: smallest τ", interval="(0, inf)")
    adakd_h_max: float = option(4.8, "AdaKD-H: teacher entropy that maps to τ_max", interval="(0, inf)")
    vocab_map: str = option(
        "first",
        "teacher with another tokenizer: a teacher token the student lacks goes to the "
        "student token its tokenizer reads first in it (first), to the longest student token "
        "that starts it (prefix), or to the tail (exact); see crosstok",
        key="kd_vocab_map",
        choices=VOCAB_MAPS,
    )
    # rows per vocabulary pass offline (≈2 [rows × V] fp32 temporaries); train sets it from --loss-chunk
    chunk_size: int = option(DEFAULT_CHUNK, cli=False)
    online_chunk_size: int = option(
        256,
        "online KD: rows per vocabulary pass (≈6 [rows × V] temporaries)",
        key="kd_online_chunk",
        interval="[1, inf)",
        effect=Effect.ROUNDING,
    )

    def __post_init__(self):
        # `--temperature` as text (the CLI's, recipes' and old configs' form) decides the mode: a
        # number is a static τ — also over a config file's adaptive mode — a name an adaptive mode
        if isinstance(self.temperature, str):
            value = _parse_temperature(self.temperature)
            if isinstance(value, float):
                self.temperature, self.temperature_mode = value, "static"
            else:
                self.temperature_mode, self.temperature = value, 1.0

    @classmethod
    def from_temperature(cls, temperature: str | float, **kwargs) -> KDConfig:
        """A validated config from `--temperature` as the CLI takes it (a number or a mode name)."""
        # the dataclass __init__ is typed from the field (float); __post_init__ turns text into τ and mode
        return cls(temperature=temperature, **kwargs).validate()  # type: ignore[arg-type]

    def validate(self) -> KDConfig:
        if self.loss not in LOSSES:
            raise PredistillError(f"--kd-loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise PredistillError(
                f"temperature mode must be one of {', '.join(TEMPERATURE_MODES)}, got {self.temperature_mode!r}"
            )
        if self.loss == "uld" and (self.temperature_mode != "static" or self.temperature != 1.0):
            raise PredistillError("--kd-loss uld compares probabilities at τ = 1; drop --temperature")
        if self.vocab_map not in VOCAB_MAPS:
            raise PredistillError(f"--kd-vocab-map must be one of {', '.join(VOCAB_MAPS)}, got {self.vocab_map!r}")
        if self.tail not in TAILS:
            raise PredistillError(f"tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if not self.temperature > 0:
            raise PredistillError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.jsd_beta < 1:
            raise PredistillError(f"jsd beta must be in (0, 1), got {self.jsd_beta}")
        if not (
            self.normkd_t > 0
            and self.wttm_gamma > 0
            and 0 < self.adakd_tau_min <= self.adakd_tau_max
            and self.adakd_h_max > 0
        ):
            raise PredistillError("adaptive temperature hyper-parameters must be positive (and τ_min ≤ τ_max)")
        if self.chunk_size < 1 or self.online_chunk_size < 1:
            raise PredistillError(f"chunk sizes must be ≥ 1, got {self.chunk_size} and {self.online_chunk_size}")
        return self


# ------------------------------------------------------------------------------------------------
# temperatures
# ------------------------------------------------------------------------------------------------
def _masked_log_softmax(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax over the masked-in entries; masked-out entries get 0 (never −inf: no NaN grads)."""
    if mask is None:
        return torch.log_softmax(x, dim=-1)
    return torch.log_softmax(x.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)


def _masked_std(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.std(dim=-1, unbiased=False)
    m = mask.to(x.dtype)
    count = m.sum(-1).clamp(min=1)
    mean = (x * m).sum(-1) / count
    return (((x - mean[:, None]) ** 2) * m).sum(-1).div(count).sqrt()


@torch.no_grad()
def teacher_temperature(t_logits: torch.Tensor, mask: torch.Tensor | None, cfg: KDConfig) -> torch.Tensor:
    """Per-row τ [N] from the teacher's retained logits/log-probs [N, K] (see module doc)."""
    x = t_logits.to(torch.promote_types(t_logits.dtype, torch.float32))
    mode = cfg.temperature_mode
    if mode == "static":
        return torch.full(x.shape[:1], cfg.temperature, dtype=x.dtype, device=x.device)
    if mode == "wttm":
        return torch.full(x.shape[:1], 1.0 / cfg.wttm_gamma, dtype=x.dtype, device=x.device)
    if mode in ("normkd", "adakd-sd"):
        scale = cfg.normkd_t if mode == "normkd" else 1.0
        return (scale * _masked_std(x, mask)).clamp(min=TAU_FLOOR)
    log_p = _masked_log_softmax(x, mask)  # adakd-h
    entropy = -(log_p.exp() * log_p).sum(-1)
    tau = cfg.adakd_tau_max - (cfg.adakd_tau_max - cfg.adakd_tau_min) * entropy / cfg.adakd_h_max
    return tau.clamp(cfg.adakd_tau_min, cfg.adakd_tau_max)


@torch.no_grad()
def loss_weight(
    t_logits: torch.Tensor, mask: torch.Tensor | None, tau: torch.Tensor, cfg: KDConfig
) -> torch.Tensor | None:
    """Per-row factor on the loss: τ² for NormKD, β·Σ p^γ for WTTM, else None."""
    if cfg.temperature_mode == "normkd":
        return tau**2
    if cfg.temperature_mode == "wttm":
        x = t_logits.to(torch.promote_types(t_logits.dtype, torch.float32))
        p_gamma = (cfg.wttm_gamma * _masked_log_softmax(x, mask)).exp()
        if mask is not None:
            p_gamma = p_gamma * mask
        return cfg.wttm_beta * p_gamma.sum(-1)
    return None


# ------------------------------------------------------------------------------------------------
# the losses on [rows, entries]
# ------------------------------------------------------------------------------------------------
# The registry: name → per-row loss from the teacher distribution F (f = F, log_f = log F), the
# student's log-probs s at the same entries, and the entry mask m (1.0 when all entries count).
# A new loss is one function here, one name in KD_LOSSES, and its test (`--kd-loss` choices
# come from this table).


def _nll(f, log_f, s, m, cfg):
    return -(f * s).sum(-1)


def _kld(f, log_f, s, m, cfg):
    return (f * (log_f - s)).sum(-1)


def _rkl(f, log_f, s, m, cfg):
    return (m * s.exp() * (s - log_f)).sum(-1)


def _jsd(f, log_f, s, m, cfg):
    beta = cfg.jsd_beta
    log_mix = torch.logaddexp(
        log_f + torch.log(torch.tensor(beta, dtype=s.dtype)), s + torch.log(torch.tensor(1 - beta, dtype=s.dtype))
    )
    return beta * (f * (log_f - log_mix)).sum(-1) + (1 - beta) * (m * s.exp() * (s - log_mix)).sum(-1)


def _tvd(f, log_f, s, m, cfg):
    return 0.5 * (m * (f - s.exp()).abs()).sum(-1)


def _mse(f, log_f, s, m, cfg):
    return (m * (f - s.exp()) ** 2).sum(-1)


KD_LOSSES = {"nll": _nll, "kld": _kld, "mse": _mse, "rkl": _rkl, "jsd": _jsd, "tvd": _tvd}


def kd_terms(
    s_logq: torch.Tensor,
    t_logits: torch.Tensor,
    mask: torch.Tensor | None,
    tau: torch.Tensor,
    cfg: KDConfig,
    bucket: bool = False,
) -> torch.Tensor:
    """Per-row loss [N] from student log-probs at the entries [N, K] (full-vocabulary normalised)
    and the teacher's log-probs (or logits, without `bucket`) [N, K] masked by `mask`.

    `tau` [N] is the teacher's temperature; the caller applies the student's (NormKD) when it
    computes `s_logq`. Rows must have at least one masked-in entry.
    """
    acc = torch.promote_types(s_logq.dtype, torch.float32)
    s = s_logq.to(acc)
    t = t_logits.to(acc)
    if mask is None:  # the full vocabulary: nothing dropped
        with torch.no_grad():
            log_f = torch.log_softmax(t / tau[:, None].to(acc), dim=-1)
            f = log_f.exp()
        m: float | torch.Tensor = 1.0
    else:
        with torch.no_grad():
            if bucket:  # the teacher's dropped mass is one more category, tempered with the others
                t_tail = (1 - (t.exp() * mask).sum(-1)).clamp(min=TAIL_FLOOR)
                log_f = _masked_log_softmax(
                    torch.cat([t, t_tail.log()[:, None]], dim=-1) / tau[:, None].to(acc),
                    torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1),
                )
                f = log_f.exp()
            else:  # drop: renormalised over the entries, nothing on the extra category
                log_f = torch.cat(
                    [
                        _masked_log_softmax(t / tau[:, None].to(acc), mask),
                        torch.full_like(t[:, :1], math.log(TAIL_FLOOR)),
                    ],
                    dim=-1,
                )
                f = torch.cat([log_f[:, :-1].exp(), torch.zeros_like(t[:, :1])], dim=-1)
        # the student's mass outside the entries, log(1 − Σ q), exact to fp32
        s_lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
        s = torch.cat([s, torch.log(-torch.expm1(s_lse.clamp(max=-TAIL_FLOOR)))[:, None]], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        f = f * mask
        m = mask.to(acc)
    if cfg.loss not in KD_LOSSES:
        raise PredistillError(f"unknown kd loss {cfg.loss!r}; known: {', '.join(LOSSES)}")
    return KD_LOSSES[cfg.loss](f, log_f, s, m, cfg)


def _flat_rows(position_mask: torch.Tensor | None, lead: torch.Size, device) -> torch.Tensor:
    if position_mask is None:
        return torch.ones(lead.numel(), dtype=torch.bool, device=device)
    if position_mask.shape != lead:
        raise PredistillError(f"position mask has shape {tuple(position_mask.shape)}, expected {tuple(lead)}")
    return position_mask.reshape(-1).bool()


def kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: TeacherTargets,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline KD: (mean over distilled positions, per-position loss [...]).

    hidden [..., H] (student final hidden states), weight [V, H] (student lm head), targets with
    tensors [..., K] (e.g. LogitsStore.read_batch), position_mask [...] (True where the position is
    a real one). Positions without a retained entry count as not distilled (loss 0, not in the mean).
    """
    lead = targets.mask.shape[:-1]
    if hidden.shape[:-1] != lead:
        raise PredistillError(
            f"student hidden states {tuple(hidden.shape)} do not match teacher targets "
            f"{tuple(targets.mask.shape)} (positions must align)"
        )
    ids, lps, mask = (
        x.reshape(lead.numel(), -1).to(hidden.device) for x in (targets.ids, targets.logprobs, targets.mask)
    )
    if mask.any() and int(ids[mask].max()) >= weight.shape[0]:
        raise PredistillError(
            f"teacher entry ids reach {int(ids[mask].max())} but the student's vocabulary has "
            f"{weight.shape[0]} rows: teacher and student must share a vocabulary"
        )
    rows = torch.nonzero(_flat_rows(position_mask, lead, hidden.device) & mask.any(-1)).flatten()
    acc = torch.promote_types(hidden.dtype, torch.float32)
    per_position = torch.zeros(lead.numel(), dtype=acc, device=hidden.device)
    if len(rows) == 0:
        return per_position.sum() * 0 + hidden.sum() * 0, per_position.view(lead)
    ids, lps, mask = ids[rows], lps[rows], mask[rows]
    tau = teacher_temperature(lps, mask, cfg)
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    if cfg.temperature_mode == "normkd":
        h = h / tau[:, None].to(h.dtype)  # (h/τ)·Wᵀ = z/τ: the student's full-vocabulary softmax at τ
    s_logq = gather_logprobs(h, weight, ids, cfg.chunk_size)
    per_row = kd_terms(s_logq, lps, mask, tau, cfg, bucket=cfg.tail == "bucket")
    factor = loss_weight(lps, mask, tau, cfg)
    if factor is not None:
        per_row = per_row * factor
    per_position = per_position.index_put((rows,), per_row)
    return per_row.sum() / len(rows), per_position.view(lead)


def _same_positions(hidden, next_tokens, targets: TeacherTargets) -> torch.Size:
    lead = next_tokens.shape
    if targets.mask.shape[:-1] != lead or hidden.shape[:-1] != lead:
        raise PredistillError(
            f"student hidden {tuple(hidden.shape)}, next tokens {tuple(lead)} and teacher targets "
            f"{tuple(targets.mask.shape)} must cover the same positions"
        )
    return lead


def _lm_kd_rows(hidden, weight, next_tokens, targets: TeacherTargets, position_mask):
    """After the checks that the student, the next tokens and the teacher cover the same positions
    and share a vocabulary: the rows to compute, their ids [rows, 1 + K] (next token, then the
    teacher's entries), the entries' log-probs and mask [rows, K], and a zero per-position buffer."""
    lead = _same_positions(hidden, next_tokens, targets)
    ids, lps, mask = (
        x.reshape(lead.numel(), -1).to(hidden.device) for x in (targets.ids, targets.logprobs, targets.mask)
    )
    if mask.any() and int(ids[mask].max()) >= weight.shape[0]:
        raise PredistillError(
            f"teacher entry ids reach {int(ids[mask].max())} but the student's vocabulary has "
            f"{weight.shape[0]} rows: teacher and student must share a vocabulary"
        )
    rows = torch.nonzero(_flat_rows(position_mask, lead, hidden.device)).flatten()
    both = torch.cat([next_tokens.reshape(-1, 1)[rows].to(ids.dtype), ids[rows]], dim=1)
    zeros = torch.zeros(lead.numel(), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    return rows, both, lps[rows], mask[rows], zeros


def lm_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    next_tokens: torch.Tensor,
    targets: TeacherTargets,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM loss and offline KD in one pass over the vocabulary: (lm_mean, kd_mean, lm_per_position,
    kd_per_position).

    The next token and the teacher's ids are gathered together ([N, 1+K]), so the student's logits
    are computed once per chunk (and once more in backward) instead of twice: an offline-KD step
    costs about what an LM-only step does. lm_mean is the mean next-token NLL over `position_mask`
    (as losses.lm_loss); kd_mean/kd_per_position are exactly kd_loss's. NormKD tempers the student's
    logits, so it takes two passes.
    """
    lead = next_tokens.shape
    if cfg.temperature_mode == "normkd":
        from predistill.training.losses import lm_loss

        keep = torch.ones(lead, dtype=torch.bool, device=hidden.device) if position_mask is None else position_mask
        lm_mean, lm_per_position = lm_loss(hidden, weight, next_tokens, keep, cfg.chunk_size)
        kd_mean, kd_per_position = kd_loss(hidden, weight, targets, cfg, position_mask)
        return lm_mean, kd_mean, lm_per_position, kd_per_position
    rows, both, lps, mask, zeros = _lm_kd_rows(hidden, weight, next_tokens, targets, position_mask)
    lm_per_position = kd_per_position = zeros
    if len(rows) == 0:
        zero = hidden.sum() * 0
        return zero, zero, zeros.view(lead), zeros.view(lead)
    logq = gather_logprobs(hidden.reshape(-1, hidden.shape[-1])[rows], weight, both, cfg.chunk_size)
    nll = -logq[:, 0]
    lm_per_position = lm_per_position.index_put((rows,), nll)
    distilled = mask.any(-1)
    kd_rows = rows[distilled]
    kd_mean = hidden.sum() * 0
    if len(kd_rows):
        lps_k, mask_k = lps[distilled], mask[distilled]
        tau = teacher_temperature(lps_k, mask_k, cfg)
        per_row = kd_terms(logq[distilled, 1:], lps_k, mask_k, tau, cfg, bucket=cfg.tail == "bucket")
        factor = loss_weight(lps_k, mask_k, tau, cfg)
        if factor is not None:
            per_row = per_row * factor
        kd_per_position = kd_per_position.index_put((kd_rows,), per_row)
        kd_mean = per_row.sum() / len(kd_rows)
    return nll.sum() / len(rows), kd_mean, lm_per_position.view(lead), kd_per_position.view(lead)


def _two_sums(ctx, lm_rows: torch.Tensor, kd_rows: torch.Tensor, w_lm: float, w_kd: float):
    """A fused LM+KD loss's outputs: the two sums (their gradient, computed in the forward, is on
    `ctx`; backward scales it by the sums' common weight) and the per-row values (no gradient)."""
    ctx.weights = (w_lm, w_kd)
    ctx.mark_non_differentiable(lm_rows, kd_rows)
    return lm_rows.sum(), kd_rows.sum(), lm_rows, kd_rows


class _FusedLMKD(torch.autograd.Function):
    """(Σ NLL, Σ KD) over rows with the gradient of w_lm·Σ NLL + w_kd·Σ KD computed in the forward
    pass, chunk by chunk: logits → lse → log-probs at [next token, teacher ids] → per-row LM and KD
    losses (their gradient by autograd on the [rows, 1+K] gathered values only) → G → d(logits) =
    scatter(G) − softmax·ΣG → d(hidden), d(weight) (`losses.fused_head_pass`). One logits matmul and
    two gradient matmuls per chunk, as for the LM loss alone. Backward scales the stored gradient by the common factor of the
    incoming (g_lm, g_kd), which must weigh the sums as (w_lm, w_kd) did (train's α schedule does)."""

    @staticmethod
    def forward(ctx, hidden, weight, both, lps, mask, distilled, cfg, chunk_size, w_lm, w_kd):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lm_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        kd_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)

        def chunk_loss(rows, logq, need_grad):
            logq = logq.detach().requires_grad_()
            kd_here = distilled[rows]
            with torch.enable_grad():  # (Function.forward runs without grad)
                lm = -logq[:, 0]
                total = w_lm * lm.sum()
                kd = torch.zeros_like(lm)
                if kd_here.any():
                    lps_k, mask_k = lps[rows][kd_here], mask[rows][kd_here]
                    tau = teacher_temperature(lps_k, mask_k, cfg)
                    per_row = kd_terms(logq[kd_here, 1:], lps_k, mask_k, tau, cfg, bucket=cfg.tail == "bucket")
                    factor = loss_weight(lps_k, mask_k, tau, cfg)
                    per_row = per_row * factor if factor is not None else per_row
                    kd = kd.index_put((torch.nonzero(kd_here).flatten(),), per_row)
                    total = total + w_kd * per_row.sum()
                g = torch.autograd.grad(total, logq)[0] if need_grad else None
            lm_rows[rows], kd_rows[rows] = lm.detach(), kd.detach()
            return g

        fused_head_pass(ctx, hidden, weight, chunk_size, gathered(both, chunk_loss))
        return _two_sums(ctx, lm_rows, kd_rows, w_lm, w_kd)

    @staticmethod
    def backward(ctx, g_lm, g_kd, _lm_rows, _kd_rows):
        scale = common_scale((g_lm, g_kd), ctx.weights, "fused_lm_kd_loss")
        return (*scaled_gradients(ctx, scale), None, None, None, None, None, None, None, None)


def fused_lm_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    next_tokens: torch.Tensor,
    targets: TeacherTargets,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
    weights: tuple[float, float] = (0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lm_kd_loss` as sums with the gradient computed in the forward pass: (Σ LM, Σ KD, LM per
    position, KD per position). The sums carry the gradient and must enter the loss in the ratio
    `weights` (train's (1 − α, α), times any common factor); the per-position values carry none.
    NormKD tempers the student's logits, so it takes `lm_kd_loss`'s path."""
    if cfg.temperature_mode == "normkd":
        lm_mean, kd_mean, lm_pp, kd_pp = lm_kd_loss(hidden, weight, next_tokens, targets, cfg, position_mask)
        return lm_pp.sum(), kd_pp.sum(), lm_pp.detach(), kd_pp.detach()
    lead = next_tokens.shape
    rows, both, lps, mask, zeros = _lm_kd_rows(hidden, weight, next_tokens, targets, position_mask)
    if len(rows) == 0:
        zero = hidden.sum() * 0
        return zero, zero, zeros.view(lead), zeros.view(lead)
    lm_sum, kd_sum, lm_rows, kd_rows = _FusedLMKD.apply(
        *honour_grad_mode(hidden.reshape(-1, hidden.shape[-1])[rows], weight),
        both,
        lps,
        mask,
        mask.any(-1),
        cfg,
        cfg.chunk_size,
        float(weights[0]),
        float(weights[1]),
    )
    return lm_sum, kd_sum, zeros.index_put((rows,), lm_rows).view(lead), zeros.index_put((rows,), kd_rows).view(lead)


# ------------------------------------------------------------------------------------------------
# Universal Logit Distillation: sorted probabilities, no shared vocabulary needed
# ------------------------------------------------------------------------------------------------
def uld_teacher(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher side of ULD from its entries' log-probs and mask [..., K]: the retained probabilities
    sorted in descending order (zeros past each position's entries) and the mass they leave out [...]
    (0 for sampled entries)."""
    probs = logprobs.exp() * mask
    return probs.sort(dim=-1, descending=True).values, (1 - probs.sum(-1)).clamp(min=0)


class _FusedLMULD(torch.autograd.Function):
    """(Σ NLL, Σ ULD) over rows, the gradient of w_lm·Σ NLL + w_kd·Σ ULD computed in the forward pass.
    Per chunk the student's K most probable ids are found (their order is the sorted order), then the
    log-probs at [next token, those ids] go through `losses.gathered` like any offline KD loss: the
    gradient of a sorted value is the gradient at the id that holds it."""

    @staticmethod
    def forward(ctx, hidden, weight, next_tokens, t_sorted, t_tail, t_count, chunk_size, w_lm, w_kd):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lm_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        kd_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        k = t_sorted.shape[1]
        both = torch.empty((hidden.shape[0], 1 + k), dtype=torch.long, device=hidden.device)
        both[:, 0] = next_tokens
        entry = torch.arange(k, device=hidden.device)[None, :]

        def chunk_loss(rows, logq, need_grad):
            logq = logq.detach().requires_grad_()
            with torch.enable_grad():  # (Function.forward runs without grad)
                lm = -logq[:, 0]
                inside = (entry < t_count[rows, None]).to(acc)
                q = logq[:, 1:].exp() * inside
                q_tail = (1 - q.sum(-1)).clamp(min=0)
                kd = (q - t_sorted[rows]).abs().mul(inside).sum(-1) + (q_tail - t_tail[rows]).abs()
                kd = kd * (t_count[rows] > 0)
                total = w_lm * lm.sum() + w_kd * kd.sum()
                g = torch.autograd.grad(total, logq)[0] if need_grad else None
            lm_rows[rows], kd_rows[rows] = lm.detach(), kd.detach()
            return g

        by_ids = gathered(both, chunk_loss)

        def chunk_grad(rows, logits, need_grad):
            both[rows, 1:] = logits.topk(k, dim=1).indices  # before `gathered` overwrites the logits
            return by_ids(rows, logits, need_grad)

        fused_head_pass(ctx, hidden, weight, chunk_size, chunk_grad)
        return _two_sums(ctx, lm_rows, kd_rows, w_lm, w_kd)

    @staticmethod
    def backward(ctx, g_lm, g_kd, _lm_rows, _kd_rows):
        scale = common_scale((g_lm, g_kd), ctx.weights, "fused_lm_uld_loss")
        return (*scaled_gradients(ctx, scale), None, None, None, None, None, None, None)


def fused_lm_uld_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    next_tokens: torch.Tensor,
    targets: TeacherTargets,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
    weights: tuple[float, float] = (0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM loss and Universal Logit Distillation (Boizard et al. 2024) in one pass over the vocabulary:
    (Σ LM, Σ ULD, LM per position, ULD per position), sums as in `fused_lm_kd_loss`.

    ULD compares distributions without a shared vocabulary: the teacher's retained probabilities in
    descending order against the student's K largest (K: the position's entries), plus the mass
    each leaves out as one class: Σ_k |p_(k) − q_(k)| + |p_rest − q_rest| (with sampled entries p_rest
    = 0, which is ULD's zero padding exactly). The teacher's ids are not used; it is taken at τ = 1
    (`KDConfig.validate` refuses another temperature)."""
    lead = _same_positions(hidden, next_tokens, targets)
    rows = torch.nonzero(_flat_rows(position_mask, lead, hidden.device)).flatten()
    zeros = torch.zeros(lead.numel(), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    if len(rows) == 0:
        zero = hidden.sum() * 0
        return zero, zero, zeros.view(lead), zeros.view(lead)
    lps, mask = (x.reshape(lead.numel(), -1).to(hidden.device)[rows] for x in (targets.logprobs, targets.mask))
    t_sorted, t_tail = uld_teacher(lps, mask)
    t_count = mask.sum(-1)
    k = max(1, min(int(t_count.max()), weight.shape[0]))
    lm_sum, kd_sum, lm_rows, kd_rows = _FusedLMULD.apply(
        *honour_grad_mode(hidden.reshape(-1, hidden.shape[-1])[rows], weight),
        next_tokens.reshape(-1)[rows],
        t_sorted[:, :k],
        t_tail,
        t_count.clamp(max=k),
        cfg.chunk_size,
        float(weights[0]),
        float(weights[1]),
    )
    return lm_sum, kd_sum, zeros.index_put((rows,), lm_rows).view(lead), zeros.index_put((rows,), kd_rows).view(lead)


# ------------------------------------------------------------------------------------------------
# online teacher, full vocabulary
# ------------------------------------------------------------------------------------------------
class _FusedOnline(torch.autograd.Function):
    """(Σ NLL, Σ KD) over rows against an online teacher's full-vocabulary distribution, the gradient
    of w_lm·Σ NLL + w_kd·Σ KD computed in the forward pass (`losses.fused_head_pass`): per chunk the
    teacher's logits (no gradient), the student's, the per-row losses with their gradient by autograd
    on the chunk's [rows, V] student logits, then d(hidden), d(weight). Nothing is recomputed in
    backward; peak memory is a few [chunk × V] fp32 tensors. `targets` None: KD only."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, cfg, chunk_size, w_lm, w_kd):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lm_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        kd_rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        teacher_weight = teacher_weight.to(acc)  # once, not per chunk

        def chunk_grad(rows, z, need_grad):
            z_t = teacher_hidden[rows].to(acc) @ teacher_weight.t()
            tau = teacher_temperature(z_t, None, cfg)
            factor = loss_weight(z_t, None, tau, cfg)
            z = z.detach().requires_grad_(need_grad)  # a leaf over the (reused) logits buffer
            with torch.enable_grad():  # (Function.forward runs without grad)
                log_q = torch.log_softmax(z, dim=-1)
                s = torch.log_softmax(z / tau[:, None], dim=-1) if cfg.temperature_mode == "normkd" else log_q
                kd = kd_terms(s, z_t, None, tau, cfg)
                kd = kd * factor if factor is not None else kd
                total = w_kd * kd.sum()
                if targets is not None:
                    lm = -log_q.gather(1, targets[rows, None])[:, 0]
                    total = total + w_lm * lm.sum()
                    lm_rows[rows] = lm.detach()
                kd_rows[rows] = kd.detach()
                return torch.autograd.grad(total, z)[0] if need_grad else None

        fused_head_pass(ctx, hidden, weight, chunk_size, chunk_grad)
        return _two_sums(ctx, lm_rows, kd_rows, w_lm, w_kd)

    @staticmethod
    def backward(ctx, g_lm, g_kd, _lm_rows, _kd_rows):
        scale = common_scale((g_lm, g_kd), ctx.weights, "fused_online_lm_kd_loss")
        return (*scaled_gradients(ctx, scale), None, None, None, None, None, None, None)


def _online_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, position_mask):
    lead = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead:
        raise PredistillError(
            f"teacher hidden states {tuple(teacher_hidden.shape)} do not match the student's "
            f"{tuple(student_hidden.shape)}"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise PredistillError(
            f"teacher vocabulary ({teacher_weight.shape[0]} rows) differs from the student's "
            f"({student_weight.shape[0]}): online KD needs one shared vocabulary"
        )
    rows = torch.nonzero(_flat_rows(position_mask, lead, student_hidden.device)).flatten()
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])[rows]
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[rows]
    return lead, rows, hs, ht


def fused_online_lm_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    next_tokens: torch.Tensor | None,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
    weights: tuple[float, float] = (0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online (Vanilla) KD over the full vocabulary, with the LM loss in the same pass: (Σ LM, Σ KD,
    LM per position, KD per position) over positions where `position_mask` is true.

    student_hidden [..., H_s], student_weight [V, H_s], teacher_hidden [..., H_t] (no gradient),
    teacher_weight [V, H_t], next_tokens [...] (None: no LM term, Σ LM is 0). The sums carry the
    gradient, computed in the forward pass, and must enter the loss in the ratio `weights` (times any
    common factor); the per-position values carry none.
    """
    lead, rows, hs, ht = _online_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, position_mask)
    targets = None if next_tokens is None else next_tokens.reshape(-1)[rows]
    w_lm = float(weights[0]) if targets is not None else 0.0
    hs, student_weight = honour_grad_mode(hs, student_weight)
    lm_sum, kd_sum, lm_rows, kd_rows = _FusedOnline.apply(
        hs, student_weight, ht, teacher_weight.detach(), targets, cfg, cfg.online_chunk_size, w_lm, float(weights[1])
    )
    acc = lm_rows.dtype
    lm_pp = torch.zeros(lead.numel(), dtype=acc, device=hs.device).index_put((rows,), lm_rows)
    kd_pp = torch.zeros(lead.numel(), dtype=acc, device=hs.device).index_put((rows,), kd_rows)
    return lm_sum, kd_sum, lm_pp.view(lead), kd_pp.view(lead)


def online_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    cfg: KDConfig,
    position_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online (Vanilla) KD over the full vocabulary: (mean over positions, per-position loss [...]);
    the mean carries the gradient (computed in the forward pass, `fused_online_lm_kd_loss`)."""
    _, kd_sum, _, kd_pp = fused_online_lm_kd_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, None, cfg, position_mask, weights=(0.0, 1.0)
    )
    n = int(_flat_rows(position_mask, kd_pp.shape, kd_pp.device).sum()) if position_mask is not None else kd_pp.numel()
    return kd_sum / max(n, 1), kd_pp
