"""Every KD loss is a divergence from the target it names, for every tail mode and temperature.

Not a restatement of the formulas: three properties any divergence has, checked on random teachers
through the public entry points (`kd_loss` for a truncated teacher, `online_kd_loss` for a full one),
with the student's logits as free parameters (hidden = logits, lm head = identity):
  1. it is ≥ 0 (nll, a cross-entropy, is ≥ the target's entropy);
  2. it is 0 (nll: the entropy) when the student's distribution is the target;
  3. minimising it over the student's logits reaches the target.
The target is written out here: `drop` renormalises the teacher over its retained entries (nothing on
the rest of the vocabulary); `bucket` keeps the teacher's dropped mass, as one category tempered with
the entries; an online teacher is its full softmax. Temperatures: static τ (the target at τ) and
AdaKD-H's per-position τ; NormKD and WTTM temper or weigh the student too, so their targets differ
and they are pinned against the written-out reference in test_kd.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from predistill.formats.logits import TeacherTargets
from predistill.training.kd import KD_LOSSES, KDConfig, kd_loss, online_kd_loss, teacher_temperature

V, K, ROWS = 10, 4, 5
TAILS = ("drop", "bucket")
CONFIGS = [dict(temperature=1.0), dict(temperature=2.0), dict(temperature_mode="adakd-h")]


def truncated_teacher(seed: int) -> TeacherTargets:
    """Each row keeps its 1..K most likely ids of a random full teacher (log-probs as stored)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(ROWS, V, generator=g) * 1.5, dim=-1)
    lps, ids = logp.topk(K, dim=-1)
    mask = torch.arange(K)[None, :] < torch.tensor([1, 2, 3, K, K])[:, None]
    return TeacherTargets(ids, lps.masked_fill(~mask, 0.0), mask)


def target_distribution(targets: TeacherTargets, cfg: KDConfig) -> torch.Tensor:
    """[ROWS, V] the distribution a student should match: written out, one row at a time."""
    tau = teacher_temperature(targets.logprobs, targets.mask, cfg)
    out = torch.zeros(ROWS, V, dtype=torch.float64)
    for r in range(ROWS):
        keep = targets.mask[r]
        ids, lp = targets.ids[r][keep], targets.logprobs[r][keep].double()
        if cfg.tail == "drop":
            out[r, ids] = torch.softmax(lp / tau[r].item(), 0)
            continue
        dropped = max(1 - lp.exp().sum().item(), 1e-8)
        p = torch.softmax(torch.cat([lp, torch.tensor([math.log(dropped)], dtype=torch.float64)]) / tau[r].item(), 0)
        rest = torch.ones(V, dtype=torch.bool)
        rest[ids] = False
        out[r, ids] = p[:-1]
        out[r, rest] = p[-1] / int(rest.sum())  # any split of the rest is the target: spread evenly
    return out


def offline(logits: torch.Tensor, targets: TeacherTargets, cfg: KDConfig) -> torch.Tensor:
    return kd_loss(logits, torch.eye(V, dtype=logits.dtype), targets, cfg)[1]  # per position


def categories(p: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """[ROWS, V + 1]: a distribution over the vocabulary as the losses see it, the retained entries
    and the rest of the vocabulary as one category."""
    kept = torch.zeros(ROWS, V, dtype=torch.bool).scatter(1, targets.ids, targets.mask)
    return torch.cat([p * kept, (p * ~kept).sum(-1, keepdim=True)], -1)


def floor(loss: str, target: torch.Tensor) -> torch.Tensor:
    """The loss's value at the target (as categories): 0, or its entropy for nll (a cross-entropy)."""
    if loss == "nll":
        return -(target * target.clamp(min=1e-300).log()).sum(-1)
    return torch.zeros(ROWS, dtype=torch.float64)


def as_logits(p: torch.Tensor) -> torch.Tensor:
    return p.clamp(min=1e-30).log()  # 1e-30: "no mass" to far below the losses' floors


def minimise(loss_of_logits) -> torch.Tensor:
    """The student's distribution after minimising a loss over free logits (from uniform; Adam with
    a decaying step, which also settles tvd's non-smooth minimum)."""
    z = torch.zeros(ROWS, V, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.2)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, 0.995)
    for _ in range(500):
        opt.zero_grad()
        loss_of_logits(z).sum().backward()
        opt.step()
        decay.step()
    return torch.softmax(z.detach(), -1)


def case(loss: str, tail: str, c: int):
    cfg = KDConfig(loss=loss, tail=tail, **CONFIGS[c]).validate()
    targets = truncated_teacher(seed=c)
    return cfg, targets, target_distribution(targets, cfg)


def online_case(loss: str, c: int):
    cfg = KDConfig(loss=loss, **CONFIGS[c]).validate()
    teacher = torch.randn(ROWS, V, generator=torch.Generator().manual_seed(c), dtype=torch.float64) * 1.5
    tau = teacher_temperature(teacher, None, cfg)
    eye = torch.eye(V, dtype=torch.float64)
    return (lambda z, part=1: online_kd_loss(z, eye, teacher, eye, cfg)[part]), torch.softmax(
        teacher / tau[:, None], -1
    )


def assert_floor_reached_only_at_target(
    loss_of_logits, target_categories: torch.Tensor, target: torch.Tensor, loss: str, seed: int
):
    low = floor(loss, target_categories)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(5):  # ≥ its floor at random students, and strictly above it
        value = loss_of_logits(torch.randn(ROWS, V, generator=g, dtype=torch.float64) * 2)
        assert (value >= low - 1e-9).all(), (value - low).min()
        assert (value > low + 1e-6).all()
    at_target = loss_of_logits(as_logits(target))  # the floor exactly at the target
    assert torch.allclose(at_target, low, atol=1e-6), (at_target - low).abs().max()


CASES = list(itertools.product(KD_LOSSES, TAILS, range(len(CONFIGS))))
ONLINE_CASES = list(itertools.product(KD_LOSSES, range(len(CONFIGS))))


@pytest.mark.parametrize("loss,tail,c", CASES)
def test_a_truncated_teachers_loss_is_at_least_its_floor_and_reaches_it_at_the_target(loss, tail, c):
    cfg, targets, target = case(loss, tail, c)
    assert_floor_reached_only_at_target(
        lambda z: offline(z, targets, cfg), categories(target, targets), target, loss, c
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss,tail,c", CASES)
def test_minimising_a_truncated_teachers_loss_reaches_the_target(loss, tail, c):
    cfg, targets, target = case(loss, tail, c)
    reached = categories(minimise(lambda z: offline(z, targets, cfg)), targets)  # the rest's split is free
    assert (reached - categories(target, targets)).abs().max() < 2e-2


@pytest.mark.parametrize("loss,c", ONLINE_CASES)
def test_an_online_teachers_loss_is_at_least_its_floor_and_reaches_it_at_its_softmax(loss, c):
    loss_of_logits, target = online_case(loss, c)
    assert_floor_reached_only_at_target(loss_of_logits, target, target, loss, c)


@pytest.mark.slow
@pytest.mark.parametrize("loss,c", ONLINE_CASES)
def test_minimising_an_online_teachers_loss_reaches_its_softmax(loss, c):
    loss_of_logits, target = online_case(loss, c)
    # the mean over positions carries the gradient (its per-position values are for reporting)
    assert (minimise(lambda z: loss_of_logits(z, part=0)) - target).abs().max() < 2e-2
