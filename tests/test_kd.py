"""KD losses and temperatures against a plain full-vocabulary reference (values and gradients)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from predistill.core.artifacts import PredistillError
from predistill.formats.logits import TeacherTargets
from predistill.training.kd import KD_LOSSES, TEMPERATURE_MODES, KDConfig, kd_loss, lm_kd_loss, online_kd_loss
from predistill.training.losses import lm_loss

LOSSES = tuple(KD_LOSSES)  # the per-entry losses; ULD (sorted probabilities) is pinned in test_crosstok.py

V, H, K = 40, 12, 6
ATOL = 1e-5


def make_case(seed: int, n_rows: int = 9):
    """Student hidden/weight, and truncated teacher targets built from real teacher log-probs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.4
    t_logp = torch.log_softmax(torch.randn(n_rows, V, generator=g) * 2.0, dim=-1)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n_rows)])
    n = torch.randint(1, K + 1, (n_rows,), generator=g)
    n[0] = 1  # a single retained entry
    n[1] = K
    mask = torch.arange(K)[None, :] < n[:, None]
    lps = t_logp.gather(1, ids)
    ids = torch.where(mask, ids, torch.zeros_like(ids))  # padding id 0 may repeat a real id: masked
    lps = torch.where(mask, lps, torch.zeros_like(lps))
    return hidden, weight, TeacherTargets(ids, lps, mask)


# ---------------------------------------------------------------------------------------------
# the reference: one row at a time, full-vocabulary logits, fp64, formulas written out
# ---------------------------------------------------------------------------------------------
def ref_tau(t: torch.Tensor, cfg: KDConfig) -> float:
    if cfg.temperature_mode == "static":
        return cfg.temperature
    if cfg.temperature_mode == "wttm":
        return 1 / cfg.wttm_gamma
    if cfg.temperature_mode == "normkd":
        return max(cfg.normkd_t * math.sqrt(((t - t.mean()) ** 2).mean().item()), 1e-4)
    if cfg.temperature_mode == "adakd-sd":
        return max(math.sqrt(((t - t.mean()) ** 2).mean().item()), 1e-4)
    p = torch.softmax(t, 0)
    entropy = -(p * p.log()).sum().item()
    tau = cfg.adakd_tau_max - (cfg.adakd_tau_max - cfg.adakd_tau_min) * entropy / cfg.adakd_h_max
    return min(max(tau, cfg.adakd_tau_min), cfg.adakd_tau_max)


def ref_row_loss(
    logq_full: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, tau: float, cfg: KDConfig, tail: str | None
) -> torch.Tensor:
    """One row's loss over the entries plus the rest of the vocabulary as one category (`tail` None:
    the teacher covers the whole vocabulary, there is no rest)."""
    s = logq_full[ids]
    if tail is not None:
        rest = torch.ones(len(logq_full), dtype=torch.bool)
        rest[ids] = False
        s = torch.cat([s, torch.logsumexp(logq_full[rest], 0, keepdim=True)])  # Σ of the other ids
    if tail == "bucket":  # the teacher's dropped mass, tempered with the entries
        t_tail = max(1 - t.exp().sum().item(), 1e-8)
        log_f = torch.log_softmax(torch.cat([t, torch.tensor([math.log(t_tail)], dtype=t.dtype)]) / tau, 0)
    elif tail == "drop":  # renormalised over the entries: zero mass on the rest (log floored for rkl)
        log_f = torch.cat([torch.log_softmax(t / tau, 0), torch.tensor([math.log(1e-8)], dtype=t.dtype)])
    else:
        log_f = torch.log_softmax(t / tau, 0)  # log of softmax; its exp may underflow to 0 at small τ
    f = log_f.exp()
    if tail == "drop":
        f = torch.cat([f[:-1], torch.zeros(1, dtype=f.dtype)])
    q = s.exp()
    if cfg.loss == "nll":
        return -(f * s).sum()
    if cfg.loss == "kld":
        return (f * (log_f - s)).sum()
    if cfg.loss == "rkl":
        return (q * (s - log_f)).sum()
    if cfg.loss == "jsd":
        b = cfg.jsd_beta
        log_mix = torch.log(b * f + (1 - b) * q)
        if not torch.isfinite(log_mix).all():  # both terms underflowed: the same mixture in log space
            log_mix = torch.logaddexp(math.log(b) + log_f, math.log(1 - b) + s)
        return b * (f * (log_f - log_mix)).sum() + (1 - b) * (q * (s - log_mix)).sum()
    if cfg.loss == "tvd":
        return 0.5 * (f - q).abs().sum()
    return ((f - q) ** 2).sum()


