"""predistill.modeling.kernels: the fused RMSNorm / SwiGLU forwards change memory, not results."""

import copy

import pytest
import torch
import torch.nn.functional as F

from predistill.modeling.kernels import fuse_kernels
from predistill.stages.train import TrainConfig, prepare_student
from predistill.training.config import result_identity


def tiny(family: str):
    """A two-layer model of `family` from its transformers config (random init, seeded)."""
    import transformers as tf

    torch.manual_seed(0)
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = {
        "llama": lambda: tf.LlamaConfig(**shape),
        "qwen2": lambda: tf.Qwen2Config(**shape, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**shape),
        "gemma": lambda: tf.GemmaConfig(**shape, head_dim=8),
        "mamba": lambda: tf.MambaConfig(vocab_size=97, hidden_size=32, state_size=4, num_hidden_layers=2),
    }[family]()
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms initialise to ones; a random weight makes their gradient non-trivial
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def loss_and_grads(model, ids):
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return logits.detach(), grads


@pytest.mark.parametrize("family,swapped", [("llama", 7), ("qwen2", 7), ("mistral", 7), ("mamba", 3)])
def test_fused_forwards_equal_the_models_own_values_and_gradients(family, swapped):
    """Every norm (2 per layer + the final one) and every SwiGLU MLP is swapped; logits are equal bit
    for bit, with autograd and without, every parameter's gradient to float rounding."""
    eager = tiny(family)
    fused = copy.deepcopy(eager)
    assert fuse_kernels(fused) == swapped
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    logits, grads = loss_and_grads(eager, ids)
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert torch.equal(logits, fused_logits)
    for name, g, fg in zip([n for n, _ in eager.named_parameters()], grads, fused_grads):
        torch.testing.assert_close(fg, g, rtol=1e-5, atol=1e-6, msg=name)
    with torch.inference_mode():  # scoring: the in-place path, the same values
        assert torch.equal(fused(input_ids=ids).logits, logits)


def test_fused_forwards_in_bf16_keep_values_and_track_gradients():
    eager = tiny("llama").to(torch.bfloat16)
    fused = copy.deepcopy(eager)
    fuse_kernels(fused)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    logits, grads = loss_and_grads(eager, ids)
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert torch.equal(logits, fused_logits)
    with torch.inference_mode():
        assert torch.equal(fused(input_ids=ids).logits, logits)
    for g, fg in zip(grads, fused_grads):
        assert fg.dtype == torch.bfloat16
        torch.testing.assert_close(fg.float(), g.float(), rtol=0.05, atol=0.05 * g.float().abs().max().item())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_forwards_under_autocast_match_the_models_own(family):
    """train --precision bf16: fp32 weights, bf16 autocast. The fused backward runs outside autocast
    and casts as autocast did: its gradients are fp32, as eager's are, and close to them."""
    eager = tiny(family)
    fused = copy.deepcopy(eager)
    fuse_kernels(fused)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = loss_and_grads(eager, ids)
        fused_logits, fused_grads = loss_and_grads(fused, ids)
    assert torch.equal(logits, fused_logits)
    for g, fg in zip(grads, fused_grads):
        assert fg.dtype == g.dtype == torch.float32
        torch.testing.assert_close(fg, g, rtol=0.05, atol=0.05 * g.abs().max().item())


def test_a_variant_formula_keeps_its_own_forward():
    """Gemma's norm scales by 1 + weight and its MLP uses GELU; a look-alike module (the attributes
    of an RMSNorm, another formula) is left alone too: the probe finds the difference."""
    assert fuse_kernels(tiny("gemma")) == 0

    class OffsetRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    norm = OffsetRMSNorm()
    assert fuse_kernels(norm) == 0 and "forward" not in vars(norm)


def test_a_copy_of_a_fused_model_runs_on_its_own_weights():
    fused = tiny("llama")
    fuse_kernels(fused)
    clone = copy.deepcopy(fused)
    with torch.no_grad():
        for p in clone.model.layers[0].mlp.parameters():
            p.mul_(2)
    ids = torch.randint(0, 97, (1, 6))
    assert not torch.equal(fused(input_ids=ids).logits, clone(input_ids=ids).logits)


def test_train_fuses_unless_told_not_to_and_either_way_trains_the_same_run():
    on, off = tiny("qwen2"), tiny("qwen2")
    prepare_student(on, TrainConfig())
    prepare_student(off, TrainConfig(fused_kernels=False))
    assert "forward" in vars(on.model.layers[0].mlp) and "forward" not in vars(off.model.layers[0].mlp)
    # float rounding apart, the same weights: a run resumed with the other setting is the same run
    assert result_identity(TrainConfig(fused_kernels=False, loss_chunk=64)) == result_identity(TrainConfig())
