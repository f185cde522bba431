"""Chunked log-probs equal the plain full-logits computation, in values and gradients."""

import pytest
import torch

from predistill.training.losses import fused_lm_loss, gather_logprobs, lm_loss, token_logprobs


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_gather_logprobs_matches_log_softmax_gather(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    ids = torch.randint(0, 101, (37, 5))
    upstream = torch.randn(37, 5)

    chunked = gather_logprobs(hidden, weight, ids, chunk)
    (chunked * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, ids)
    (plain * upstream).sum().backward()

    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_float64():
    torch.manual_seed(1)
    hidden = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (9, 3))
    assert torch.autograd.gradcheck(lambda h, w: gather_logprobs(h, w, ids, 4), (hidden, weight))


def test_lm_loss_masks_padding_and_token_logprobs_keeps_shape():
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(20, 8)
    targets = torch.randint(0, 20, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    mean, nll = lm_loss(hidden, weight, targets, mask, chunk_size=4)
    logp = token_logprobs(hidden, weight, targets)
    assert logp.shape == (2, 6)
    torch.testing.assert_close(nll[mask], -logp[mask])
    assert torch.all(nll[~mask] == 0)
    torch.testing.assert_close(mean, -logp[mask].mean())


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("needs", ["both", "hidden", "weight"])
def test_fused_lm_loss_equals_cross_entropy_in_values_and_gradients(chunk, needs):
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, requires_grad=needs in ("both", "hidden"))
    weight = (torch.randn(v, h) * 0.3).requires_grad_(needs in ("both", "weight"))
    targets = torch.randint(0, v, (n,))
    total, rows = fused_lm_loss(hidden, weight, targets, chunk)
    (0.37 * total).backward()  # any upstream scale: the stored gradient is scaled in backward
    fused = [t.grad.clone() if t.grad is not None else None for t in (hidden, weight)]
    hidden.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (0.37 * reference.sum()).backward()
    torch.testing.assert_close(rows, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.detach(), reference.sum().detach(), rtol=1e-5, atol=1e-5)
    for got, tensor in zip(fused, (hidden, weight)):
        if tensor.requires_grad:
            torch.testing.assert_close(got, tensor.grad, rtol=1e-5, atol=1e-5)
        else:
            assert got is None


@pytest.mark.parametrize("chunk", [7, 4096])
def test_fused_lm_loss_under_autocast_computes_the_head_in_bf16_like_eager(chunk):
    """train --precision bf16: the head's matmuls in bf16 (as autocast does for eager cross-entropy),
    the softmax and the loss in fp32, fp32 gradients for fp32 weights."""
    torch.manual_seed(0)
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    targets = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, rows = fused_lm_loss(hidden, weight, targets, chunk)
        logits = hidden @ weight.t()
    total.backward()
    fused = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    assert logits.dtype == torch.bfloat16
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    reference.sum().backward()
    assert total.dtype == torch.float32 and fused[1].dtype == torch.float32
    torch.testing.assert_close(rows, reference.detach(), rtol=1e-5, atol=1e-5)  # the same bf16 logits
    for got, want in zip(fused, (hidden.grad, weight.grad)):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    with torch.no_grad():  # fp32 differs from it by bf16 rounding, not more
        full = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    assert 0 < (rows - full).abs().max() < 0.05


def test_fused_lm_loss_accumulates_like_any_loss_and_costs_nothing_without_grad():
    torch.manual_seed(1)
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    for part in (slice(0, 10), slice(10, 20)):  # two micro-batches, one optimizer step
        fused_lm_loss(hidden[part], weight, targets[part], 4)[0].backward()
    accumulated = weight.grad.clone()
    weight.grad = None
    torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum").backward()
    torch.testing.assert_close(accumulated, weight.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        total, _ = fused_lm_loss(hidden, weight, targets, 4)
    assert not total.requires_grad


def test_a_fused_loss_backward_runs_once():
    """Its stored gradients are scaled in place (no second [V, H] copy at the step's peak): a second
    backward through the same graph would scale them twice, so it is refused."""
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    total, _ = fused_lm_loss(hidden, weight, torch.randint(0, 9, (6,)), 4)
    (2 * total).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        total.backward()


def test_inference_head_equals_the_chunked_loss_head():
    """inference_token_logprobs (transposed logits in one reused buffer, in-place log-sum-exp; what
    scoring uses) is token_logprobs without its allocations, for any chunking, to float rounding."""
    from predistill.training.losses import inference_token_logprobs

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=g)
    for n, chunk in ((300, 64), (64, 64), (5, 256), (1, 1)):
        hidden = torch.randn(n, 32, generator=g) * 4
        targets = torch.randint(0, 1000, (n,), generator=g)
        with torch.inference_mode():
            torch.testing.assert_close(
                inference_token_logprobs(hidden, weight, targets, chunk),
                token_logprobs(hidden, weight, targets, chunk),
                rtol=1e-6,
                atol=1e-5,
            )