def ref_weight(t: torch.Tensor, tau: float, cfg: KDConfig) -> float:
    if cfg.temperature_mode == "normkd":
        return tau**2
    if cfg.temperature_mode == "wttm":
        return cfg.wttm_beta * (torch.softmax(t, 0) ** cfg.wttm_gamma).sum().item()
    return 1.0


def ref_offline(hidden, weight, targets: TeacherTargets, cfg: KDConfig, position_mask=None):
    h = hidden.double().detach().requires_grad_()
    w = weight.double().detach().requires_grad_()
    losses = []
    for r in range(h.shape[0]):
        keep = targets.mask[r]
        if not keep.any() or (position_mask is not None and not position_mask[r]):
            continue
        ids, t = targets.ids[r][keep], targets.logprobs[r][keep].double()
        tau = ref_tau(t, cfg)
        z = h[r] @ w.t()
        if cfg.temperature_mode == "normkd":
            z = z / tau
        row = ref_row_loss(torch.log_softmax(z, 0), ids, t, tau, cfg, cfg.tail)
        losses.append(row * ref_weight(t, tau, cfg))
    mean = torch.stack(losses).mean()
    mean.backward()
    return mean.detach(), h.grad, w.grad


def ref_online(hs, ws, ht, wt, cfg: KDConfig):
    h = hs.double().detach().requires_grad_()
    w = ws.double().detach().requires_grad_()
    losses = []
    for r in range(h.shape[0]):
        z_t = ht[r].double() @ wt.double().t()
        tau = ref_tau(z_t, cfg)
        z = h[r] @ w.t()
        if cfg.temperature_mode == "normkd":
            z = z / tau
        t = torch.log_softmax(z_t, 0)  # full vocabulary: logits and log-probs give the same F
        row = ref_row_loss(torch.log_softmax(z, 0), torch.arange(len(z_t)), t, tau, cfg, tail=None)
        losses.append(row * ref_weight(z_t, tau, cfg))
    mean = torch.stack(losses).mean()
    mean.backward()
    return mean.detach(), h.grad, w.grad


def ours_offline(hidden, weight, targets, cfg, position_mask=None):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    mean, per_position = kd_loss(h, w, targets, cfg, position_mask)
    mean.backward()
    return mean.detach(), h.grad, w.grad, per_position.detach()


def assert_close(ours, ref, what):
    assert torch.allclose(ours.double(), ref, atol=ATOL, rtol=1e-5), (
        f"{what}: max diff {(ours.double() - ref).abs().max().item():.3g}"
    )


CASES = list(itertools.product(LOSSES, TEMPERATURE_MODES, ("drop", "bucket")))


@pytest.mark.parametrize("loss,mode,tail", CASES)
def test_offline_matches_full_vocab_reference(loss, mode, tail):
    hidden, weight, targets = make_case(seed=CASES.index((loss, mode, tail)))
    cfg = KDConfig(loss=loss, temperature_mode=mode, tail=tail, temperature=2.0, chunk_size=4).validate()
    mean, gh, gw, per_position = ours_offline(hidden, weight, targets, cfg)
    ref_mean, ref_gh, ref_gw = ref_offline(hidden, weight, targets, cfg)
    assert torch.isfinite(mean)
    assert_close(mean, ref_mean, "loss")
    assert_close(gh, ref_gh, "grad wrt hidden")
    assert_close(gw, ref_gw, "grad wrt weight")
    assert torch.allclose(per_position.mean(), mean, atol=1e-6)  # every row has entries here


