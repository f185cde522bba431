"""Learning-rate and KD-weight (α) schedules, as functions of the optimizer step.

`step` counts updates from 0 to `total - 1`. LR schedules:
- `cosine` (MiniPLM): linear warmup over `warmup` steps to `lr`, then cosine to `lr·min_ratio` at
  the last step;
- `wsd` (PD, MiniCPM's warmup-stable-decay): linear warmup over the first `warmup_ratio` of steps,
  stable at `lr`, cosine decay to `lr·min_ratio` over the last `decay_ratio`;
- `constant`: linear warmup over `warmup` steps, then `lr`.

α schedules (PD §3.3; `alpha` is the maximum):
- `constant`: α; `linear-inc`: 0 → α; `linear-dec`: α → 0 (linear over the run);
- `period`: α on every fourth batch (steps 3, 7, 11, …), else 0;
- `wsd`: linear 0 → α over the warmup ratio, α, cosine α → 0 over the decay ratio;
- `wsd-beta`: the WSD shape applied to the LM-loss weight instead: α·(1 − shape).
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("cosine", "wsd", "constant")
ALPHA_SCHEDULES = ("constant", "linear-inc", "linear-dec", "period", "wsd", "wsd-beta")


def _phase_steps(total: int, ratio: float) -> int:
    return max(1, round(ratio * total)) if ratio > 0 else 0


def _cosine(progress: float) -> float:
    """1 → 0 as progress goes 0 → 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def wsd_shape(step: int, total: int, warmup_ratio: float, decay_ratio: float, warmup_from_zero: bool) -> float:
    """Warmup-stable-decay in [0, 1]. LR warmup starts at 1/W (no wasted zero-LR step); α's at 0."""
    warmup, decay = _phase_steps(total, warmup_ratio), _phase_steps(total, decay_ratio)
    if step < warmup:
        return step / warmup if warmup_from_zero else (step + 1) / warmup
    decay_start = total - decay
    if step >= decay_start and decay:
        return _cosine((step - decay_start + 1) / decay)
    return 1.0


def lr_at(
    schedule: str,
    step: int,
    total: int,
    lr: float,
    *,
    warmup: int = 0,
    min_ratio: float = 0.1,
    warmup_ratio: float = 0.1,
    decay_ratio: float = 0.01,
) -> float:
    if schedule == "wsd":
        shape = wsd_shape(step, total, warmup_ratio, decay_ratio, warmup_from_zero=False)
        if step < _phase_steps(total, warmup_ratio):
            return lr * shape
        return lr * (min_ratio + (1 - min_ratio) * shape)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(total - 1 - warmup, 1)
        return lr * (min_ratio + (1 - min_ratio) * _cosine((step - warmup) / span))
    raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")


def alpha_at(
    schedule: str, step: int, total: int, alpha: float, *, warmup_ratio: float = 0.1, decay_ratio: float = 0.01
) -> float:
    progress = step / max(total - 1, 1)
    if schedule == "constant":
        return alpha
    if schedule == "linear-inc":
        return alpha * progress
    if schedule == "linear-dec":
        return alpha * (1.0 - progress)
    if schedule == "period":
        return alpha if step % 4 == 3 else 0.0
    if schedule in ("wsd", "wsd-beta"):
        shape = wsd_shape(step, total, warmup_ratio, decay_ratio, warmup_from_zero=True)
        return alpha * shape if schedule == "wsd" else alpha * (1.0 - shape)
    raise ValueError(f"unknown alpha schedule {schedule!r}; known: {', '.join(ALPHA_SCHEDULES)}")
