"""LR and α schedules, each pinned to its formula."""

import math

import pytest

from predistill.training.schedules import alpha_at, lr_at

TOTAL = 1000  # WSD: 100 warmup steps (10%), 10 decay steps (1%)


def cos_down(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_lr_warms_up_linearly_then_decays_to_a_tenth():
    assert lr_at("cosine", 0, TOTAL, 1.0, warmup=20) == pytest.approx(1 / 20)
    assert lr_at("cosine", 19, TOTAL, 1.0, warmup=20) == pytest.approx(1.0)
    mid = 20 + (TOTAL - 1 - 20) / 2
    assert lr_at("cosine", int(mid), TOTAL, 1.0, warmup=20) == pytest.approx(
        0.1 + 0.9 * cos_down((int(mid) - 20) / 979)
    )
    assert lr_at("cosine", TOTAL - 1, TOTAL, 1.0, warmup=20) == pytest.approx(0.1)


def test_wsd_lr_warmup_stable_then_cosine_decay_over_the_last_percent():
    assert lr_at("wsd", 0, TOTAL, 2.0) == pytest.approx(2.0 / 100)
    assert lr_at("wsd", 99, TOTAL, 2.0) == pytest.approx(2.0)
    assert all(lr_at("wsd", s, TOTAL, 2.0) == 2.0 for s in range(100, 990))
    for s in range(990, 1000):
        assert lr_at("wsd", s, TOTAL, 2.0) == pytest.approx(2.0 * (0.1 + 0.9 * cos_down((s - 990 + 1) / 10)))
    assert lr_at("wsd", 999, TOTAL, 2.0) == pytest.approx(0.2)


def test_constant_lr_after_warmup():
    assert lr_at("constant", 0, TOTAL, 1.0, warmup=4) == pytest.approx(0.25)
    assert lr_at("constant", 500, TOTAL, 1.0, warmup=4) == 1.0


@pytest.mark.parametrize("step", [0, 1, 250, 500, 999])
def test_linear_alpha_schedules(step):
    assert alpha_at("constant", step, TOTAL, 0.9) == 0.9
    assert alpha_at("linear-inc", step, TOTAL, 1.0) == pytest.approx(step / 999)
    assert alpha_at("linear-dec", step, TOTAL, 1.0) == pytest.approx(1 - step / 999)


def test_period_alpha_is_point_nine_on_every_fourth_batch():
    values = [alpha_at("period", s, TOTAL, 0.9) for s in range(12)]
    assert values == [0, 0, 0, 0.9] * 3


def test_wsd_alpha_rises_from_zero_holds_then_cosines_to_zero():
    assert alpha_at("wsd", 0, TOTAL, 0.9) == 0.0
    assert alpha_at("wsd", 50, TOTAL, 0.9) == pytest.approx(0.9 * 50 / 100)
    assert all(alpha_at("wsd", s, TOTAL, 0.9) == 0.9 for s in range(100, 990))
    assert alpha_at("wsd", 994, TOTAL, 0.9) == pytest.approx(0.9 * cos_down(5 / 10))
    assert alpha_at("wsd", 999, TOTAL, 0.9) == pytest.approx(0.0)


def test_wsd_beta_applies_the_shape_to_the_lm_weight():
    for s in (0, 50, 500, 994, 999):
        assert 1 - alpha_at("wsd-beta", s, TOTAL, 1.0) == pytest.approx(alpha_at("wsd", s, TOTAL, 1.0))


def test_unknown_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at("linear", 0, 10, 1.0)
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at("step", 0, 10, 1.0)