@pytest.mark.parametrize("loss,mode", list(itertools.product(LOSSES, TEMPERATURE_MODES)))
def test_online_matches_full_vocab_reference(loss, mode):
    g = torch.Generator().manual_seed(7)
    hs, ws = torch.randn(7, H, generator=g), torch.randn(V, H, generator=g) * 0.4
    ht, wt = torch.randn(7, 10, generator=g), torch.randn(V, 10, generator=g) * 0.5
    cfg = KDConfig(loss=loss, temperature_mode=mode, temperature=0.7, online_chunk_size=3).validate()
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    mean, per_position = online_kd_loss(h, w, ht, wt, cfg)
    mean.backward()
    ref_mean, ref_gh, ref_gw = ref_online(hs, ws, ht, wt, cfg)
    assert_close(mean.detach(), ref_mean, "loss")
    assert_close(h.grad, ref_gh, "grad wrt hidden")
    assert_close(w.grad, ref_gw, "grad wrt weight")
    assert per_position.shape == (7,)


@pytest.mark.parametrize("loss,mode", list(itertools.product(LOSSES, TEMPERATURE_MODES)))
def test_fused_online_lm_kd_equals_naive_full_logits(loss, mode):
    """The online path with the LM loss in the same pass and the gradient computed in the forward:
    values and gradients equal (1−α)·cross-entropy + α·KD on full [rows, V] logits (float64
    reference), padding excluded, for every loss × temperature mode."""
    from predistill.training.kd import fused_online_lm_kd_loss

    g = torch.Generator().manual_seed(9)
    hs, ws = torch.randn(2, 4, H, generator=g), torch.randn(V, H, generator=g) * 0.4
    ht, wt = torch.randn(2, 4, 10, generator=g), torch.randn(V, 10, generator=g) * 0.5
    next_tokens = torch.randint(0, V, (2, 4), generator=g)
    pmask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cfg = KDConfig(loss=loss, temperature_mode=mode, temperature=0.7, online_chunk_size=3).validate()
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lm_sum, kd_sum, lm_pp, kd_pp = fused_online_lm_kd_loss(h, w, ht, wt, next_tokens, cfg, pmask, weights=(0.3, 0.7))
    (2.0 * (0.3 * lm_sum + 0.7 * kd_sum)).backward()  # a common factor (train's 1/targets) is free

    rh, rw = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref_kd, _, _ = ref_online(hs[pmask], ws, ht[pmask], wt, cfg)
    ref_lm = F.cross_entropy(rh[pmask] @ rw.t(), next_tokens[pmask], reduction="sum")
    n = int(pmask.sum())
    _, kd_gh, kd_gw = ref_online(hs[pmask], ws, ht[pmask], wt, cfg)  # gradients of the mean KD
    ref_lm.backward()
    assert_close(lm_sum.detach(), ref_lm.detach(), "LM sum")
    assert_close(kd_sum.detach(), ref_kd * n, "KD sum")
    grad_h = 2.0 * (0.3 * rh.grad[pmask] + 0.7 * n * kd_gh)
    assert_close(h.grad[pmask], grad_h, "grad wrt hidden")
    assert (h.grad[~pmask] == 0).all()
    assert_close(w.grad, 2.0 * (0.3 * rw.grad + 0.7 * n * kd_gw), "grad wrt weight")
    assert (lm_pp[~pmask] == 0).all() and (kd_pp[~pmask] == 0).all()
    assert_close(lm_pp.sum(), lm_sum.detach().double(), "LM per position")


def test_fused_online_accumulates_over_micro_batches_and_costs_nothing_without_grad():
    from predistill.training.kd import fused_online_lm_kd_loss

    g = torch.Generator().manual_seed(4)
    hs, ws = torch.randn(6, H, generator=g), torch.randn(V, H, generator=g)
    ht, wt = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    nxt = torch.randint(0, V, (6,), generator=g)
    cfg = KDConfig(loss="kld", temperature=2.0, online_chunk_size=4)
    w_whole, w_parts = ws.clone().requires_grad_(), ws.clone().requires_grad_()
    lm, kd, _, _ = fused_online_lm_kd_loss(hs, w_whole, ht, wt, nxt, cfg, weights=(0.1, 0.9))
    (0.1 * lm + 0.9 * kd).backward()
    for part in (slice(0, 2), slice(2, 6)):  # grad accumulation: two backward calls add up
        lm, kd, _, _ = fused_online_lm_kd_loss(hs[part], w_parts, ht[part], wt, nxt[part], cfg, weights=(0.1, 0.9))
        (0.1 * lm + 0.9 * kd).backward()
    torch.testing.assert_close(w_parts.grad, w_whole.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        _, kd, _, _ = fused_online_lm_kd_loss(hs, w_whole, ht, wt, nxt, cfg)
    assert kd.grad_fn is None and not kd.requires_grad


def test_vanilla_kd_is_soft_cross_entropy():
    """MiniPLM's Vanilla KD: −Σ p_T log q_S over the full vocabulary, no temperature."""
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(2, 5, H, generator=g), torch.randn(V, H, generator=g)
    ht, wt = torch.randn(2, 5, 8, generator=g), torch.randn(V, 8, generator=g)
    pmask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    mean, per_position = online_kd_loss(hs, ws, ht, wt, KDConfig(loss="nll"), pmask)
    expected = F.cross_entropy((hs @ ws.t())[pmask], torch.softmax(ht @ wt.t(), -1)[pmask])
    assert torch.allclose(mean, expected, atol=1e-5)
    assert (per_position[~pmask] == 0).all() and (per_position[pmask] > 0).all()


@pytest.mark.parametrize("loss,mode,tail", CASES)
def test_nan_free_at_tiny_tau_and_single_entry(loss, mode, tail):
    hidden, weight, targets = make_case(seed=11)
    hidden = hidden * 5  # peaked student too
    single = TeacherTargets(targets.ids, targets.logprobs, targets.mask & (torch.arange(K)[None, :] == 0))
    for tgt in (targets, single):
        cfg = KDConfig(loss=loss, temperature_mode=mode, tail=tail, temperature=1e-4, adakd_tau_min=1e-4).validate()
        mean, gh, gw, _ = ours_offline(hidden, weight, tgt, cfg)
        assert torch.isfinite(mean) and torch.isfinite(gh).all() and torch.isfinite(gw).all(), (loss, mode, tail)
    # online at τ→0 as well
    h = hidden.clone().requires_grad_()
    cfg = KDConfig(loss=loss, temperature_mode=mode, temperature=1e-4, adakd_tau_min=1e-4)
    m, _ = online_kd_loss(h, weight, torch.randn(hidden.shape[0], 4) * 30, torch.randn(V, 4), cfg)
    m.backward()
    assert torch.isfinite(m) and torch.isfinite(h.grad).all()


def test_single_entry_teacher_is_one_hot_nll():
    """One retained entry: F is one-hot whatever τ, so nll is the student's NLL of that id."""
    hidden, weight, targets = make_case(seed=5)
    one = TeacherTargets(targets.ids, targets.logprobs, targets.mask & (torch.arange(K)[None, :] == 0))
    for tau in (0.01, 1.0, 5.0):
        mean, _ = kd_loss(hidden, weight, one, KDConfig(loss="nll", temperature=tau))
        expected = -torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets.ids[:, :1]).mean()
        assert torch.allclose(mean, expected, atol=1e-5)


def test_tail_drop_renormalises_but_bucket_keeps_the_tail():
    """drop: F depends only on the entries' relative log-probs; bucket: the dropped mass matters."""
    hidden, weight, targets = make_case(seed=2)
    shifted = TeacherTargets(targets.ids, targets.logprobs - 0.5 * targets.mask, targets.mask)  # more tail mass
    for loss in LOSSES:
        drop = KDConfig(loss=loss, tail="drop")
        bucket = KDConfig(loss=loss, tail="bucket")
        a, b = kd_loss(hidden, weight, targets, drop)[0], kd_loss(hidden, weight, shifted, drop)[0]
        assert torch.allclose(a, b, atol=1e-6), loss
        c, d = kd_loss(hidden, weight, targets, bucket)[0], kd_loss(hidden, weight, shifted, bucket)[0]
        assert (c - d).abs() > 1e-4, loss


def test_bucket_equals_full_distribution_when_nothing_is_dropped():
    """With every id retained (top-p 1, k = V) the bucket is empty and kld is the full-vocab KL."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(5, H, generator=g), torch.randn(V, H, generator=g)
    t_logp = torch.log_softmax(torch.randn(5, V, generator=g), -1)
    targets = TeacherTargets(torch.arange(V).expand(5, V), t_logp, torch.ones(5, V, dtype=torch.bool))
    s_logp = torch.log_softmax(hidden @ weight.t(), -1)
    full_kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    for tail in ("drop", "bucket"):
        assert torch.allclose(kd_loss(hidden, weight, targets, KDConfig(loss="kld", tail=tail))[0], full_kl, atol=1e-5)


def test_sampled_entries_use_counts_as_weights():
    """Sampled entries: teacher weights count/N, so nll = −Σ (c/N) log q (RS-KD's estimator)."""
    hidden, weight, _ = make_case(seed=8, n_rows=3)
    ids = torch.tensor([[3, 9, 0], [5, 0, 0], [1, 2, 7]])
    counts = torch.tensor([[5.0, 3.0, 0.0], [8.0, 0.0, 0.0], [2.0, 2.0, 4.0]])
    mask = counts > 0
    targets = TeacherTargets(ids, torch.where(mask, (counts / 8).clamp(min=1e-9).log(), torch.zeros(())), mask)
    logq = torch.log_softmax(hidden @ weight.t(), -1).gather(1, ids)
    expected = -((counts / 8) * logq).sum(-1).mean()
    for tail in ("drop", "bucket"):  # weights sum to 1: the bucket is empty for nll
        assert torch.allclose(kd_loss(hidden, weight, targets, KDConfig(loss="nll", tail=tail))[0], expected, atol=1e-5)


def test_masked_positions_are_not_distilled():
    hidden, weight, targets = make_case(seed=9, n_rows=8)
    hidden, targets = hidden.view(2, 4, H), targets.reshape(2, 4, K)
    pmask = torch.tensor([[True, True, False, False], [True, False, True, True]])
    cfg = KDConfig(loss="kld")
    mean, per_position = kd_loss(hidden, weight, targets, cfg, pmask)
    assert (per_position[~pmask] == 0).all()
    assert torch.allclose(mean, per_position[pmask].mean())
    ref_mean, _, _ = ref_offline(hidden.view(8, H), weight, targets.reshape(8, K), cfg, pmask.flatten())
    assert torch.allclose(mean.double(), ref_mean, atol=ATOL)


def test_bad_config_and_shapes_are_refused():
    with pytest.raises(PredistillError, match="kd-loss"):
        KDConfig(loss="l1").validate()
    with pytest.raises(PredistillError, match="temperature mode"):
        KDConfig.from_temperature("hot")
    assert KDConfig.from_temperature("2.5").temperature == 2.5
    assert KDConfig.from_temperature("adakd-h").temperature_mode == "adakd-h"
    with pytest.raises(PredistillError, match="jsd beta"):
        KDConfig(jsd_beta=1.0).validate()
    hidden, weight, targets = make_case(seed=1)
    with pytest.raises(PredistillError, match="positions must align"):
        kd_loss(hidden[:-1], weight, targets, KDConfig())
    with pytest.raises(PredistillError, match="share a vocabulary"):
        kd_loss(hidden, weight[:3], targets, KDConfig())
    with pytest.raises(PredistillError, match="shared vocabulary"):
        online_kd_loss(hidden, weight, hidden, weight[:-1], KDConfig())


@pytest.mark.parametrize(
    "mode,tail", [("static", "drop"), ("adakd-h", "bucket"), ("normkd", "drop"), ("wttm", "bucket")]
)
def test_fused_lm_kd_equals_separate_losses(mode, tail):
    """One vocabulary pass for LM + KD gives the values and gradients of lm_loss and kd_loss."""
    hidden, weight, targets = make_case(seed=21, n_rows=8)
    hidden, targets = hidden.view(2, 4, H), targets.reshape(2, 4, K)
    no_entries = targets.mask.clone()
    no_entries[1, 0] = False  # a real position the teacher has nothing for: LM only
    targets = TeacherTargets(targets.ids, targets.logprobs, no_entries)
    next_tokens = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    pmask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    cfg = KDConfig(loss="kld", temperature_mode=mode, tail=tail, temperature=2.0, chunk_size=3)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            lm, kd, lm_pp, kd_pp = lm_kd_loss(h, w, next_tokens, targets, cfg, pmask)
        else:
            lm, lm_pp = lm_loss(h, w, next_tokens, pmask, chunk_size=3)
            kd, kd_pp = kd_loss(h, w, targets, cfg, pmask)
        (0.3 * lm + 0.7 * kd).backward()
        results.append((lm.detach(), kd.detach(), lm_pp.detach(), kd_pp.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)
    assert results[0][3][1, 0] == 0 and results[0][2][1, 0] > 0


@pytest.mark.parametrize("loss,mode,tail", CASES)
def test_fused_lm_kd_loss_equals_the_recomputing_one_in_values_and_gradients(loss, mode, tail):
    """The gradient computed in the forward pass (fused_lm_kd_loss) is the one autograd gets through
    lm_kd_loss, for every loss × temperature × tail, with rows the teacher has nothing for and
    padding; the two sums may be weighed freely (α schedules)."""
    from predistill.training.kd import fused_lm_kd_loss

    hidden, weight, targets = make_case(seed=23, n_rows=10)
    hidden, targets = hidden.view(2, 5, H), targets.reshape(2, 5, K)
    no_entries = targets.mask.clone()
    no_entries[1, 0] = False
    targets = TeacherTargets(targets.ids, targets.logprobs, no_entries)
    next_tokens = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    pmask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    cfg = KDConfig(loss=loss, temperature_mode=mode, tail=tail, temperature=2.0, chunk_size=3).validate()
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            lm_sum, kd_sum, lm_pp, kd_pp = fused_lm_kd_loss(h, w, next_tokens, targets, cfg, pmask, weights=(0.3, 0.7))
        else:
            _, _, lm_pp, kd_pp = lm_kd_loss(h, w, next_tokens, targets, cfg, pmask)
            lm_sum, kd_sum = lm_pp.sum(), kd_pp.sum()
        (2.0 * (0.3 * lm_sum + 0.7 * kd_sum)).backward()  # a common factor (train's 1/targets) is free
        results.append((lm_sum.detach(), kd_sum.detach(), lm_pp.detach(), kd_pp.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_lm_kd_loss_refuses_a_loss_that_weighs_its_sums_otherwise():
    from predistill.training.kd import fused_lm_kd_loss

    hidden, weight, targets = make_case(seed=5, n_rows=4)
    h = hidden.clone().requires_grad_()
    next_tokens = torch.randint(0, V, (4,), generator=torch.Generator().manual_seed(2))
    lm_sum, kd_sum, _, _ = fused_lm_kd_loss(h, weight, next_tokens, targets, KDConfig(chunk_size=3), weights=(0.5, 0.5))
    with pytest.raises(RuntimeError, match="weighed 0.5:0.5"):
        (0.1 * lm_sum + 0.9 * kd_sum).backward()
